"""Relax rewrites that keep TVM 0.27's own passes from failing on valid graphs.

``ConvertLayout`` throws ``std::bad_alloc`` on ``squeeze`` (and ``expand_dims``) with a negative
axis, which torch.export emits for ``max_pool1d``, ``x.squeeze(-3)`` and ``nn.MultiheadAttention``:
any such model failed to build on CPU. Rewriting the axes as non-negative (the same op) avoids it.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator


@mutator
class _NonNegativeAxes(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod = mod
        self.squeeze = tvm.ir.Op.get("relax.squeeze")
        self.expand_dims = tvm.ir.Op.get("relax.expand_dims")

    def transform(self) -> tvm.IRModule:
        for gvar, func in self.mod.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gvar, self.visit_expr(func))
        return self.builder_.get()

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102 - PyExprMutator hook
        if call.op not in (self.squeeze, self.expand_dims) or call.attrs.axis is None:
            return call
        axes = [int(a) for a in call.attrs.axis]
        if all(a >= 0 for a in axes):
            return call
        x = call.args[0]
        ndim = x.ty.ndim + (len(axes) if call.op == self.expand_dims else 0)
        fixed = [a % ndim for a in axes]
        op = relax.op.squeeze if call.op == self.squeeze else relax.op.expand_dims
        return self.builder_.normalize(op(x, axis=fixed))


@tvm.transform.module_pass(opt_level=0, name="NonNegativeAxes")
def non_negative_axes(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``squeeze``/``expand_dims`` with their axes made non-negative (see the module docstring)."""
    return _NonNegativeAxes(mod).transform()
