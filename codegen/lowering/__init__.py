"""Lowerings of ``squeezer::*`` ops to TVM kernels, one row per op (the codegen side of the
compressed-op contract in compiler/ops/library.py).

A lowering is ``fn(node, importer, ctx) -> relax.Expr``: it reads the fx node's inputs from
``importer.env`` (weights through ``ctx``, a :class:`~.context.LoweringContext`) and emits a kernel
through ``importer.block_builder``. TVM's importer calls ``fn(node, importer)``;
:func:`custom_convert_map` binds the build's context."""

from __future__ import annotations

import functools
from typing import Callable

from compiler.ops import compressed_ops

from .aten import ATEN_LOWERINGS
from .attention import lower_attention
from .bitserial import lower_bitserial_conv2d, lower_bitserial_linear
from .context import LoweringContext
from .hashed import lower_hashed_linear
from .int4 import lower_int4_conv2d, lower_int4_linear
from .integer import lower_int_conv2d, lower_int_linear
from .sparse import lower_lut_conv2d, lower_lut_linear, lower_sparse_conv2d, lower_sparse_linear

LOWERINGS: dict[str, Callable] = {
    "bitserial_linear": lower_bitserial_linear,
    "bitserial_conv2d": lower_bitserial_conv2d,
    "sparse_linear": lower_sparse_linear,
    "sparse_conv2d": lower_sparse_conv2d,
    "lut_linear": lower_lut_linear,
    "lut_conv2d": lower_lut_conv2d,
    "int_linear": lower_int_linear,
    "int_conv2d": lower_int_conv2d,
    "int4_linear": lower_int4_linear,
    "int4_conv2d": lower_int4_conv2d,
    "hashed_linear": lower_hashed_linear,
}


def custom_convert_map(ctx: LoweringContext) -> dict[str, Callable]:
    """``from_exported_program``'s ``custom_convert_map``: export key (``name.default``) -> lowering;
    our compressed ops and the aten ops TVM's importer lacks."""
    ops = compressed_ops()
    attention = {"scaled_dot_product_attention.default": functools.partial(lower_attention, ctx=ctx)} \
        if ctx.options.cpu else {}   # kept whole only for CPU builds (attention.keeps_attention)
    return {**ATEN_LOWERINGS, **attention,
            **{ops[name].export_key: functools.partial(fn, ctx=ctx) for name, fn in LOWERINGS.items() if name in ops}}


def missing_lowerings() -> list[str]:
    return sorted(set(compressed_ops()) - set(LOWERINGS))
