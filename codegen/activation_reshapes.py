"""Elementwise activations (and a Linear's bias) moved before the reshape that separates them from their producer.

torch.export writes a Linear on a channels-last 4-D tensor (ConvNeXt's pointwise MLP, a ViT
block's MLP) as ``reshape(x, (N·H·W, C)) → addmm → reshape(·, (N, H, W, C'))``, and the GELU after
it acts on the 4-D form. A reshape is an injective op, which TVM's FuseOps does not fuse after a
matmul, so the activation ran as a pass of its own over the matmul's output (reshape, GELU,
reshape back: 6 % of convnext_tiny). ``act(reshape(x, s)) = reshape(act(x), s)`` for an
elementwise ``act``; moved, it fuses into the matmul's epilogue, and the reshapes around it cancel
(TVM's RemoveRedundantReshape)."""

from __future__ import annotations

import functools
import operator

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from .relax_functions import is_primitive

UNARY_ACTIVATIONS = ("relax.nn.gelu", "relax.nn.gelu_tanh", "relax.nn.silu", "relax.nn.relu", "relax.sigmoid",
                     "relax.tanh")


@relax.transform.function_pass(opt_level=0, name="ActivationsBeforeReshapes")
class ActivationsBeforeReshapes:
    """``act(reshape(x, s))`` → ``reshape(act(x), s)`` for the unary activations above."""

    def transform_function(self, func: relax.Function, mod: tvm.IRModule, ctx) -> relax.Function:
        if is_primitive(func):
            return func
        func = rewrite_call(_bias_pattern(), _move_bias, func)
        func = rewrite_call(_activation_pattern(), _move_activation, func)
        return rewrite_call(_pair_pattern(), _move_pair, func)   # SiLU: sigmoid(x) * x


_X, _SHAPE, _CONST = wildcard(), wildcard(), wildcard()


def _either(patterns):
    return functools.reduce(operator.or_, patterns)


def _activation_pattern():
    reshaped = is_op("relax.reshape")(_X, _SHAPE)
    return _either(is_op(name)(reshaped) for name in UNARY_ACTIVATIONS)


def _move_activation(expr: relax.Call, matches) -> relax.Expr:
    return relax.op.reshape(relax.Call(expr.op, [matches[_X]], expr.attrs), matches[_SHAPE])


def _bias_pattern():
    reshaped = is_op("relax.reshape")(_X, _SHAPE)
    return _either(is_op(name)(*args) for name in ("relax.add", "relax.multiply")
                   for args in ((reshaped, _CONST), (_CONST, reshaped)))


_A, _B, _SA, _SB = wildcard(), wildcard(), wildcard(), wildcard()
BINARY = ("relax.add", "relax.multiply", "relax.subtract", "relax.divide")


def _pair_pattern():
    return _either(is_op(name)(is_op("relax.reshape")(_A, _SA), is_op("relax.reshape")(_B, _SB)) for name in BINARY)


def _move_pair(expr: relax.Call, matches) -> relax.Expr:
    """``op(reshape(a, s), reshape(b, s))`` → ``reshape(op(a, b), s)`` for same-shaped a, b."""
    a, b = matches[_A], matches[_B]
    same = tvm_ffi.structural_equal(matches[_SA], matches[_SB]) and \
        tvm_ffi.structural_equal(a.ty.shape, b.ty.shape) and a.ty.dtype == b.ty.dtype
    return relax.op.reshape(relax.Call(expr.op, [a, b], expr.attrs), matches[_SA]) if same else expr


def _row_vector(const: relax.Expr, x: relax.Expr, shape: list[int]) -> bool:
    """A constant that broadcasts along the last axis only, which the reshape keeps."""
    if not isinstance(const, tvm.ir.expr.Constant):
        return False
    c_shape = [int(d) for d in const.ty.shape]
    x_shape = [int(d) for d in x.ty.shape] if hasattr(x.ty, "shape") and x.ty.shape is not None else None
    if not x_shape or not shape or x_shape[-1] != shape[-1]:
        return False
    return len(c_shape) <= len(x_shape) and all(d == 1 for d in c_shape[:-1]) and c_shape[-1:] in ([1], [shape[-1]], [])


def _move_bias(expr: relax.Call, matches) -> relax.Expr:
    """``add(reshape(x, s), b)`` → ``reshape(add(x, b), s)`` for a bias along the kept last axis
    (the matmul of a Linear on a 4-D input, then its bias after the reshape)."""
    x, const = matches[_X], matches[_CONST]
    shape_expr = matches[_SHAPE]
    try:
        shape = [int(d) for d in shape_expr.values]
    except (AttributeError, TypeError):
        return expr
    if not _row_vector(const, x, shape):
        return expr
    args = [x, const] if expr.args[1].same_as(const) else [const, x]
    return relax.op.reshape(relax.Call(expr.op, args, expr.attrs), shape_expr)


def activation_passes() -> list:
    """This rewrite, then the removal of the reshape pairs it leaves."""
    return [ActivationsBeforeReshapes(), relax.transform.RemoveRedundantReshape()]
