"""CPU: a max pooling left in NCHW after the layout change runs on an NHWC pool between two
transposes.

``ConvertLayout`` moves convolutions to NHWC and the pooling after them follows; a pooling whose
input comes from a kernel the layout change does not know (an integer conv of
``squeezer::int_conv2d``, which writes NCHW) stays NCHW, and there the window runs along the
unit-stride axis: scalar, 1.2 ms for resnet18's 3×3/2 pooling on 64×112×112 against ~0.1 ms in
NHWC with channels in the vector lanes. The transposes are injective and fuse into the ops
around them where they can (the next integer layer's quantize reads NCHW anyway)."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from .relax_functions import is_primitive

_TO_NHWC, _TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


def _rewrite(call: relax.Call, _matches) -> relax.Expr:
    a = call.attrs
    if a.layout != "NCHW" or a.out_layout != "NCHW":
        return call
    x = relax.op.permute_dims(call.args[0], _TO_NHWC)
    y = relax.op.nn.max_pool2d(x, a.pool_size, a.strides, a.padding, a.dilation, a.ceil_mode,
                               a.count_include_pad, layout="NHWC", out_layout="NHWC")
    return relax.op.permute_dims(y, _TO_NCHW)


@relax.transform.function_pass(opt_level=0, name="NHWCMaxPool")
class NHWCMaxPool:
    """``max_pool2d(x, NCHW)`` → ``transpose(max_pool2d(transpose(x), NHWC))``."""

    def transform_function(self, func: relax.Function, mod: tvm.IRModule, ctx) -> relax.Function:
        if is_primitive(func):
            return func
        return rewrite_call(is_op("relax.nn.max_pool2d")(wildcard()), _rewrite, func)
