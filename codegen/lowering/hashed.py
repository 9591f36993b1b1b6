"""Lowering of ``squeezer::hashed_linear`` (compiler/ops/hashed.py, HashedNets): a TE reduction whose
weight operand is computed from the position inside the kernel — the same 32-bit integer hash as
the torch op, in uint32 arithmetic (wrapping mod 2**32), picks the bucket and the sign — so the
compiled module reads only the ``K`` buckets, never a dense weight. The buckets enter as a constant
argument of a kernel that also reads the activations, so constant folding cannot precompute a
dense weight from them."""

from __future__ import annotations

import math

import numpy as np
from tvm import relax, te, tirx

from compiler.errors import BuildError
from compiler.ops.hashed import MUL1, MUL2, SHIFTS, seed_offset

from .context import LoweringContext


def _u32(v: int):
    return tirx.const(v, "uint32")


def lowbias32_tir(x):
    """The hash of compiler/ops/hashed.py on a uint32 expression (products wrap mod 2**32)."""
    x = x ^ (x >> _u32(SHIFTS[0]))
    x = x * _u32(MUL1)
    x = x ^ (x >> _u32(SHIFTS[1]))
    x = x * _u32(MUL2)
    return x ^ (x >> _u32(SHIFTS[2]))


def hashed_dense_te(x, buckets, seed: int, out_features: int, in_features: int):
    """(M, K) f32 activations x the virtual (N, K) hashed weight -> (M, N) f32."""
    m, nb = x.shape[0], int(buckets.shape[0])
    kk = te.reduce_axis((0, in_features), name="k")
    off_idx, off_sign = seed_offset(2 * seed), seed_offset(2 * seed + 1)

    def weight(j, k):
        key = j.astype("uint32") * _u32(in_features) + k.astype("uint32")
        idx = lowbias32_tir(key + _u32(off_idx)) % _u32(nb)
        bit = lowbias32_tir(key + _u32(off_sign)) >> _u32(31)
        sign = tirx.const(1.0, "float32") - tirx.const(2.0, "float32") * bit.astype("float32")
        return sign * buckets[idx.astype("int32")]

    return te.compute((m, out_features), lambda i, j: te.sum(x[i, kk] * weight(j, kk), axis=kk), name="hashed_dense")


def lower_hashed_linear(node, importer, ctx: LoweringContext):
    x_node, buckets_node, bias_node, seed, out_features, in_features = node.args
    where = f"squeezer::hashed_linear at {node.name}"
    import torch

    if x_node.meta["val"].dtype != torch.float32:
        raise BuildError(f"{where}: float32 input only, got {x_node.meta['val'].dtype}")
    shape = [int(d) for d in x_node.meta["val"].shape]
    n, k = int(out_features), int(in_features)
    if shape[-1] != k:
        raise BuildError(f"{where}: input has {shape[-1]} features, the layer {k}")
    buckets = ctx.layer_constant(importer, buckets_node, "buckets", where)
    bias = ctx.layer_constant(importer, bias_node, "bias", where)
    bb = importer.block_builder
    lead, m = shape[:-1], math.prod(shape[:-1])
    x = importer.env[x_node]
    x2d = bb.emit(relax.op.reshape(x, (m, k))) if len(shape) != 2 else x
    y = bb.emit_te(hashed_dense_te, x2d, relax.const(np.ascontiguousarray(buckets, np.float32)), int(seed), n, k,
                   primfunc_name_hint="hashed_dense")
    if bias is not None:
        y = bb.emit(relax.op.add(y, relax.const(np.ascontiguousarray(bias, np.float32))))
    return bb.emit(relax.op.reshape(y, (*lead, n))) if len(shape) != 2 else y
