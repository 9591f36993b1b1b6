"""An average pooling after a pointwise (1×1, stride-1, unpadded) convolution runs before it.

Both are linear and act on different axes (the pooling averages pixels, the 1×1 convolution mixes
channels per pixel), so ``avg_pool(W·x + b) = W·avg_pool(x) + b`` for an unpadded pooling: the
convolution then runs on the pooled map, 1/(kh·kw) of the pixels. DenseNet's transition layers are
BN → ReLU → 1×1 conv → 2×2/2 average pooling; swapped, their convolutions (11 % of densenet121's
MACs) take a quarter of the MACs; before a global pooling, a 1×1 conv runs on one pixel. A padded
pooling would average the bias into its zero borders differently, and a convolution whose output
has other users would run twice: both are left alone.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from .relax_functions import is_primitive
from .transpose_sinking import use_counts

_X, _W, _B = wildcard(), is_const(), is_const()
_CONV = is_op("relax.nn.conv2d")(_X, _W)
_BIASED = is_op("relax.add")(_CONV, _B)


def _pointwise(conv: relax.Call) -> bool:
    a = conv.attrs
    w = conv.args[1].ty
    return str(a.data_layout) == "NCHW" and str(a.kernel_layout) == "OIHW" and str(a.out_layout) == "NCHW" \
        and [int(v) for v in a.strides] == [1, 1] and [int(v) for v in a.padding] == [0, 0, 0, 0] \
        and [int(v) for v in a.dilation] == [1, 1] and [int(d) for d in list(w.shape)[2:]] == [1, 1]


def _pixel_average(pool: relax.Call) -> bool:
    """An unpadded NCHW average over pixels: a pooling, or the mean over H and W (global pooling)."""
    a = pool.attrs
    if pool.op.name == "relax.mean":
        return a.axis is not None and bool(a.keepdims) and sorted(int(v) % 4 for v in a.axis) == [2, 3]
    padding = [int(v) for v in a.padding] if hasattr(a, "padding") else [0]   # adaptive pooling: none
    return str(a.layout) == "NCHW" and str(a.out_layout) == "NCHW" and not any(padding)


def _pooled(pool: relax.Call, x: relax.Expr) -> relax.Expr:
    a = pool.attrs
    if pool.op.name == "relax.mean":
        return relax.op.mean(x, axis=[2, 3], keepdims=True)
    if pool.op.name == "relax.nn.adaptive_avg_pool2d":
        return relax.op.nn.adaptive_avg_pool2d(x, a.output_size, layout="NCHW", out_layout="NCHW")
    return relax.op.nn.avg_pool2d(x, a.pool_size, a.strides, a.padding, a.dilation, a.ceil_mode, a.count_include_pad,
                                  layout="NCHW", out_layout="NCHW")


def _channel_bias(bias: relax.Expr, out_channels: int) -> bool:
    """A bias constant over the pixels (per channel, or one value), which the pooling leaves as is."""
    shape = [int(d) for d in bias.ty.shape]
    if len(shape) == 4:
        return shape[0] == shape[2] == shape[3] == 1 and shape[1] in (1, out_channels)
    return all(d == 1 for d in shape)


@relax.transform.function_pass(opt_level=0, name="PoolBeforePointwiseConv")
class PoolBeforePointwiseConv:
    """``avg_pool2d(conv2d_1x1(x) [+ b])`` → ``conv2d_1x1(avg_pool2d(x)) [+ b]`` (adaptive pooling,
    and the mean over H and W that a global one is, too)."""

    def transform_function(self, func: relax.Function, mod: tvm.IRModule, ctx) -> relax.Function:
        if is_primitive(func):
            return func
        single = _single_use_values(func)

        def swap(pool: relax.Call, matches) -> relax.Expr:
            inner = pool.args[0]
            conv = matches[_CONV]
            bias = matches.get(_B) if _B in matches else None
            used_once = [inner] if bias is None else [inner, matches[_BIASED].args[0]]   # + the conv's, under the add
            if not (_pointwise(conv) and _pixel_average(pool) and all(_once(e, single) for e in used_once)):
                return pool
            if bias is not None and not _channel_bias(bias, int(conv.args[1].ty.shape[0])):
                return pool
            c = conv.attrs
            out = relax.op.nn.conv2d(_pooled(pool, matches[_X]), conv.args[1], c.strides, c.padding, c.dilation,
                                     c.groups, c.data_layout, c.kernel_layout, c.out_layout, c.out_dtype)
            return out if bias is None else relax.op.add(out, bias)

        pooling = is_op("relax.nn.avg_pool2d") | is_op("relax.nn.adaptive_avg_pool2d") | is_op("relax.mean")
        pattern = pooling(_BIASED | _CONV)
        return rewrite_call(pattern, swap, func)


def _once(expr: relax.Expr, single: list[tuple[relax.Var, relax.Expr]]) -> bool:
    """Whether ``expr`` (a variable, or the value bound to one) is used by one expression only."""
    return any(expr.same_as(var) or expr.same_as(value) for var, value in single)


def _single_use_values(func: relax.Function) -> list[tuple[relax.Var, relax.Expr]]:
    """(variable, value) of the bindings whose variable exactly one expression of ``func`` reads."""
    reads = use_counts(func)
    return [(b.var, b.value) for block in func.body.blocks for b in block.bindings
            if isinstance(b, relax.VarBinding) and reads.get(b.var, 0) == 1]
