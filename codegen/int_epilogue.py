"""CPU: a ReLU or ReLU6 after an integer layer fused into its kernel's epilogue.

The integer kernels (kernels/amx_int8.py, kernels/vnni_kernels.py) are opaque to TVM's FuseOps,
so the activation after them ran as a pass of its own over the layer's float output (mobilenet_v2
int8: 0.9 ms of 4.2, the ReLU6 after each expanding 1×1 conv). Each kernel takes its output clamp
``(lo, hi)`` as its last input, unbounded as lowered; ``maximum(y, c)``, ``minimum(y, c)`` and
``relu(y)`` of a kernel's output read nowhere else narrow it instead (after layout_friendly_ops
has written ``clip`` as minimum/maximum). The result is the same function: the kernel's output is
never NaN."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .transpose_sinking import use_counts

CLAMP_ATTR = "squeezer.output_clamp"   # a PrimFunc whose last input is its (lo, hi) output clamp


def _scalar(expr) -> float | None:
    value = getattr(expr, "value", None)
    if not hasattr(value, "numpy"):
        return None
    array = value.numpy()
    return float(array) if array.size == 1 and array.ndim == 0 and array.dtype == np.float32 else None


@mutator
class _FuseClamp(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, uses: dict) -> None:
        super().__init__(mod)
        self.mod, self.uses = mod, uses
        self.call_tir = tvm.ir.Op.get("relax.call_tir")
        self.bounds = {tvm.ir.Op.get("relax.maximum"): 0, tvm.ir.Op.get("relax.minimum"): 1}
        self.relu = tvm.ir.Op.get("relax.nn.relu")

    def _kernel(self, expr):
        """The call_tir of a clamped kernel bound to ``expr``, read by this op only."""
        if not isinstance(expr, relax.Var) or self.uses.get(expr, 0) != 1:
            return None
        bound = self.lookup_binding(expr)
        if not isinstance(bound, relax.Call) or bound.op != self.call_tir:
            return None
        func = self.mod[bound.args[0]] if bound.args[0] in self.mod.get_global_vars() else None
        attrs = getattr(func, "attrs", None)
        return bound if attrs is not None and CLAMP_ATTR in attrs.keys() else None

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102 - PyExprMutator hook
        call = super().visit_call_(call)
        if call.op == self.relu:
            kernel = self._kernel(call.args[0])
            return self._narrowed(kernel, 0, 0.0) if kernel is not None else call
        if call.op in self.bounds:
            for y, c in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
                kernel, value = self._kernel(y), _scalar(c)
                if kernel is not None and value is not None:
                    return self._narrowed(kernel, self.bounds[call.op], value)
        return call

    def _narrowed(self, kernel: relax.Call, side: int, value: float) -> relax.Expr:
        args = list(kernel.args[1].fields)
        lo, hi = (float(v) for v in args[-1].value.numpy())
        lo, hi = (max(lo, value), hi) if side == 0 else (lo, min(hi, value))
        args[-1] = relax.const(np.array([lo, hi], np.float32))
        return relax.call_tir(kernel.args[0], args, kernel.ty_args[0])


@relax.transform.function_pass(opt_level=0, name="FuseIntegerClamp")
class FuseIntegerClamp:
    """``maximum/minimum(kernel(...), c)``, ``relu(kernel(...))`` → the kernel with its clamp narrowed."""

    def transform_function(self, func: relax.Function, mod: tvm.IRModule, ctx) -> relax.Function:
        if func.attrs is not None and "Primitive" in func.attrs.keys() and func.attrs["Primitive"] != 0:
            return func
        return relax.analysis.remove_all_unused(_FuseClamp(mod, use_counts(func)).visit_expr(func))
