"""CUDA lowering of the integer Linears at small batch on the ``__dp4a`` GEMV
(kernels/cuda_int.py): the weight words, per-row corrections and scales it reads, built here from
the layer's codes. Larger batches and convs keep the portable TE kernels."""

from __future__ import annotations

import numpy as np
from tvm import relax

from ..gpu_layouts import interleave
from ..kernels import cuda_int, gpu_verified
from ..kernels.int4_kernels import nibble_words

KERNEL = "int_gemv_dp4a"
STAGED = 128          # dp4a stages activation codes shifted by -128 (cuda_int.py)


def applies(ctx, rows: int, k: int) -> bool:
    """Whether a Linear of ``rows`` batch rows and ``k`` inputs runs on the dp4a GEMV."""
    return bool(ctx.options.cuda) and cuda_int.fits(rows, -(-k // 4)) and gpu_verified.allowed(KERNEL)


def int8_arrays(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray, zero: int) -> list[np.ndarray]:
    """W (N, words) int32, C (N,) int32, S (N, 1) unused, SC (N,), BI (N,) of an int8 layer."""
    n, k = codes.shape
    full = np.zeros((n, -(-k // 4) * 4), np.int8)
    full[:, :k] = codes
    words = interleave(full.view("<u4").astype(np.uint32)).view(np.int32)
    corr = ((zero - STAGED) * codes.astype(np.int64).sum(1)).astype(np.int32)
    return [words, corr, np.zeros((n, 1), np.float32), scale.astype(np.float32), bias.astype(np.float32)]


def int4_arrays(codes: np.ndarray, group_scale: np.ndarray, bias: np.ndarray, zero: int,
                group_size: int) -> list[np.ndarray]:
    """W, C (unused), S (N, G) f32 = x_scale · w_scale, SC (unused), BI (N,) with the groups'
    corrections folded in, of a grouped 4-bit Linear with (N, K) codes."""
    n, k = codes.shape
    full = np.zeros((n, -(-k // 8) * 8), np.int8)
    full[:, :k] = codes
    words = interleave(nibble_words(full)).view(np.int32)
    g = group_scale.shape[1]
    sums = np.zeros((n, g * group_size), np.int64)
    sums[:, :k] = codes
    per_group = sums.reshape(n, g, group_size).sum(2)
    folded = bias.astype(np.float64) - ((zero - STAGED) * per_group * group_scale.astype(np.float64)).sum(1)
    return [words, np.zeros(n, np.int32), group_scale.astype(np.float32), np.zeros(n, np.float32),
            folded.astype(np.float32)]


def gemv(bb, add_kernel, a, arrays: list[np.ndarray], k: int, int4: bool, group_size: int, name: str):
    """The (M, N) float32 product of the (M, Kp) activation codes ``a`` on the dp4a GEMV."""
    m, n = int(a.ty.shape[0]), arrays[0].shape[0]
    rpw, mb = cuda_int.config(m, -(-k // 4))
    func = cuda_int.int_gemv(m, k, n, int4, group_size, rpw, mb)
    gv = add_kernel(bb, func, name)
    return bb.emit(relax.call_tir(gv, [a, *(relax.const(v) for v in arrays)], relax.TensorType((m, n), "float32")))
