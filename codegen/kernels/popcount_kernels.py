"""Hand-written xnor-popcount kernels for pure ±1 convs and dense layers (BNN / XNOR-Net) on
AVX-512 CPUs. The conv is described here; the dense (batch >= 8) at :func:`binary_dense`.

Why not the TE kernel (bitserial_te.py): that one runs the bit-packing, the padding, XNOR-Net's K
and the popcount tiles as five parallel regions and a second kernel, allocates its accumulator
tile from the workspace pool once per tile, and writes each tile's outputs with scalar stores,
all beside a popcount loop that already runs at the core's bound (xor, ``vpopcntq``, add per 512
products on the two 512-bit ports); measurements in benchmarks/README.md. Here:

* region 1 (parallel over padded input rows): the row's channel words (64 channels per uint64,
  bit = x >= 0; spatial padding +1 on the real channels, channel padding 0 on both sides, so
  it drops out of ``popcount(a xor w)``) and, for XNOR-Net, the row's channel sums of |x|;
* region 2 (parallel over output rows, split over output-channel blocks where the rows are too
  few for the threads): per 4-8 output columns × 16 output channels, up to 16 ``vpopcntq`` accumulators
  in registers over the kernel's taps and channel words; the epilogue ``(K - 2 popcount) *
  K_xnor * alpha + bias`` per column over the 16 channels, turned into channel rows by an 8×8
  shuffle transpose and stored as runs of columns. Where no tile width divides the row, its last
  tile overlaps the one before (same values written twice), so every tile is whole.

Stride 1, dilation 1 and at least MIN_CHANNELS input channels (the conv layers of BNN / XNOR-Net
nets past the first); other convs use the TE path.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T

from ..target import cpu_has
from .work_split import two_ended


# shufflevector lane picks from two 8-lane vectors (a = 0..7, b = 8..15) for the 8×8 transpose
UNPACK_LO = [0, 8, 1, 9, 4, 12, 5, 13]
UNPACK_HI = [2, 10, 3, 11, 6, 14, 7, 15]
PAIRS_LO = [0, 1, 8, 9, 4, 5, 12, 13]
PAIRS_HI = [2, 3, 10, 11, 6, 7, 14, 15]
HALVES_LO = [0, 1, 2, 3, 8, 9, 10, 11]
HALVES_HI = [4, 5, 6, 7, 12, 13, 14, 15]
N_TILE = 16       # output channels per register tile (two 8-lane uint64 vectors)
MIN_CHANNELS = 8  # below this the TE kernel measured as fast or faster (6 channels, 5×5, batch 64: 10 %)
MIN_TASKS = 8     # split output rows over channel blocks until region 2 has this many tasks


def available(target) -> bool:
    """An x86 LLVM target with AVX-512 VPOPCNTDQ (32 vector registers for up to 16 accumulators,
    one-uop vector popcount); other targets use the TE schedule."""
    return cpu_has(target, "avx512f", "avx512vpopcntdq", x86=True)


def weight_words(words: np.ndarray) -> np.ndarray:
    """(N, ...) uint64 words -> (ceil(N/16), ..., 16): a tile's 16 outputs of one (tap and) word
    contiguous (two zmm loads); padded outputs are 0. Conv: (N, kh, kw, W); dense: (N, W)."""
    n_out = words.shape[0]
    nb = -(-n_out // N_TILE)
    out = np.zeros((nb * N_TILE, *words.shape[1:]), np.uint64)
    out[:n_out] = words
    return np.ascontiguousarray(np.moveaxis(out.reshape(nb, N_TILE, *words.shape[1:]), 1, -1))


def _shuffle8(buf, row_a, row_b, pick, start=0):
    """Lanes ``pick`` of ``buf[row_a]`` ++ ``buf[row_b]``, 8 lanes each from column ``start``."""
    return T.Shuffle([buf[row_a, T.Ramp(start, 1, 8)], buf[row_b, T.Ramp(start, 1, 8)]], pick)


def _output(acc, i, l, k_total: float, scale, alpha, bias, n):
    """``(K - 2 popcount) * scale * alpha[n] + bias[n]`` from accumulator ``acc[i, l]``."""
    return (T.float32(k_total) - T.float32(2) * T.Cast("float32", acc[i, l])) * scale * alpha[n] + bias[n]


def _column_tile(ow: int) -> int:
    """Output columns per register tile (at most 8: 2 accumulators each, 32 vector registers):
    a divisor of the width if one is at least 4, else the width that wastes the fewest columns
    in the overlapping last tile (ow=14 -> 7, 10 -> 5, 13 -> 7)."""
    if ow <= 8:
        return ow
    for t in range(8, 3, -1):
        if ow % t == 0:
            return t
    return min(range(8, 3, -1), key=lambda t: -(-ow // t) * t)


def _splits(tasks: int, n_blocks: int) -> int:
    """Channel-block groups per output row: the smallest divisor of ``n_blocks`` giving at least
    MIN_TASKS tasks, so that a batch-1 layer with few rows still feeds every thread."""
    for s in range(1, n_blocks + 1):
        if n_blocks % s == 0 and tasks * s >= MIN_TASKS:
            return s
    return n_blocks


def binary_conv2d(batch: int, c_in: int, h: int, w: int, n_out: int, kh: int, kw: int, ph: int, pw: int,
                  xnor: bool):
    """PrimFunc ``(x, wk, alpha, bias, y)``: ``y = (sum a*w) * K * alpha + bias`` for a stride-1,
    dilation-1 conv with ``a = sign(x)`` (x >= 0 -> +1, padding +1), ``wk`` from
    :func:`weight_words`, and with ``xnor`` XNOR-Net's K (channel-mean |x| averaged over the
    zero-padded window), else K = 1. Exact integer core: ``c_in*kh*kw - 2 popcount(a xor w)``."""
    oh, ow = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    hp, wp = h + 2 * ph, w + 2 * pw
    n_words = -(-c_in // 64)
    tail = c_in - 64 * (n_words - 1)                 # real channels in the last word
    nb = -(-n_out // N_TILE)
    x_tile = _column_tile(ow)
    n_xt = -(-ow // x_tile)
    split = _splits(batch * oh, nb)
    nb_per = nb // split
    n_tasks = batch * oh * split
    k_total = float(c_in * kh * kw)
    inv_window = 1.0 / (c_in * kh * kw)
    full_word = tvm.tirx.const((1 << 64) - 1, "uint64")   # (TVMScript's T.uint64 stops at 2**63)
    tail_word = tvm.tirx.const((1 << tail) - 1 if tail < 64 else (1 << 64) - 1, "uint64")
    am_shape = (batch, hp, wp) if xnor else (1,)
    lanes = min(8, w)                                # packing: one uint64 lane per position
    n_chunks = -(-w // lanes)

    @T.prim_func
    def kernel(x: T.Buffer((batch, c_in, h, w), "float32"), wk: T.Buffer((nb, kh, kw, n_words, N_TILE), "uint64"),
               alpha: T.Buffer((n_out,), "float32"), bias: T.Buffer((n_out,), "float32"),
               y: T.Buffer((batch, n_out, oh, ow), "float32")):
        T.func_attr({"tirx.noalias": True})
        a = T.alloc_buffer((batch, hp, wp, n_words), "uint64", align=64)
        am = T.alloc_buffer(am_shape, "float32", align=64)     # channel sums of |x|, 0-padded (XNOR)
        for bh in T.parallel(batch * hp):
            word = T.alloc_buffer((lanes,), "uint64", align=64)
            asum = T.alloc_buffer((lanes,), "float32", align=64)
            for ww, cw in T.grid(wp, n_words):                 # +1 on real channels (padding; real positions follow)
                a[bh // hp, bh % hp, ww, cw] = T.if_then_else(cw < n_words - 1, full_word, tail_word)
            if xnor:
                for ww in T.vectorized(wp):
                    am[bh // hp, bh % hp, ww] = T.float32(0)
            if bh % hp >= ph and bh % hp < h + ph:
                # positions in chunks of `lanes` (the last chunk overlaps the one before, so every
                # load is in bounds and every lane real); stored, not accumulated, so overlap is harmless
                for chunk in range(n_chunks):
                    s0 = T.min(chunk * lanes, w - lanes)
                    for l in T.vectorized(lanes):
                        asum[l] = T.float32(0)
                    for cw in range(n_words):
                        for l in T.vectorized(lanes):
                            word[l] = T.uint64(0)
                        for t in range(T.min(64, c_in - cw * 64)):
                            for l in T.vectorized(lanes):
                                word[l] = word[l] | T.if_then_else(
                                    x[bh // hp, cw * 64 + t, bh % hp - ph, s0 + l] >= T.float32(0),
                                    T.shift_left(T.uint64(1), T.Cast("uint64", t)), T.uint64(0))
                                if xnor:
                                    asum[l] = asum[l] + T.abs(x[bh // hp, cw * 64 + t, bh % hp - ph, s0 + l])
                        for l in range(lanes):
                            a[bh // hp, bh % hp, pw + s0 + l, cw] = word[l]
                    if xnor:
                        for l in T.vectorized(lanes):
                            am[bh // hp, bh % hp, pw + s0 + l] = asum[l]
        for task in T.parallel(n_tasks):
            acc = T.alloc_buffer((x_tile, N_TILE), "uint64", align=64)
            kv = T.alloc_buffer((8,), "float32", align=64)
            ev = T.alloc_buffer((8, N_TILE), "float32", align=64)     # outputs, [column][channel]
            t1 = T.alloc_buffer((8, 8), "float32", align=64)
            t2 = T.alloc_buffer((8, 8), "float32", align=64)
            tr = T.alloc_buffer((N_TILE, 8), "float32", align=64)     # outputs, [channel][column]
            colsum = T.alloc_buffer((wp,), "float32", align=64)
            b = task // (oh * split)
            yy = task // split % oh
            if xnor:   # K's box filter, separable: the window's rows summed once per task
                for ww in T.vectorized(wp):
                    colsum[ww] = T.float32(0)
                for qh in range(kh):
                    for ww in T.vectorized(wp):
                        colsum[ww] = colsum[ww] + am[b, yy + qh, ww]
            for nbl, xt in T.grid(nb_per, n_xt):
                nbk = task % split * nb_per + nbl
                x0 = T.min(xt * x_tile, ow - x_tile)   # the last tile overlaps the one before
                for i in T.unroll(x_tile):
                    for l in T.vectorized(N_TILE):
                        acc[i, l] = T.uint64(0)
                for rh, rw in T.grid(kh, kw):
                    for cw in T.unroll(n_words):
                        for i in T.unroll(x_tile):
                            for l in T.vectorized(N_TILE):
                                acc[i, l] = acc[i, l] + T.popcount(
                                    a[b, yy + rh, x0 + i + rw, cw] ^ wk[nbk, rh, rw, cw, l])
                if xnor:
                    for i in T.vectorized(x_tile):
                        kv[i] = T.float32(0)
                    for qw in range(kw):
                        for i in T.vectorized(x_tile):
                            kv[i] = kv[i] + colsum[x0 + i + qw]
                    for i in T.vectorized(x_tile):
                        kv[i] = kv[i] * T.float32(inv_window)
                else:
                    for i in T.vectorized(x_tile):
                        kv[i] = T.float32(1)
                for i in T.unroll(8):
                    for l in T.vectorized(N_TILE):
                        if i < x_tile:
                            ev[i, l] = _output(acc, i, l, k_total, kv[i], alpha, bias, T.min(nbk * N_TILE + l, n_out - 1))
                        else:
                            ev[i, l] = T.float32(0)
                # [column][channel] -> [channel][column]: an 8×8 transpose per 8 channels, 24
                # shuffles (unpack, shuffle pairs, swap 128-bit halves) instead of 112 scalar stores
                for hf in T.unroll(2):
                    for k in T.unroll(4):
                        t1[2 * k, T.Ramp(0, 1, 8)] = _shuffle8(ev, 2 * k, 2 * k + 1, UNPACK_LO, hf * 8)
                        t1[2 * k + 1, T.Ramp(0, 1, 8)] = _shuffle8(ev, 2 * k, 2 * k + 1, UNPACK_HI, hf * 8)
                    for k in T.unroll(2):
                        for e in T.unroll(2):
                            t2[4 * k + 2 * e, T.Ramp(0, 1, 8)] = _shuffle8(t1, 4 * k + e, 4 * k + e + 2, PAIRS_LO)
                            t2[4 * k + 2 * e + 1, T.Ramp(0, 1, 8)] = _shuffle8(t1, 4 * k + e, 4 * k + e + 2, PAIRS_HI)
                    for r in T.unroll(4):
                        tr[hf * 8 + r, T.Ramp(0, 1, 8)] = _shuffle8(t2, r, r + 4, HALVES_LO)
                        tr[hf * 8 + r + 4, T.Ramp(0, 1, 8)] = _shuffle8(t2, r, r + 4, HALVES_HI)
                for r in T.unroll(N_TILE):
                    if n_out % N_TILE == 0 or nbk * N_TILE + r < n_out:
                        for i in T.vectorized(x_tile):
                            y[b, nbk * N_TILE + r, yy, x0 + i] = tr[r, i]

    return kernel.with_attr("tirx.is_scheduled", True)


ROW_TILE = 8      # dense: rows per register tile (8 rows × 2 zmm = 16 accumulators)


def _mask8(x, r, k0):
    """Bits ``x[r, k0 + l] >= 0`` for l < 8 as an int32 (``vmovmskps`` of a select that sets the
    sign bit where the comparison holds: exact for -0.0 and NaN, unlike the raw sign bits)."""
    return T.call_llvm_pure_intrin("int32", "llvm.x86.avx.movmsk.ps.256", T.Select(
        x[r, T.Ramp(k0, 1, 8)] >= T.Broadcast(T.float32(0), 8), T.Broadcast(T.float32(-1), 8),
        T.Broadcast(T.float32(0), 8)))


def binary_dense(m: int, k_in: int, n_out: int, xnor: bool):
    """PrimFunc ``(x, wk, alpha, bias, y)``: ``y = (sum a*w) * K * alpha + bias`` for a ±1 dense
    layer, ``a = sign(x)`` (x >= 0 -> +1), ``wk`` from :func:`weight_words`, with ``xnor``
    XNOR-Net's row scale K = mean |x| (else 1). Region 1 packs each row (and sums its |x|);
    region 2 runs 8 rows × 16 outputs per register tile over the words, its weights (one
    output block) staying in L1 across the row tiles, and writes each row's 16 outputs with one
    vector store; its output blocks are swept from both ends (:func:`.work_split.two_ended`)."""
    n_words = -(-k_in // 64)
    nb = -(-n_out // N_TILE)
    mp = -(-m // ROW_TILE) * ROW_TILE
    k_total = float(k_in)

    @T.prim_func
    def kernel(x: T.Buffer((m, k_in), "float32"), wk: T.Buffer((nb, n_words, N_TILE), "uint64"),
               alpha: T.Buffer((n_out,), "float32"), bias: T.Buffer((n_out,), "float32"),
               y: T.Buffer((m, n_out), "float32")):
        T.func_attr({"tirx.noalias": True})
        a = T.alloc_buffer((mp, n_words), "uint64", align=64)
        beta = T.alloc_buffer((mp,), "float32", align=64)
        claimed = T.alloc_buffer((nb,), "int32", align=64)
        for r in T.parallel(mp):
            part = T.alloc_buffer((16,), "float32", align=64)
            if r < m:
                for wd in range(k_in // 64):   # whole words: 8 sign masks of 8 lanes each
                    a[r, wd] = T.uint64(0)
                    for j in T.unroll(8):
                        a[r, wd] = a[r, wd] | T.shift_left(T.Cast("uint64", _mask8(x, r, wd * 64 + j * 8)), T.uint64(j * 8))
                if k_in % 64 != 0:             # the last word bit by bit; bits past k_in stay 0 (as in the weights)
                    a[r, n_words - 1] = T.uint64(0)
                    for t in T.unroll(k_in % 64):
                        a[r, n_words - 1] = a[r, n_words - 1] | T.if_then_else(
                            x[r, k_in // 64 * 64 + t] >= T.float32(0), T.shift_left(T.uint64(1), T.uint64(t)), T.uint64(0))
                if xnor:
                    for l in T.vectorized(16):
                        part[l] = T.float32(0)
                    for q in range(k_in // 16):
                        for l in T.vectorized(16):
                            part[l] = part[l] + T.abs(x[r, q * 16 + l])
                    for q in range(k_in % 16):
                        part[q] = part[q] + T.abs(x[r, k_in // 16 * 16 + q])
                    part[T.Ramp(0, 1, 8)] = part[T.Ramp(0, 1, 8)] + part[T.Ramp(8, 1, 8)]
                    part[T.Ramp(0, 1, 4)] = part[T.Ramp(0, 1, 4)] + part[T.Ramp(4, 1, 4)]
                    part[T.Ramp(0, 1, 2)] = part[T.Ramp(0, 1, 2)] + part[T.Ramp(2, 1, 2)]
                    beta[r] = (part[0] + part[1]) * T.float32(1.0 / k_in)
                else:
                    beta[r] = T.float32(1)
            else:
                for wd in range(n_words):
                    a[r, wd] = T.uint64(0)
                beta[r] = T.float32(0)
        for v in range(nb):
            claimed[v] = 0
        for v in T.parallel(2 * nb):   # two-ended sweep over the output blocks (work_split.py)
            nbk = two_ended(v, nb)
            if claimed[nbk] == 0:
                claimed[nbk] = 1
                acc = T.alloc_buffer((ROW_TILE, N_TILE), "uint64", align=64)
                for rt in range(mp // ROW_TILE):
                    for i in T.unroll(ROW_TILE):
                        for l in T.vectorized(N_TILE):
                            acc[i, l] = T.uint64(0)
                    for wd in range(n_words):
                        for i in T.unroll(ROW_TILE):
                            for l in T.vectorized(N_TILE):
                                acc[i, l] = acc[i, l] + T.popcount(a[rt * ROW_TILE + i, wd] ^ wk[nbk, wd, l])
                    for i in T.unroll(ROW_TILE):
                        if rt * ROW_TILE + i < m:
                            if n_out % N_TILE == 0:   # one vector store per row
                                for l in T.vectorized(N_TILE):
                                    y[rt * ROW_TILE + i, nbk * N_TILE + l] = _output(
                                        acc, i, l, k_total, beta[rt * ROW_TILE + i], alpha, bias, nbk * N_TILE + l)
                            else:
                                for l in range(N_TILE):
                                    if nbk * N_TILE + l < n_out:
                                        y[rt * ROW_TILE + i, nbk * N_TILE + l] = _output(
                                            acc, i, l, k_total, beta[rt * ROW_TILE + i], alpha, bias, nbk * N_TILE + l)

    return kernel.with_attr("tirx.is_scheduled", True)
