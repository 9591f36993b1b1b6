"""Legalizations that keep torch's NaN semantics: NaN in → NaN out.

TVM lowers ``max(a, b)`` to ``a > b ? a : b`` (an ordered compare), so whichever operand sits
second wins when one is NaN: its ReLU (``max(x, 0)``), clip, ``maximum`` and max pooling turn a
NaN into a finite number, and a NaN image gives finite logits where torch gives NaN. These
replacements give each such op the NaN rule torch uses (``(a > b) || isnan(a)``, as in ATen's
``max_pool2d`` and ``clamp``) inside the same single loop nest TVM's own legalization produces,
so fusion and our schedules see the same shapes and the cost is a compare per element: ReLU's
``x < 0 ? 0 : x`` is one ``vmaxps`` with its operands in NaN-keeping order.

ReLU (and CELU, which the torch importer builds from ReLU), clip (ReLU6, Hardtanh, clamp),
maximum/minimum, max/min and argmax/argmin reductions and max pooling (1-3 d) are covered; ops
built from arithmetic (softmax, GELU, SiLU, ...) propagate NaN
already, and exp/erf keep it in :mod:`codegen.fast_math`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import tvm
from tvm import relax, te, tirx, topi
from tvm.relax.transform.legalize_ops.common import _try_convert_to_scalar_const

_MAGNITUDE = {"float16": 0x7FFF, "float32": 0x7FFFFFFF, "float64": 0x7FFFFFFFFFFFFFFF}
_INF_BITS = {"float16": 0x7C00, "float32": 0x7F800000, "float64": 0x7FF0000000000000}


def is_nan(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """NaN test on the bits (exponent all ones, mantissa non-zero): unlike ``x != x`` it survives
    fast-math flags and algebraic simplification."""
    x = x.asobject() if isinstance(x, te.tensor.TensorSlice) else x
    dtype = _dtype(x)
    if dtype not in _MAGNITUDE:
        return tirx.isnan(x)
    ity = "int" + dtype[len("float"):]
    return (tirx.reinterpret(ity, x) & tirx.const(_MAGNITUDE[dtype], ity)) > tirx.const(_INF_BITS[dtype], ity)


def _dtype(e) -> str:
    return str(e.ty)


def _lowest(dtype) -> tirx.PrimExpr:
    """-inf for floats (so a window of -inf pools to -inf, as in torch), else the type's minimum."""
    return tirx.const(float("-inf"), dtype) if _floating(dtype) else tirx.min_value(dtype)


def _highest(dtype) -> tirx.PrimExpr:
    return tirx.const(float("inf"), dtype) if _floating(dtype) else tirx.max_value(dtype)


def _floating(dtype) -> bool:
    return str(dtype).startswith(("float", "bfloat"))


def _finite_constant(e) -> bool:
    return isinstance(e, tirx.FloatImm) and e.value == e.value


