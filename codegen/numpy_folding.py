"""Constant folding in numpy, ahead of TVM's FoldConstant, for the calls a build meets by the
dozen: BatchNorm's arithmetic folded into conv weights, the weights' layout permutes, masks and
position tables of attention. FoldConstant legalizes, builds and runs one LLVM kernel per folded
call, some 70 ms each: a third of resnet18's build went there (7.4 of 22 s), half of a small
Llama's. Here each is one numpy call.

Exact, not approximate: only data movement, comparisons, selects, casts (but float to integer),
integer + - × and float + - × ÷ √ are folded, on inputs without NaN: IEEE fixes their results bit
for bit, and numpy and the kernel TVM would build round the same way. Every other call, and any
result whose shape or dtype differs from what the call's type says, is left to FoldConstant.
Weight prepacking (a call_tir) is prepack_folding's."""

from __future__ import annotations

from typing import Callable

import numpy as np
import tvm
from tvm import relax

from .prepack_folding import evaluate_scatter
from .winograd import static_ints

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
_DTYPES = {"float16", "float32", "float64", "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32"}
_FLOATS = {"float16", "float32", "float64"}
_EXACT_ON_INTS = {"relax.add", "relax.subtract", "relax.multiply"}

_BINARY: dict[str, Callable] = {
    "relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply, "relax.divide": np.divide,
    "relax.less": np.less, "relax.less_equal": np.less_equal, "relax.greater": np.greater,
    "relax.greater_equal": np.greater_equal, "relax.equal": np.equal, "relax.not_equal": np.not_equal,
    "relax.logical_and": np.logical_and, "relax.logical_or": np.logical_or,
    "relax.bitwise_and": np.bitwise_and, "relax.bitwise_or": np.bitwise_or, "relax.bitwise_xor": np.bitwise_xor,
}
_BITWISE = {"relax.bitwise_and", "relax.bitwise_or", "relax.bitwise_xor"}
_UNARY_FLOAT: dict[str, Callable] = {
    "relax.sqrt": np.sqrt, "relax.rsqrt": lambda x: np.ones((), x.dtype) / np.sqrt(x), "relax.negative": np.negative,
}


def _ints(values) -> list[int]:
    return [int(v) for v in values]


def _strided_slice(args: list) -> np.ndarray | None:
    """Python's slicing, which is TVM's for positive strides (negative ones are left to TVM)."""
    x, axes, begin, end = args[:4]
    strides = args[4] if len(args) > 4 else [1] * len(axes)
    if any(int(s) < 1 for s in strides):
        return None
    index = [slice(None)] * x.ndim
    for axis, b, e, s in zip(axes, begin, end, strides):
        index[axis] = slice(b, e, s)
    return x[tuple(index)]


def _gather(x: np.ndarray, indices: list) -> np.ndarray | None:
    """``x[i0, i1, ...]`` with the integer index tensors broadcast together (torch's advanced
    indexing of the leading axes); negative or out-of-range indices are left to TVM."""
    if len(indices) > x.ndim or any(i.dtype.kind not in "iu" or i.min(initial=0) < 0
                                    or i.max(initial=0) >= n for i, n in zip(indices, x.shape)):
        return None
    return x[tuple(indices)]


def _data_movement(name: str, call: relax.Call, args: list) -> np.ndarray | None:
    """Reshapes, permutes, broadcasts, slices, concatenations, casts and fills: exact for every dtype."""
    x = args[0]
    if name == "relax.permute_dims":
        return np.transpose(x, None if call.attrs.axes is None else _ints(call.attrs.axes))
    if name == "relax.reshape":
        return np.reshape(x, args[1])
    if name == "relax.broadcast_to":
        return np.broadcast_to(x, args[1])
    if name == "relax.expand_dims":
        return np.expand_dims(x, tuple(_ints(call.attrs.axis)))
    if name == "relax.squeeze":
        return np.squeeze(x, None if call.attrs.axis is None else tuple(_ints(call.attrs.axis)))
    if name == "relax.strided_slice":
        return _strided_slice(args)
    if name == "relax.concat":
        return np.concatenate(x, axis=int(call.attrs.axis))
    if name == "relax.astype":
        return x.astype(str(call.attrs.dtype))
    if name == "relax.where":
        return np.where(*args)
    if name == "relax.full":
        return np.full(args[0], args[1], str(call.attrs.dtype))
    if name == "relax.index_tensor":
        return _gather(x, args[1])
    if name == "relax.arange":
        return np.arange(*args, dtype=str(call.attrs.dtype))
    return None


