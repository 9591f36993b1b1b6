"""Portable TE kernel for clustered weights (targets without the AVX-512 kernel of sparse_kernels.py,
CUDA through dlight): the packed b-bit indices are decoded to centroids inside the reduction, so
the kernel reads the packed bytes, never a dense weight."""

from __future__ import annotations

from tvm import te


def lut_dense_te(x, packed_t, codebook, bits: int, in_features: int):
    """(M, K) f32 x (bytes, N) u8 packed indices (byte-major, so a vector of outputs reads
    contiguous bytes) -> (M, N) f32."""
    m, n = x.shape[0], packed_t.shape[1]
    per_byte, mask = 8 // bits, (1 << bits) - 1
    k = te.reduce_axis((0, in_features), name="k")

    def weight(j, kk):
        byte = packed_t[kk // per_byte, j].astype("int32")
        idx = (byte >> ((kk % per_byte) * bits)) & mask
        return codebook[idx] if len(codebook.shape) == 1 else codebook[j, idx]   # shared / per channel

    return te.compute((m, n), lambda i, j: te.sum(x[i, k] * weight(j, k), axis=k), name="lut_dense")
