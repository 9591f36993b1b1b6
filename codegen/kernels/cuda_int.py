"""CUDA GEMV for the integer layers at small batch (``squeezer::int_linear`` int8 and
``int4_linear`` grouped 4-bit, compiler/ops/integer.py and int4.py): ``__dp4a``, four byte
products added into an int32 per instruction (Pascal and later), the GPU counterpart of VNNI.

The same warp-per-row shape as cuda_kernels.py (Bell & Garland's "vector" kernel): a block of
``WARPS`` warps owns ``WARPS · rpw`` output rows; its ``mb`` batch rows of activation codes are
staged once in shared memory as words of four signed bytes; the lanes of a warp stride a row's
weight words with 16-byte loads (gpu_layouts.interleave: conflict-free shared reads) and meet in a
``__shfl_xor_sync`` butterfly.

* ``dp4a`` multiplies signed by signed bytes, the activations are unsigned codes: each code is
  staged as ``q - 128`` (``word ^ 0x80808080``), and ``Σ (q - z) w = Σ (q - 128) w - (z - 128) Σ w``,
  so the per-row correction is ``(z - 128) · Σ_k W[n, k]``: the integer core stays exact.
* int8: weight words hold four int8 weights; ``y = float(acc - corr[n]) · scale[n] + bias[n]``.
* int4: a weight word holds eight nibbles (``code + 8``, the VNNI kernel's byte order: byte ``i``
  = ``W[8w + i] | W[8w + 4 + i] << 4``); ``__vsub4(word & 0x0F0F0F0F, 0x08080808)`` and the same of
  ``word >> 4`` are the signed weights of activation words ``2w`` and ``2w + 1`` (staged as two
  halves, even and odd words, so lanes read consecutive addresses). Each word's exact integer sum
  is scaled by its group's ``x_scale · w_scale[n, g]`` into a float accumulator; the groups'
  corrections are one float per row, folded into the bias at build time.
"""

from __future__ import annotations

from tvm.script import tirx as T

from ..gpu_layouts import SMEM_FLOATS, padded_words, vector_width
from .cuda_kernels import FULL_MASK, WARPS

SIGN_FLIP = 0x80808080
MAX_ROWS = 8