def nan_max(a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
    """max that returns a NaN operand (either side) instead of the other one."""
    if not _floating(_dtype(a)):
        return tirx.max(a, b)
    if _finite_constant(a):
        a, b = b, a
    if _finite_constant(b):  # ReLU6/clamp bounds: one vmaxps in NaN-keeping operand order, like _relu
        return tirx.Select(a < b, b, a)
    return tirx.Select(is_nan(a) | (a > b), a, b)


def nan_min(a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
    if not _floating(_dtype(a)):
        return tirx.min(a, b)
    if _finite_constant(a):
        a, b = b, a
    if _finite_constant(b):
        return tirx.Select(a > b, b, a)
    return tirx.Select(is_nan(a) | (a < b), a, b)


NAN_MAX = te.comm_reducer(nan_max, _lowest, name="nan_max")
NAN_MIN = te.comm_reducer(nan_min, _highest, name="nan_min")


def _elementwise(x: te.Tensor, fn: Callable, name: str) -> te.Tensor:
    return te.compute(x.shape, lambda *i: fn(x(*i)), name=name, tag="elemwise")


def _relu(x: te.Tensor) -> te.Tensor:
    zero = tirx.const(0, x.dtype)
    return _elementwise(x, lambda v: tirx.Select(v < zero, zero, v), "relu")


def _clip(x: te.Tensor, lo, hi) -> te.Tensor:
    lo, hi = tirx.const(lo, x.dtype), tirx.const(hi, x.dtype)
    return _elementwise(x, lambda v: tirx.Select(v < lo, lo, tirx.Select(v > hi, hi, v)), "clip")


def _broadcast_index(shape: Sequence, out_index: Sequence) -> list:
    """Index into an operand of ``shape`` for the broadcast output position ``out_index``."""
    offset = len(out_index) - len(shape)
    return [tirx.const(0, _dtype(out_index[offset + k])) if isinstance(d, tirx.IntImm | int) and int(d) == 1
            else out_index[offset + k] for k, d in enumerate(shape)]


def _same_shape(shape: Sequence, out_shape: Sequence) -> bool:
    def dim(d):
        return int(d) if isinstance(d, int | tirx.IntImm) else d

    return len(shape) == len(out_shape) and all(
        dim(d) == dim(o) if isinstance(dim(d), int) and isinstance(dim(o), int) else tvm.ir.structural_equal(d, o)
        for d, o in zip(shape, out_shape))


def _binary(pick: Callable) -> Callable:
    def compute(a, b, out_shape: Sequence) -> te.Tensor:
        def value(operand, index):
            if isinstance(operand, te.Tensor):  # same shape: the output's index, so the func reads as elementwise
                return operand(*(index if _same_shape(operand.shape, out_shape) else
                                 _broadcast_index(operand.shape, index)))
            return operand

        dtype = (a if isinstance(a, te.Tensor) else b).dtype
        def body(*index):
            x, y = value(a, index), value(b, index)
            return pick(tirx.Cast(dtype, x) if _dtype(x) != dtype else x, tirx.Cast(dtype, y) if _dtype(y) != dtype else y)
        # "elemwise" when nothing broadcasts (a tensor and a scalar, as in clip's min/max): only that
        # pattern fuses into a conv/matmul epilogue, "broadcast" would leave it a pass of its own
        same = all(not isinstance(t, te.Tensor) or _same_shape(t.shape, out_shape) for t in (a, b))
        return te.compute(out_shape, body, name="nan_binary", tag="elemwise" if same else "broadcast")
    return compute


def _reduce(reducer) -> Callable:
    def compute(x: te.Tensor, axis, keepdims: bool) -> te.Tensor:
        ndim = len(x.shape)
        axes = sorted(int(a) % ndim for a in (range(ndim) if axis is None else axis))
        rvars = {a: te.reduce_axis((0, x.shape[a]), name=f"r{a}") for a in axes}

        def body(*out):
            it = iter(out)
            index = []
            for d in range(ndim):
                if d in rvars:
                    index.append(rvars[d].var)
                    if keepdims:
                        next(it)
                else:
                    index.append(next(it))
            return reducer(x(*index), axis=[rvars[a] for a in axes])

        shape = [1 if d in rvars else x.shape[d] for d in range(ndim)] if keepdims else \
            [x.shape[d] for d in range(ndim) if d not in rvars]
        return te.compute(shape, body, name="nan_reduce", tag="comm_reduce")
    return compute


def _arg_reducer(greater: bool):
    """(index, value) reducer of argmax/argmin with torch's rules: a NaN wins (it is the maximum and
    the minimum), ties and several NaN go to the lowest index."""
    def fcombine(x, y):
        (xi, xv), (yi, yv) = x, y
        x_nan, y_nan = is_nan(xv), is_nan(yv)
        first = xi < yi
        better = (xv > yv) if greater else (xv < yv)
        take_x = (x_nan & (~y_nan | first)) | (~y_nan & (better | ((xv == yv) & first)))
        return tirx.Select(take_x, xi, yi), tirx.Select(take_x, xv, yv)

    def fidentity(index_dtype, value_dtype):
        return tirx.const(-1, index_dtype), (_highest(value_dtype) if not greater else _lowest(value_dtype))

    return te.comm_reducer(fcombine, fidentity, name="nan_argmax" if greater else "nan_argmin")


def _arg_reduce(greater: bool) -> Callable:
    """(indices, values) of an arg-reduction over one ``axis``; both are outputs, so no stage needs
    a global scratch buffer (which CUDA cannot allocate)."""
    reducer = _arg_reducer(greater)

    def compute(x: te.Tensor, axis: int, keepdims: bool) -> tuple[te.Tensor, te.Tensor]:
        k = te.reduce_axis((0, x.shape[axis]), name="k")

        def body(*out):
            index = list(out)
            if keepdims:
                index[axis] = k.var
            else:
                index.insert(axis, k.var)
            return reducer((k.var.astype("int64"), x(*index)), axis=k)

        shape = [1 if d == axis else x.shape[d] for d in range(len(x.shape))] if keepdims else \
            [x.shape[d] for d in range(len(x.shape)) if d != axis]
        return te.compute(shape, body, name="arg")
    return compute


def _layout_axes(layout: str) -> list[str]:
    axes = re.findall(r"\d*[A-Za-z]", layout)
    if "".join(axes) != layout:
        raise ValueError(f"unparsable layout {layout!r}")
    return axes


def _max_pool(x: te.Tensor, kernel, strides, dilation, padding, layout: str, out_shape) -> te.Tensor:
    """Max pooling with the NaN-keeping reducer; padding reads as -inf, as in torch. The output
    shape (ceil_mode included) comes from Relax's shape inference."""
    axes = _layout_axes(layout)
    spatial = [axes.index(c) for c in "DHW" if c in axes][-len(kernel):]
    before = list(padding[:len(kernel)])
    rk = [te.reduce_axis((0, int(k)), name=f"k{n}") for n, k in enumerate(kernel)]
    low = _lowest(x.dtype)

    def body(*out):
        index, inside = list(out), []
        for n, axis in enumerate(spatial):
            pos = out[axis] * int(strides[n]) + rk[n].var * int(dilation[n]) - int(before[n])
            index[axis] = pos
            inside += [pos >= 0, pos < x.shape[axis]]
        cond = inside[0]
        for c in inside[1:]:
            cond = tirx.And(cond, c)
        return NAN_MAX(tirx.if_then_else(cond, x(*index), low), axis=rk)

    return te.compute(out_shape, body, name="pool_max", tag="pool_max")


def _pool_legalization(name: str) -> Callable:
    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        attrs = call.attrs
        if attrs.out_layout != attrs.layout:
            return call
        shape = [int(d) if isinstance(d, tirx.IntImm) else d for d in call.ty.shape.values]
        return bb.call_te(_max_pool, call.args[0], kernel=list(attrs.pool_size), strides=list(attrs.strides),
                          dilation=list(attrs.dilation), padding=list(attrs.padding), layout=str(attrs.layout),
                          out_shape=shape, primfunc_name_hint=name)
    return legalize


def _unary(fn: Callable, name: str) -> Callable:
    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        return bb.call_te(fn, call.args[0], primfunc_name_hint=name)
    return legalize


def _clip_legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    lo, hi = (a.value.value if isinstance(a.value, tirx.FloatImm | tirx.IntImm) else a.value for a in call.args[1:3])
    return bb.call_te(_clip, call.args[0], lo, hi, primfunc_name_hint="clip")


def _binary_legalize(pick: Callable, name: str) -> Callable:
    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        a, b = call.args[0], _try_convert_to_scalar_const(call.args[1])
        if isinstance(b, relax.Expr):
            a = _try_convert_to_scalar_const(a)
        shape = list(call.ty.shape.values)
        return bb.call_te(_binary(pick), a, b, shape, primfunc_name_hint=name)
    return legalize


def _arg_legalize(greater: bool, name: str) -> Callable:
    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        x, keepdims = call.args[0], bool(call.attrs.keepdims)
        ndim = x.ty.ndim
        if call.attrs.axis is None:   # over every element: a flat view, reshaped back for keepdims
            x, axis = bb.normalize(relax.op.reshape(x, [-1])), 0
        else:
            axis = int(call.attrs.axis) % ndim
        pair = bb.call_te(_arg_reduce(greater), x, axis, keepdims and call.attrs.axis is not None,
                          primfunc_name_hint=name)
        indices = bb.normalize(relax.TupleGetItem(pair, 0))
        if call.attrs.axis is None and keepdims:
            indices = bb.normalize(relax.op.reshape(indices, [1] * ndim))
        return indices
    return legalize


def _reduce_legalize(reducer, name: str) -> Callable:
    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        axis = None if call.attrs.axis is None else [int(a) for a in call.attrs.axis]
        return bb.call_te(_reduce(reducer), call.args[0], axis, bool(call.attrs.keepdims), primfunc_name_hint=name)
    return legalize


def nan_legalizations() -> dict[str, Callable]:
    """``LegalizeOps(customize_legalize_map=...)`` entries for every op whose stock lowering
    drops NaN."""
    return {
        "relax.nn.relu": _unary(_relu, "relu"),
        "relax.clip": _clip_legalize,
        "relax.maximum": _binary_legalize(nan_max, "maximum"),
        "relax.minimum": _binary_legalize(nan_min, "minimum"),
        "relax.max": _reduce_legalize(NAN_MAX, "max"),
        "relax.min": _reduce_legalize(NAN_MIN, "min"),
        "relax.argmax": _arg_legalize(True, "argmax"),
        "relax.argmin": _arg_legalize(False, "argmin"),
        **{f"relax.nn.max_pool{d}d": _pool_legalization(f"max_pool{d}d") for d in (1, 2, 3)},
    }
    return table
