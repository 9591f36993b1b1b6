"""Weight layouts of the CUDA warp-per-row kernels (kernels/cuda_kernels.py), numpy only (the GPU
benchmark builds its weights with them on a machine that has TVM's runtime alone).

A warp reads one row as chunks of ``32 * v`` 32-bit words: lane ``l`` loads the ``v`` words at
``c * 32v + v*l ...`` as one 16-byte (v=4), 8-byte or 4-byte load, coalesced across the warp.
Word ``j`` of that load stands for word ``c * 32v + 32j + l`` of the row in natural order
(:func:`interleave`), so the operand it meets in shared memory (packed activations, or the
activations themselves for the LUT kernel) is read by consecutive lanes at consecutive
addresses: no bank conflicts."""

from __future__ import annotations

import numpy as np

BINARY_CONV_WARPS = 8    # warps per block of cuda_conv.binary_conv2d; a weight tile is WARPS x rows-per-thread channels
SMEM_FLOATS = 12288       # activations staged in shared memory (48 KiB, the static limit)


def vector_width(words: int) -> int:
    """32-bit words per lane load: 4 (128-bit) for rows of at least a full 128-word chunk."""
    return 4 if words >= 128 else 2 if words >= 64 else 1


def padded_words(words: int) -> int:
    chunk = 32 * vector_width(words)
    return -(-words // chunk) * chunk


def interleave(words: np.ndarray) -> np.ndarray:
    """(N, W) uint32 rows in natural order -> (N, padded_words(W)), zero padded, each chunk's words
    placed lane-major (see the module docstring)."""
    n, w = words.shape
    v = vector_width(w)
    wp = padded_words(w)
    out = np.zeros((n, wp), np.uint32)
    out[:, :w] = words
    return np.ascontiguousarray(out.reshape(n, wp // (32 * v), v, 32).transpose(0, 1, 3, 2).reshape(n, wp))


def binary_rows(packed: np.ndarray, k_in: int) -> np.ndarray:
    """(N, bytes) bit-packed ±1 weights (bit t of byte b = input 8b + t, the op's packing) ->
    the binary GEMV's (N, padded words) uint32 layout."""
    n = packed.shape[0]
    n_words = -(-k_in // 32)
    raw = np.zeros((n, n_words * 4), np.uint8)
    take = min(raw.shape[1], packed.shape[1])
    raw[:, :take] = packed[:, :take]
    return interleave(raw.view("<u4").astype(np.uint32))


def lut_words(indices: np.ndarray, bits: int) -> int:
    return -(-indices.shape[1] // (32 // bits))


def lut_rows(indices: np.ndarray, bits: int) -> np.ndarray:
    """(N, K) uint8 cluster indices -> (N, padded words) uint32: each word holds ``32 // bits``
    indices; index ``t`` of word ``j`` of lane ``l`` in chunk ``c`` is input
    ``c * 32v * per + 32 (j * per + t) + l`` (so lane ``l`` meets activations ``l, l + 32, ...``)."""
    n, k = indices.shape
    per = 32 // bits
    w = lut_words(indices, bits)
    v, wp = vector_width(w), padded_words(w)
    kp = wp * per
    idx = np.zeros((n, kp), np.uint32)
    idx[:, :k] = indices
    idx = idx.reshape(n, wp // (32 * v), v, per, 32).transpose(0, 1, 4, 2, 3)     # n, c, l, j, t
    shifts = (np.arange(per, dtype=np.uint32) * bits).astype(np.uint32)
    words = np.bitwise_or.reduce(idx << shifts, axis=-1)
    return np.ascontiguousarray(words.reshape(n, wp).astype(np.uint32))


def lut_padded_inputs(k: int, bits: int) -> int:
    """The activations a LUT row covers after padding (what the kernel stages in shared memory)."""
    per = 32 // bits
    return padded_words(-(-k // per)) * per


def csr_narrow(row_ptr: np.ndarray, col_idx: np.ndarray, values: np.ndarray, n_cols: int,
               codebook: np.ndarray | None) -> dict[str, np.ndarray]:
    """CSR with 16-bit column indices where the columns fit (``n_cols <= 65536``), else 32-bit."""
    col_dtype = np.uint16 if n_cols <= 1 << 16 else np.int32
    out = {"values": values if codebook is not None else values.astype(np.float32),
           "col_idx": col_idx.astype(col_dtype), "row_ptr": row_ptr.astype(np.int32)}
    if col_idx.size == 0:   # kernels need non-empty buffers
        out["values"] = np.zeros(1, dtype=out["values"].dtype)
        out["col_idx"] = np.zeros(1, dtype=col_dtype)
    if codebook is not None:
        out["codebook"] = codebook.astype(np.float32)
    return out


def row_order(row_ptr: np.ndarray) -> np.ndarray:
    """Rows by decreasing length, ties in row order: the CSR SpMM's row swizzle (Sputnik, Gale et
    al. 2020), so the row groups of a warp, and the warps of a block, get similar work."""
    return np.argsort(-np.diff(np.asarray(row_ptr, np.int64)), kind="stable").astype(np.int32)


def csr_rows(row_ptr: np.ndarray, col_idx: np.ndarray, values: np.ndarray, n_cols: int,
             codebook: np.ndarray | None) -> dict[str, np.ndarray]:
    """:func:`csr_narrow` and the :func:`row_order` (the CUDA CSR SpMM, batch > 8)."""
    return {**csr_narrow(row_ptr, col_idx, values, n_cols, codebook), "order": row_order(row_ptr)}


def binary_conv_tiles(packed: np.ndarray, taps: int, c_in: int, tile: int) -> np.ndarray:
    """(N, taps * bytes) bit-packed ±1 conv weights (the op's packing: per tap, bit t of byte b is
    channel 8b + t) -> the binary conv's flat uint32 layout (tiles of ``tile`` output channels, zero
    padded): word ``(ct * taps * CW + t * CW + w) * tile + nn`` holds channels 32w.. of tap t of
    output ``ct * tile + nn`` (channel innermost: a warp's channels are one 16-byte read)."""
    n = packed.shape[0]
    cw = -(-c_in // 32)
    per_tap = packed.reshape(n, taps, -1)
    raw = np.zeros((n, taps, cw * 4), np.uint8)
    take = min(cw * 4, per_tap.shape[2])
    raw[:, :, :take] = per_tap[:, :, :take]
    words = raw.view("<u4").astype(np.uint32).reshape(n, taps * cw)
    nct = -(-n // tile)
    out = np.zeros((nct * tile, taps * cw), np.uint32)
    out[:n] = words
    return np.ascontiguousarray(out.reshape(nct, tile, taps * cw).transpose(0, 2, 1).reshape(-1))


def lut_gemm_tiles(indices: np.ndarray, bits: int, tile: int, bk: int = 32) -> np.ndarray:
    """(N, K) uint8 cluster indices -> the CUDA LUT GEMM's flat uint32 layout: per (tile of ``tile``
    outputs, step of ``bk`` inputs) ``bk / per`` words per output, word-major then output (one
    contiguous run per block and step); index ``t`` of word ``wq`` is input ``step * bk + wq * per + t``.
    Zero padded to whole tiles and steps."""
    n, k = indices.shape
    per = 32 // bits
    nbn, nbk = -(-n // tile), -(-k // bk)
    idx = np.zeros((nbn * tile, nbk * bk), np.uint32)
    idx[:n, :k] = indices
    idx = idx.reshape(nbn, tile, nbk, bk // per, per).transpose(0, 2, 3, 1, 4)     # bn, kb, wq, n, t
    shifts = (np.arange(per, dtype=np.uint32) * bits).astype(np.uint32)
    return np.ascontiguousarray(np.bitwise_or.reduce(idx << shifts, axis=-1).astype(np.uint32).reshape(-1))