def config(m: int, words: int) -> tuple[int, int]:
    """(rows per warp, batch rows per block) for ``m`` batch rows of ``words`` activation words:
    the staged rows fit the static shared memory."""
    mb = max(1, min(m, MAX_ROWS, SMEM_FLOATS // max(words, 1)))
    return (4 if mb <= 2 else 2), mb


def fits(m: int, words: int) -> bool:
    return m <= MAX_ROWS and words <= SMEM_FLOATS


def _dp4a(a, b, c):
    return T.call_pure_extern("int32", "__dp4a", a, b, c)


def _signed_nibbles(word, shift: int):
    return T.call_pure_extern("int32", "__vsub4", T.bitwise_and(T.shift_right(word, shift), T.int32(0x0F0F0F0F)),
                              T.int32(0x08080808))


def int_gemv(M: int, K: int, N: int, int4: bool, group_size: int = 0, rpw: int = 4, mb: int = 1):
    """PrimFunc ``(XQ (M, Kp) u8 codes, W (N, Wp) i32, C (N,) i32 or S (N, G) f32, SC (N,) f32,
    BI (N,) f32, Y (M, N) f32)``; ``Kp`` a multiple of 4 (int8) or 8 (int4) with zero codes at
    padding, weight words from :func:`codegen.gpu_layouts.interleave` (int4: one word per 8 inputs)."""
    per_word = 8 if int4 else 4
    KA = -(-K // per_word) * per_word // 4          # activation words
    KW = KA // 2 if int4 else KA                    # weight words (natural order)
    v, KWp = vector_width(KW), padded_words(KW)
    CH, nch, RB = 32 * v, padded_words(KW) // (32 * vector_width(KW)), WARPS * rpw
    nblk, mt, G = -(-N // RB), -(-M // mb), (-(-K // group_size) if int4 else 1)
    halves = 2 if int4 else 1

    @T.prim_func
    def f(XQ: T.Buffer((M, KA * 4), "uint8"), W: T.Buffer((N, KWp), "int32"), C: T.Buffer((N,), "int32"),
          S: T.Buffer((N, G), "float32"), SC: T.Buffer((N,), "float32"), BI: T.Buffer((N,), "float32"),
          Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        XW = T.decl_buffer((M, KA), "int32", data=XQ.data)
        for by in T.thread_binding(mt, thread="blockIdx.y"):
            for bx in T.thread_binding(nblk, thread="blockIdx.x"):
                for ty in T.thread_binding(WARPS, thread="threadIdx.y"):
                    for tx in T.thread_binding(32, thread="threadIdx.x"):
                        A = T.alloc_buffer((mb, halves, KWp), "int32", scope="shared")
                        wv = T.alloc_buffer((rpw, v), "int32", scope="local")
                        acc = T.alloc_buffer((rpw, mb), "int32", scope="local")
                        facc = T.alloc_buffer((rpw, mb), "float32", scope="local")
                        # 1. stage the block's activation words as signed bytes (q - 128); zero past K
                        for b in range(mb):
                            for q in range(-(-(halves * KWp) // (WARPS * 32))):
                                if q * WARPS * 32 + ty * 32 + tx < halves * KWp:
                                    A[b, (q * WARPS * 32 + ty * 32 + tx) % halves,
                                      (q * WARPS * 32 + ty * 32 + tx) // halves] = T.if_then_else(
                                        by * mb + b < M and q * WARPS * 32 + ty * 32 + tx < KA,
                                        T.bitwise_xor(XW[T.min(by * mb + b, M - 1),
                                                         T.min(q * WARPS * 32 + ty * 32 + tx, KA - 1)],
                                                      T.int32(SIGN_FLIP - (1 << 32))), T.int32(0))
                        T.tvm_storage_sync("shared")
                        for r in T.unroll(rpw):
                            for b in T.unroll(mb):
                                acc[r, b] = 0
                                facc[r, b] = T.float32(0)
                        # 2. rpw rows per warp: the chunk's loads issued before its dot products
                        for c in range(nch):
                            for r in T.unroll(rpw):   # rows past N re-read the last row, unstored
                                if v > 1:
                                    wv[r, T.Ramp(0, 1, v)] = W[T.min(bx * RB + ty * rpw + r, N - 1),
                                                               T.Ramp(c * CH + tx * v, 1, v)]
                                else:
                                    wv[r, 0] = W[T.min(bx * RB + ty * rpw + r, N - 1), c * CH + tx]
                            for r in T.unroll(rpw):
                                for j in T.unroll(v):
                                    for b in T.unroll(mb):
                                        if int4:
                                            facc[r, b] = facc[r, b] + T.Cast("float32", _dp4a(
                                                _signed_nibbles(wv[r, j], 0), A[b, 0, c * CH + 32 * j + tx], _dp4a(
                                                    _signed_nibbles(wv[r, j], 4), A[b, 1, c * CH + 32 * j + tx], 0))) \
                                                * S[T.min(bx * RB + ty * rpw + r, N - 1),
                                                    T.min((c * CH + 32 * j + tx) * 8 // (group_size or 1), G - 1)]
                                        else:
                                            acc[r, b] = _dp4a(wv[r, j], A[b, 0, c * CH + 32 * j + tx], acc[r, b])
                        # 3. warp sums and the epilogue (lane 0 writes)
                        for r in T.unroll(rpw):
                            for b in T.unroll(mb):
                                for o in T.unroll(5):
                                    if int4:
                                        facc[r, b] = facc[r, b] + T.call_pure_extern(
                                            "float32", "__shfl_xor_sync", T.uint32(FULL_MASK), facc[r, b], 16 >> o, 32)
                                    else:
                                        acc[r, b] = acc[r, b] + T.call_pure_extern(
                                            "int32", "__shfl_xor_sync", T.uint32(FULL_MASK), acc[r, b], 16 >> o, 32)
                                if tx == 0 and by * mb + b < M and bx * RB + ty * rpw + r < N:
                                    if int4:
                                        Y[by * mb + b, bx * RB + ty * rpw + r] = facc[r, b] + BI[bx * RB + ty * rpw + r]
                                    else:
                                        Y[by * mb + b, bx * RB + ty * rpw + r] = (
                                            T.Cast("float32", acc[r, b] - C[bx * RB + ty * rpw + r])
                                            * SC[bx * RB + ty * rpw + r] + BI[bx * RB + ty * rpw + r])
    return f