def evaluate(call: relax.Call, args: list) -> np.ndarray | None:
    """``call`` on numpy ``args`` (arrays, 0-d for scalars; lists for tuples and shapes), or
    None where it is not one we fold exactly."""
    name = call.op.name
    tensors = [a for a in args if isinstance(a, np.ndarray)]
    tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, np.ndarray)]
    if any(str(t.dtype) not in _DTYPES for t in tensors):
        return None
    floats = all(str(t.dtype) in _FLOATS for t in tensors)
    if any(str(t.dtype) in _FLOATS and np.isnan(t).any() for t in tensors):
        return None   # NaN's comparisons and selects are where numpy and LLVM may part
    if name == "relax.astype" and str(tensors[0].dtype) in _FLOATS and str(call.attrs.dtype) not in _FLOATS:
        return None   # out-of-range float-to-int casts are undefined
    if name in _BINARY:
        a, b = args
        if not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray) or a.dtype != b.dtype:
            return None
        if name in ("relax.add", "relax.subtract", "relax.multiply", "relax.divide") and \
                not (floats or name in _EXACT_ON_INTS):
            return None
        if name in _BITWISE and floats:
            return None
        return _BINARY[name](a, b)
    if name in _UNARY_FLOAT:
        return _UNARY_FLOAT[name](args[0]) if floats and isinstance(args[0], np.ndarray) else None
    if name == "relax.where" and not all(isinstance(a, np.ndarray) for a in args):
        return None
    return _data_movement(name, call, args)


def _static_type(call: relax.Call) -> tuple[list[int], str] | None:
    """The call's result shape and dtype where both are known at build time."""
    info = call.ty
    if not isinstance(info, relax.TensorType) or getattr(info, "shape", None) is None:
        return None
    shape = static_ints(info.shape)
    return None if shape is None else (shape, str(info.dtype))


def _matches(value: np.ndarray, call: relax.Call) -> bool:
    return _static_type(call) == (list(value.shape), str(value.dtype))


@relax.expr_functor.mutator
class _Folder(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.module = mod

    def _value(self, arg):
        """A call argument's value in numpy terms (a constant through the variable bound to it), or
        None where it is not known at build time."""
        if isinstance(arg, relax.Var):
            bound = self.lookup_binding(arg)
            arg = bound if bound is not None else arg
        if isinstance(arg, tvm.ir.expr.Constant) and hasattr(arg.value, "numpy"):
            return arg.value.numpy()
        if isinstance(arg, relax.ShapeExpr):
            values = [getattr(v, "value", None) for v in arg.values]
            return None if any(v is None for v in values) else values
        if isinstance(arg, relax.Tuple):
            fields = [self._value(f) for f in arg.fields]
            return None if any(f is None for f in fields) else fields
        if not isinstance(getattr(arg, "value", None), (int, float)):   # a PrimValue: the IntImm or FloatImm in it
            arg = getattr(arg, "value", arg)
        dtype = str(getattr(getattr(arg, "ty", None), "dtype", ""))
        if isinstance(getattr(arg, "value", None), (int, float)) and dtype in _DTYPES:
            return np.asarray(arg.value, dtype)   # an IntImm or FloatImm, rounded to its own dtype as TVM does
        return None

    def _prepacked(self, call: relax.Call):
        """A call_tir of a weight-prepack scatter on a constant (prepack_folding), else None."""
        if len(call.args) != 2 or not isinstance(call.args[1], relax.Tuple) or len(call.args[1].fields) != 1:
            return None
        func = self.module.functions.get(call.args[0]) if isinstance(call.args[0], relax.GlobalVar) else None
        weight = self._value(call.args[1].fields[0])
        result = _static_type(call)
        if not isinstance(func, tvm.tirx.PrimFunc) or not isinstance(weight, np.ndarray) or result is None:
            return None
        return evaluate_scatter(func, weight, *result)

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if isinstance(call, relax.Call) and call.op.same_as(_CALL_TIR):
            value = self._prepacked(call)
            return call if value is None else relax.const(value, str(value.dtype))
        if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op) or not call.args:
            return call
        values = [self._value(a) for a in call.args]
        if any(v is None for v in values):
            return call
        try:
            with np.errstate(all="ignore"):   # x / 0 is inf here as in the kernel
                value = evaluate(call, values)
        except (ValueError, TypeError, IndexError):   # arguments numpy reads differently: FoldConstant's
            return call
        if value is None:
            return call
        value = np.ascontiguousarray(value)
        return relax.const(value, str(value.dtype)) if _matches(value, call) else call


@tvm.transform.module_pass(opt_level=0, name="NumpyFoldConstant")
def numpy_fold_constants(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Fold the calls :func:`evaluate` covers whose inputs are all constants; dead bindings stay
    for FoldConstant's clean-up, which runs next."""
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            out.update_func(gv, _Folder(mod).visit_expr(func))
    return out
