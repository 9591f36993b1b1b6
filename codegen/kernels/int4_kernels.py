"""Grouped 4-bit weights on AVX-512 VNNI: ``squeezer::int4_linear`` / ``int4_conv2d``
(compiler/ops/int4.py), the weights read as packed nibbles and widened in registers.

Layout:
* A: the zero-point-padded NHWC activation codes ``(B, Hp, Wp, Cg)`` uint8, channels padded with
  zero codes to ``Cg = G · group_size`` (whole groups); a Linear's rows are ``(M, 1, 1, Cg)``.
* B: ``(Np/16, T·Cg/8, 16)`` uint32 from :func:`pack_weights`: the word at ``[j, w, l]`` holds the
  eight weights ``W[16 j + l, 8 w .. 8 w + 7]`` (K in ``(tap, channel)`` order) as ``code + 8``,
  byte ``i`` = ``W[8w + i] | W[8w + 4 + i] << 4``. So ``word & 0x0F0F0F0F`` minus 8 per byte is
  the int8 weights of A word ``2w`` and ``(word >> 4) & 0x0F0F0F0F`` minus 8 those of ``2w + 1``:
  one 64-byte load feeds two ``vpdpbusd`` of 16 columns, half the bytes of the int8 kernel.
* Per group an int32 register tile accumulates exactly; at the group's end
  ``facc += float(iacc - corr[g, n]) · scale[g, n]`` (``corr = z · Σ_{k∈g} W[n, k]``,
  ``scale = x_scale · w_scale[n, g]``), and the epilogue adds the bias (int_output.py: the
  clamp, requantize and border fusions of the int8 kernels apply unchanged).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T

from . import int_output
from .int_output import Output
from .vnni_kernels import LANES, _DPBUSD, _zero

WORD = 8            # 4-bit codes per uint32 word
LOW_NIBBLES = 0x0F0F0F0F


def nibble_words(codes: np.ndarray) -> np.ndarray:
    """(N, K) int8 codes, K a multiple of 8 -> (N, K/8) uint32 words (module docstring's byte order)."""
    n = codes.shape[0]
    u = (codes.astype(np.int16) + 8).astype(np.uint8).reshape(n, -1, 2, 4)      # (n, word, half, byte)
    return np.ascontiguousarray(u[:, :, 0, :] | (u[:, :, 1, :] << 4)).view(np.uint32).reshape(n, -1)


def pack_weights(codes: np.ndarray, cols: int) -> np.ndarray:
    """(N, T, Cg) int8 codes (channels already padded to whole groups) -> (cols/16, T·Cg/8, 16)
    uint32 (module docstring); columns past N hold zero weights."""
    n, taps, cg = codes.shape
    full = np.zeros((cols, taps * cg), np.int8)
    full[:n] = codes.reshape(n, -1)
    words = nibble_words(full)                                                    # (cols, T·Cg/8)
    return np.ascontiguousarray(words.reshape(cols // LANES, LANES, -1).transpose(0, 2, 1))


def tile_shape(m: int, n_blocks: int) -> tuple[int, int]:
    """(rows, vectors): int32 and float32 tiles both live in zmm registers (2·rows·vectors of 32);
    one row (a GEMV) takes four column vectors to keep loads in flight."""
    if m == 1:
        return 1, next(v for v in (4, 2, 1) if n_blocks % v == 0)
    vectors = 2 if n_blocks % 2 == 0 else 1
    return min(m, 4 if vectors == 2 else 6), vectors


def _widened(b, j, w, half):
    """The 64 int8 weights of nibble half ``half`` (0: low, 1: high) of B words ``[j, w, :]``."""
    word = b[j, w, T.Ramp(0, 1, LANES)]
    shift = T.Broadcast(T.Cast("uint32", half * 4), LANES)
    nibbles = T.bitwise_and(T.shift_right(word, shift), T.Broadcast(T.uint32(LOW_NIBBLES), LANES))
    return T.reinterpret("int8x64", nibbles) - T.Broadcast(T.int8(8), 64)


def int4_conv2d(batch: int, padded_hw: tuple[int, int], channels: int, group_size: int, kernel: tuple[int, int],
                stride: tuple[int, int], dilation: tuple[int, int], out_hw: tuple[int, int], n_out: int,
                out: Output) -> tvm.tirx.PrimFunc:
    """PrimFunc ``(p (B, Hp, Wp, Cg) u8, b, corr (T·G, Np) i32, scale (T·G, Np) f32, bias (Np,) f32,
    clamp (2,) f32, y)``; ``channels`` is ``Cg``; rows of ``y`` are output pixels (int_output.py)."""
    (hp, wp), (kh, kw), (sh, sw), (dh, dw), (oh, ow) = padded_hw, kernel, stride, dilation, out_hw
    m, n_blocks, groups = batch * oh * ow, -(-n_out // LANES), channels // group_size
    rows, vectors = tile_shape(m, n_blocks)
    tiles, panels, n_cols = -(-m // rows), n_blocks // vectors, n_blocks * LANES
    c_words, g_words, w_per_tap = channels // 4, group_size // WORD, channels // WORD
    store, fill = int_output.store(n_out, out), int_output.fill_border(n_out, out)

    @T.prim_func
    def conv(p: T.Buffer((batch, hp, wp, channels), "uint8"),
             b: T.Buffer((n_blocks, kh * kw * w_per_tap, LANES), "uint32"),
             corr: T.Buffer((kh * kw * groups, n_cols), "int32"), scale: T.Buffer((kh * kw * groups, n_cols), "float32"),
             bias: T.Buffer((n_cols,), "float32"), clamp: T.Buffer((2,), "float32"),
             y: T.Buffer(out.shape, out.dtype)):
        T.func_attr({"tirx.noalias": True})
        flat = T.decl_buffer((int_output.flat_size(out),), out.dtype, data=y.data)
        words = T.decl_buffer((batch, hp, wp, c_words), "uint32", data=p.data)
        fill(flat)
        for t in T.parallel(panels * tiles):   # panel-major: a weight panel stays in L2 across row tiles
            n0 = t // tiles * vectors
            m0 = t % tiles * rows
            facc = T.decl_buffer((rows, vectors * LANES), "float32", scope="local")
            iacc = T.decl_buffer((rows, vectors * LANES), "int32", scope="local")
            for r in T.unroll(rows):
                for v in T.unroll(vectors):
                    for lane in T.vectorized(LANES):
                        facc[r, v * LANES + lane] = T.float32(0)
            for ky, kx, g in T.grid(kh, kw, groups):
                _zero(iacc, rows, vectors)
                for gw in range(g_words):
                    for v in T.unroll(vectors):
                        for half in T.unroll(2):
                            for r in T.unroll(rows):   # rows past M repeat the last row, unstored
                                iacc[r, T.Ramp(v * LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                                    "int32x16", _DPBUSD, iacc[r, T.Ramp(v * LANES, 1, LANES)],
                                    T.reinterpret("int8x64", T.Broadcast(words[
                                        T.min(m0 + r, m - 1) // (oh * ow), T.min(m0 + r, m - 1) // ow % oh * sh + ky * dh,
                                        T.min(m0 + r, m - 1) % ow * sw + kx * dw,
                                        (g * g_words + gw) * 2 + half], LANES)),
                                    _widened(b, n0 + v, (ky * kw + kx) * w_per_tap + g * g_words + gw, half))
                for r in T.unroll(rows):
                    for v in T.unroll(vectors):
                        for lane in T.vectorized(LANES):
                            facc[r, v * LANES + lane] = facc[r, v * LANES + lane] + T.Cast(
                                "float32", iacc[r, v * LANES + lane]
                                - corr[(ky * kw + kx) * groups + g, (n0 + v) * LANES + lane]) \
                                * scale[(ky * kw + kx) * groups + g, (n0 + v) * LANES + lane]
            store(facc, flat, None, None, bias, clamp, m0, n0 * LANES, m, rows, vectors)

    return conv
