"""Relax rewrites that keep TVM 0.27's own passes from failing on valid graphs.

``ConvertLayout`` throws ``std::bad_alloc`` on ``squeeze`` (and ``expand_dims``) with a negative
axis, which torch.export emits for ``max_pool1d``, ``x.squeeze(-3)`` and ``nn.MultiheadAttention``:
any such model failed to build on CPU. Rewriting the axes as non-negative (the same op) avoids it.

``ConvertLayout`` has no layout rule for ``clip``: every ReLU6 / Hardswish / Hardsigmoid (MobileNet
v2/v3) was transposed back to NCHW, clipped, and transposed to NHWC again — two extra passes over
the activation, and a conv epilogue that could not fuse. ``clip`` as ``minimum(maximum(x, lo), hi)``
with scalar constants is the same function (NaN passes through both, see nan_semantics.py), and
binary elementwise ops follow any layout and fuse into the conv.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator


@mutator
class _LayoutFriendlyOps(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod = mod
        self.squeeze = tvm.ir.Op.get("relax.squeeze")
        self.expand_dims = tvm.ir.Op.get("relax.expand_dims")
        self.clip = tvm.ir.Op.get("relax.clip")

    def transform(self) -> tvm.IRModule:
        for gvar, func in self.mod.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gvar, self.visit_expr(func))
        return self.builder_.get()

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102 - PyExprMutator hook
        call = super().visit_call_(call)
        if call.op == self.clip:
            return self._clip_as_min_max(call)
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


    def _clip_as_min_max(self, call: relax.Call) -> relax.Expr:
        x, lo, hi = call.args
        dtype = x.ty.dtype
        if not all(isinstance(getattr(b, "value", None), (int, float)) for b in (lo, hi)) \
                or not str(dtype).startswith("float"):
            return call  # symbolic bounds or an integer clip: keep the op
        y = self.builder_.normalize(relax.op.maximum(x, relax.const(float(lo.value), dtype)))
        return self.builder_.normalize(relax.op.minimum(y, relax.const(float(hi.value), dtype)))


@tvm.transform.module_pass(opt_level=0, name="LayoutFriendlyOps")
def layout_friendly_ops(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``squeeze``/``expand_dims`` with their axes made non-negative, ``clip`` as min/max (see the
    module docstring)."""
    return _LayoutFriendlyOps(mod).transform()
