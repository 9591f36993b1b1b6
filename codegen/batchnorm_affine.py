"""An inference BatchNorm that no conv absorbs, as one multiply-add per element.

FoldBatchnormToConv2D folds a BatchNorm into the conv before it. The rest (densenet's BN-ReLU on
every concatenation, a pre-activation block's BN, the BN after a ReLU) TVM decomposes into
``(x − mean) / sqrt(var + eps) · γ + β``: a subtract, a division and two more operations per
element, in kernels that read the whole concatenated feature map of every densenet layer. With
``s = γ / sqrt(var + eps)`` and ``t = β − mean · s`` computed once in float64, it is ``x · s + t``,
which is also how PyTorch's CPU kernel evaluates an inference BatchNorm (alpha and beta
precomputed per channel), so the numbers stay as close to torch as before.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from .relax_functions import is_primitive


@relax.transform.function_pass(opt_level=0, name="BatchNormAsScaleShift")
class BatchNormAsScaleShift:
    """``batch_norm(x, γ, β, mean, var)`` with constant statistics → ``(x · s + t, mean, var)``."""

    def transform_function(self, func: relax.Function, mod: tvm.IRModule, ctx) -> relax.Function:
        if is_primitive(func):
            return func
        return rewrite_call(_pattern(), _scale_shift, func)


_X = wildcard()


def _pattern():
    return is_op("relax.nn.batch_norm")(_X, is_const(), is_const(), is_const(), is_const())


def _scale_shift(call: relax.Call, matches) -> relax.Expr:
    x = matches[_X]
    ndim = getattr(x.ty, "ndim", -1)
    if ndim is None or ndim < 1 or str(getattr(x.ty, "dtype", "")) not in ("float32", "float16"):
        return call
    attrs = call.attrs
    if bool(getattr(attrs, "training", False)):
        return call
    gamma, beta, mean, var = (np.asarray(a.value.numpy(), np.float64) for a in call.args[1:])
    scale = 1.0 / np.sqrt(var + float(attrs.epsilon))
    if bool(attrs.scale):
        scale = scale * gamma
    shift = -mean * scale + (beta if bool(attrs.center) else 0.0)
    axis = int(attrs.axis) % ndim
    shape = [1] * ndim
    shape[axis] = scale.shape[0]
    dtype = str(x.ty.dtype)
    s = relax.const(scale.reshape(shape).astype(dtype))
    t = relax.const(shift.reshape(shape).astype(dtype))
    return relax.Tuple([relax.op.add(relax.op.multiply(x, s), t), call.args[3], call.args[4]])
