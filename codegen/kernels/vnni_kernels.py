"""Integer GEMM on AVX-512 VNNI: ``vpdpbusd`` multiplies 64 unsigned activation bytes by 64 signed
weight bytes and adds each group of four products into one of 16 int32 lanes — 64 multiply-adds
per instruction against an fp32 FMA's 16, the unit ``squeezer::int_linear`` / ``int_conv2d``
(compiler/ops/integer.py) run on.

Layout (the MLAS / oneDNN u8s8s32 scheme):
* A (activations): ``(M, Kp)`` uint8 codes, K padded with zero codes to a multiple of 4, read as
  uint32 words of four consecutive codes. One word is broadcast to all 16 lanes.
* B (weights): ``(Np/16, Kp/4, 16)`` uint32 packed at build time by :func:`pack_weights`: the
  word at ``[j, k, l]`` holds the four int8 weights ``W[16 j + l, 4 k .. 4 k + 3]``, so one 64-byte
  load feeds 16 output columns with four products each. Padding weights are 0.
* A register tile of ``rows`` × ``vectors`` × 16 int32 accumulators stays in zmm registers over
  the whole K loop; the epilogue subtracts ``zero_point * sum_k W[n, k]`` (exact, int32) and
  scales: ``y = float(acc - corr[n]) * scale[n] + bias[n]``.

The integer core is exact while ``|sum| < 2^31`` (K up to 66,000 at 8 bits).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T

from ..target import cpu_has
from . import int_output
from .int_output import Output

LANES = 16          # int32 accumulators per zmm register
_DPBUSD = "llvm.x86.avx512.vpdpbusd.512"


def vnni_available(target) -> bool:
    """An llvm target whose CPU has AVX512-VNNI (512-bit ``vpdpbusd``)."""
    return cpu_has(target, "avx512vnni")


def padded(n: int, to: int) -> int:
    return -(-n // to) * to


def pack_weights(codes: np.ndarray, cols: int | None = None, k_pad: int | None = None) -> np.ndarray:
    """(N, K) int8 codes -> (cols/16, k_pad/4, 16) uint32 (module docstring), zero-padded to
    ``cols`` columns (default: whole blocks of 16) and ``k_pad`` inputs (default: a multiple of 4)."""
    n, k = codes.shape
    full = np.zeros((cols or padded(n, LANES), k_pad or padded(k, 4)), np.int8)
    full[:n, :k] = codes
    blocks = full.reshape(-1, LANES, full.shape[1] // 4, 4).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(blocks).view(np.uint32).reshape(blocks.shape[:3])


def tile_shape(m: int, n_blocks: int) -> tuple[int, int]:
    """(rows, vectors) of the register tile: 24 accumulators for large M (6 rows × 64 columns),
    16 when the column blocks come in pairs only; a short M uses all its rows in one tile."""
    vectors = next(v for v in (4, 2, 1) if n_blocks % v == 0)
    rows = {4: 6, 2: 8, 1: 8}[vectors]
    return (m if m < rows else rows), vectors


@T.macro
def _zero(acc, rows: T.int32, vectors: T.int32):
    for r in T.unroll(rows):
        for v in T.unroll(vectors):
            for lane in T.vectorized(LANES):
                acc[r, v * LANES + lane] = T.int32(0)


def _dpbusd(acc, r, v, a_word, b, n0, kk):
    return T.call_llvm_pure_intrin("int32x16", _DPBUSD, acc[r, T.Ramp(v * LANES, 1, LANES)],
                                   T.reinterpret("int8x64", T.Broadcast(a_word, LANES)),
                                   T.reinterpret("int8x64", b[n0 + v, kk, T.Ramp(0, 1, LANES)]))


def int8_gemm(m: int, k_words: int, n_blocks: int, n: int, out: Output) -> tvm.tirx.PrimFunc:
    """PrimFunc ``(a (M, Kp) u8, b (Np/16, Kp/4, 16) u32, corr (Np,) i32, scale (Np,) f32,
    bias (Np,) f32, clamp (2,) f32, y)`` with ``Np = 16 n_blocks``; ``y`` the (M, n) product as
    ``out`` says (int_output.py)."""
    rows, vectors = tile_shape(m, n_blocks)
    tiles, panels, n_cols = -(-m // rows), n_blocks // vectors, n_blocks * LANES
    store, fill = int_output.store(n, out), int_output.fill_border(n, out)

    @T.prim_func
    def gemm(a: T.Buffer((m, k_words * 4), "uint8"), b: T.Buffer((n_blocks, k_words, LANES), "uint32"),
             corr: T.Buffer((n_cols,), "int32"), scale: T.Buffer((n_cols,), "float32"),
             bias: T.Buffer((n_cols,), "float32"), clamp: T.Buffer((2,), "float32"),
             y: T.Buffer(out.shape, out.dtype)):
        T.func_attr({"tirx.noalias": True})
        flat = T.decl_buffer((int_output.flat_size(out),), out.dtype, data=y.data)
        words = T.decl_buffer((m, k_words), "uint32", data=a.data)
        fill(flat)
        for t in T.parallel(panels * tiles):   # panel-major: a weight panel stays in L2 across row tiles
            n0 = t // tiles * vectors
            m0 = t % tiles * rows
            acc = T.decl_buffer((rows, vectors * LANES), "int32", scope="local")
            _zero(acc, rows, vectors)
            for kk in range(k_words):
                for r in T.unroll(rows):
                    for v in T.unroll(vectors):   # rows past M repeat the last row, unstored
                        acc[r, T.Ramp(v * LANES, 1, LANES)] = _dpbusd(acc, r, v, words[T.min(m0 + r, m - 1), kk], b,
                                                                     n0, kk)
            store(acc, flat, corr, scale, bias, clamp, m0, n0 * LANES, m, rows, vectors)

    return gemm


def int8_conv2d(batch: int, padded_hw: tuple[int, int], c_words: int, kernel: tuple[int, int],
                stride: tuple[int, int], dilation: tuple[int, int], out_hw: tuple[int, int],
                n_out: int, out: Output) -> tvm.tirx.PrimFunc:
    """Implicit-GEMM conv: PrimFunc ``(p (B, Hp, Wp, Cp) u8, b, corr, scale, bias, clamp, y)`` (``y``
    the (B·OH·OW, N) rows as ``out`` says)
    with ``p`` the zero-point-padded NHWC codes (read four channels, one word, at a time) and ``b`` packed from the
    weights in ``(ky, kx, c)`` order (channels padded to Cp); rows are output pixels. The A word of
    row ``(b, oy, ox)`` at tap ``(ky, kx)`` is read straight from ``p``: no im2col copy."""
    (hp, wp), (kh, kw), (sh, sw), (dh, dw), (oh, ow) = padded_hw, kernel, stride, dilation, out_hw
    m, n_blocks = batch * oh * ow, -(-n_out // LANES)
    rows, vectors = tile_shape(m, n_blocks)
    tiles, panels, n_cols = -(-m // rows), n_blocks // vectors, n_blocks * LANES
    store, fill = int_output.store(n_out, out), int_output.fill_border(n_out, out)

    @T.prim_func
    def conv(p: T.Buffer((batch, hp, wp, c_words * 4), "uint8"),
             b: T.Buffer((n_blocks, kh * kw * c_words, LANES), "uint32"),
             corr: T.Buffer((n_cols,), "int32"), scale: T.Buffer((n_cols,), "float32"),
             bias: T.Buffer((n_cols,), "float32"), clamp: T.Buffer((2,), "float32"),
             y: T.Buffer(out.shape, out.dtype)):
        T.func_attr({"tirx.noalias": True})
        flat = T.decl_buffer((int_output.flat_size(out),), out.dtype, data=y.data)
        words = T.decl_buffer((batch, hp, wp, c_words), "uint32", data=p.data)
        fill(flat)
        for t in T.parallel(panels * tiles):
            n0 = t // tiles * vectors
            m0 = t % tiles * rows
            acc = T.decl_buffer((rows, vectors * LANES), "int32", scope="local")
            _zero(acc, rows, vectors)
            for ky, kx, cw in T.grid(kh, kw, c_words):
                for r in T.unroll(rows):
                    for v in T.unroll(vectors):
                        acc[r, T.Ramp(v * LANES, 1, LANES)] = _dpbusd(
                            acc, r, v,
                            words[T.min(m0 + r, m - 1) // (oh * ow), T.min(m0 + r, m - 1) // ow % oh * sh + ky * dh,
                              T.min(m0 + r, m - 1) % ow * sw + kx * dw, cw],
                            b, n0, (ky * kw + kx) * c_words + cw)
            store(acc, flat, corr, scale, bias, clamp, m0, n0 * LANES, m, rows, vectors)

    return conv
