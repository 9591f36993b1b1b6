"""CPU: a matmul (or NHWC conv) whose constant weight has an output width with no vector-friendly
divisor is computed on the weight zero-padded to whole vectors, and the extra columns (channels)
are sliced off.

Our schedule vectorizes the output axis by a divisor of its width (``schedules.cpu.vector_width``);
a width like 53 (prime) or 75 left it scalar or in odd vectors, several times slower than the
padded width (benchmarks/README.md); 1000 classes ran in half vectors (squeezenet's last conv:
1260 -> 1069 us padded to 1008). Pruned layers have such widths. The padded columns are zeros and are dropped
before anything reads them, so the result is the same; the slice fuses into the epilogue kernel."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .schedules.cpu import vector_width

_MATMUL = tvm.ir.Op.get("relax.matmul")
_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")


def padded_width(n: int, lanes: int) -> int | None:
    """The width to pad ``n`` output columns to, or None when ``n`` already vectorizes well."""
    width = vector_width(n, lanes, 2 * lanes)
    padded = -(-n // lanes) * lanes
    if n <= lanes or width % lanes == 0:
        return None
    if width & (width - 1) == 0 and width >= lanes // 2 and (n <= 2 * lanes or (padded - n) * 8 > n):
        return None  # half vectors; whole ones cost more than an eighth extra work here
    return padded


def _padded_const(value: np.ndarray, width: int) -> relax.Expr:
    padded = np.zeros((*value.shape[:-1], width), value.dtype)
    padded[..., : value.shape[-1]] = value
    return relax.const(padded)


def pad_matmul_columns(lanes: int) -> tvm.transform.Pass:
    """The Relax pass (run before legalization, on CPU targets)."""

    @relax.expr_functor.mutator
    class _Pad(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not isinstance(call, relax.Call) or not (call.op.same_as(_MATMUL) or call.op.same_as(_CONV2D)):
                return call
            weight = call.args[1]
            if not isinstance(weight, tvm.ir.expr.Constant) or str(getattr(weight.value, "dtype", "")) != "float32":
                return call
            shape = [int(d) for d in weight.value.shape]
            if call.op.same_as(_MATMUL) and len(shape) == 2:
                width = padded_width(shape[1], lanes)
            elif (call.op.same_as(_CONV2D) and call.attrs.groups == 1 and call.attrs.data_layout == "NHWC"
                  and call.attrs.kernel_layout == "HWIO" and call.attrs.out_layout == "NHWC"):
                width = padded_width(shape[3], lanes)
            else:
                return call
            if width is None:
                return call
            args = [call.args[0], _padded_const(weight.value.numpy(), width), *call.args[2:]]
            full = self.builder_.emit(relax.Call(call.op, args, call.attrs))
            axis = len(full.ty.shape) - 1
            return relax.op.strided_slice(full, axes=[axis], begin=[0], end=[shape[-1]])

    @tvm.transform.module_pass(opt_level=0, name="PadMatmulColumns")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        for gv, func in mod.functions.items():
            if isinstance(func, relax.Function):
                out.update_func(gv, _Pad(mod).visit_expr(func))
        return out

    return _pass
