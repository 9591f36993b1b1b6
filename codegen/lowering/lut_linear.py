"""TVM kernel for ``squeezer::lut_linear``: the packed b-bit indices are decoded to centroids inside
the reduction, so the compiled module stores and reads the packed bytes, never a dense weight
(a separate decode stage would be constant-folded back to fp32 at build time)."""

from __future__ import annotations

import math

import torch
from tvm import relax, te

from compiler.errors import BuildError

from . import register_lowering


def lut_dense_te(x, packed_t, codebook, bits: int, in_features: int):
    """(M, K) f32 x (bytes, N) u8 packed indices (byte-major, so a vector of outputs reads
    contiguous bytes) -> (M, N) f32."""
    m, n = x.shape[0], packed_t.shape[1]
    per_byte, mask = 8 // bits, (1 << bits) - 1
    k = te.reduce_axis((0, in_features), name="k")

    def weight(j, kk):
        byte = packed_t[kk // per_byte, j].astype("int32")
        return codebook[(byte >> ((kk % per_byte) * bits)) & mask]

    return te.compute((m, n), lambda i, j: te.sum(x[i, k] * weight(j, k), axis=k), name="lut_dense")


@register_lowering("lut_linear")
def lower_lut_linear(node, importer):
    x_node, packed_node, cb_node, bias_node, bits, in_features = node.args
    bb = importer.block_builder
    x = importer.env[x_node]
    if x_node.meta["val"].dtype != torch.float32:
        raise BuildError(f"squeezer::lut_linear at {node.name}: input dtype {x_node.meta['val'].dtype} "
                         "is not supported (float32 only)")
    shape = [int(d) for d in x_node.meta["val"].shape]
    lead = shape[:-1]
    n_out = int(packed_node.meta["val"].shape[0])
    x2d = bb.emit(relax.op.reshape(x, (math.prod(lead), shape[-1]))) if len(shape) != 2 else x
    # the transpose of the (constant) packed bytes is folded at build time: still packed, same size
    packed_t = bb.emit(relax.op.permute_dims(importer.env[packed_node], [1, 0]))
    y = bb.emit_te(lut_dense_te, x2d, packed_t, importer.env[cb_node], bits, in_features,
                   primfunc_name_hint="lut_dense")
    if bias_node is not None:
        y = bb.emit(relax.op.add(y, importer.env[bias_node]))
    if len(shape) != 2:
        y = bb.emit(relax.op.reshape(y, (*lead, n_out)))
    return y
