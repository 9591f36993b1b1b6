"""Binary (±1 × ±1) conv2d and dense on Intel AMX tiles: the integer core of BNN / XNOR-Net layers
as int8 tile dot products (``tdpbssd``: 16×16 outputs × 64 products per instruction).

Why: on this CPU one AVX-512 ``vpopcntq`` handles 512 binary products but needs an xor and an add
beside it (three vector uops on two ports), while one AMX tile instruction does 16,384 int8
products. A ±1 value is an int8, the dot product of ±1 vectors is exact in int32, so the tile
core equals the xnor-popcount core bit for bit (``K - 2 popcount(a xor w) = sum a*w``).

Conv layout (C^T = W · im2col(x)^T, so the conv's NCHW output rows are the tiles' rows):
* A tiles (weights): 16 output channels × 64 input channels of one tap, as ±1 int8 prepared at
  build time (:func:`weight_tiles`). The module therefore holds this layer's weights as int8: 8×
  the packed bits, a quarter of fp32. The compressed layer and its stored-bytes report stay packed.
* B tiles (activations): each call binarizes the input once into channel quads (4 int8 ±1 in a
  uint32; spatial padding +1, channel padding 0), one aligned copy per column shift of the kernel.
  A tile is then 16 channel quads × 16 consecutive output columns, a contiguous 1 KB (no im2col).
  Hence stride 1 and dilation 1 only.
* 2 × 2 register blocking: 4 accumulator tiles (32 channels × 32 positions), 2 A, 2 B. The next
  step's tiles load as soon as the tile they replace has been consumed.
* XNOR-Net's K comes from the same pass over x (channel sums of |x|), box-filtered in the epilogue.

The dense kernel (batch >= 16) is described at :func:`binary_dense`.

Tile state must be granted by Linux before the first tile instruction, or that instruction raises
SIGILL (``arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)``). The kernel asks for it itself at every
call, through libc's ``syscall``, so an exported module runs in any process (and fails with a
clear error where Linux refuses). Codegen picks this
kernel only where :func:`amx_available` holds for the target and the building process.
"""

from __future__ import annotations

import ctypes
import functools
import platform

from tvm.script import tirx as T

from ..target import cpu_has

MIN_ROWS = 16     # a dense layer needs a whole tile of rows (batch) before AMX can pay off
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
_SYS_ARCH_PRCTL = 158


@functools.lru_cache(maxsize=1)
def request_amx() -> bool:
    """Ask Linux for the AMX tile-data state for this process (needed before the first tile
    instruction, else SIGILL). True when granted."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def amx_available(target) -> bool:
    """The target CPU has AMX-INT8 and this process may use it."""
    return target_has_amx(target) and request_amx()


def target_has_amx(target) -> bool:
    """An x86-64 Linux llvm target with AMX-INT8 (and BITALG, which the dense unpack uses; every
    AMX CPU has it). Linux because the kernels ask for tile state through Linux's arch_prctl."""
    if not cpu_has(target, "amx-int8", "avx512bitalg"):
        return False
    triple = str(target.attrs.get("mtriple", ""))
    return triple.startswith("x86_64") and "linux" in triple


def request_tile_state():
    """In-kernel ``syscall(arch_prctl, ARCH_REQ_XCOMP_PERM, XTILEDATA)``: an exported module then
    runs in any process (permission is per process, asking again is cheap and idempotent)."""
    return T.call_extern("int64", "syscall", T.int64(_SYS_ARCH_PRCTL), T.int64(_ARCH_REQ_XCOMP_PERM),
                         T.int64(_XFEATURE_XTILEDATA))


def tile_op(name: str, *args):
    return T.call_llvm_intrin("void", "llvm.x86." + name, *args)


@T.macro
def configure_tiles(cfg):
    """Palette 1, all 8 tiles 16 rows × 64 bytes (per thread: tile state is per thread)."""
    for i in range(64):
        cfg[i] = T.uint8(0)
    cfg[0] = T.uint8(1)
    for t in range(8):
        cfg[16 + 2 * t] = T.uint8(64)
        cfg[48 + t] = T.uint8(16)
    T.evaluate(tile_op("ldtilecfg", T.address_of(cfg[0])))


def _b_tile(pa, t, ks, oh: int, nseg: int, kw: int, cw: int):
    """Address of the B tile of m-tile ``t`` (batch, output row, 16-column segment) at step ``ks``
    (tap, 64-channel word): in the copy of P shifted by the tap's column, 16 channel quads × 16
    columns, a contiguous 1 KB."""
    tap = ks // cw
    return T.address_of(pa[t // (oh * nseg), (t // nseg) % oh + tap // kw, t % nseg, ks % cw, tap % kw, 0, 0])


def _window_mean(am, b, yy, xx, kh: int, kw: int, inv_window: float, xnor: bool):
    """XNOR-Net's K at output (yy, xx): mean |x| over the window's channels and taps (0-padded)."""
    if not xnor:
        return T.float32(1)
    total = am[b, yy, xx]
    for i in range(kh):
        for j in range(kw):
            if i or j:
                total = total + am[b, yy + i, xx + j]
    return total * T.float32(inv_window)


def _pad_quad(g, c_in: int):
    """A padded position: +1 (byte 0x01) on the real channels of quad ``g``, 0 on channel padding."""
    total = T.uint32(0)
    for j in range(4):
        total = total + T.if_then_else(g * 4 + j < c_in, T.uint32(1 << (8 * j)), T.uint32(0))
    return total


def _quad(x, b, g, row, col, c_in: int):
    """Channels 4g..4g+3 of x at (row, col) as 4 int8 ±1 bytes of a uint32 (0 past ``c_in``)."""
    total = T.uint32(0)
    for j in range(4):
        c = g * 4 + j
        byte = T.if_then_else(x[b, T.min(c, c_in - 1), row, col] >= T.float32(0), T.uint32(0x01), T.uint32(0xFF))
        total = total + T.if_then_else(c < c_in, byte << T.uint32(8 * j), T.uint32(0))
    return total


def binary_conv2d(batch: int, c_in: int, h: int, w: int, n_out: int, kh: int, kw: int, ph: int, pw: int,
                  xnor: bool):
    """PrimFunc ``(x, wa, alpha, bias, y)`` for a stride-1, dilation-1 ±1 conv:
    ``y = (sum a*w) * K * alpha + bias`` with ``a = [x >= 0]*2 - 1`` (padding +1) and, with
    ``xnor``, XNOR-Net's ``K`` (channel-mean |x| averaged over the zero-padded window) computed
    in the kernel; ``wa`` from :func:`weight_tiles`."""
    oh, ow = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    cw = -(-c_in // 64)
    groups = cw * 16                       # channel quads, padded to whole words
    nseg = -(-ow // 16)
    tail = ow - 16 * (nseg - 1)
    hp, wq = h + 2 * ph, nseg * 16 + kw - 1
    ks_total = kh * kw * cw
    n_pairs = -(-n_out // 32)
    m_tiles = batch * oh * nseg
    m_pairs = -(-m_tiles // 2)
    row = 64                               # bytes between channel quads in an aligned B tile
    inv_window = 1.0 / (kh * kw * c_in)
    am_shape = (batch, hp, wq) if xnor else (1,)

    @T.prim_func
    def kernel(x: T.Buffer((batch, c_in, h, w), "float32"), wa: T.Buffer((n_pairs, ks_total, 32, 64), "int8"),
               alpha: T.Buffer((n_out,), "float32"), bias: T.Buffer((n_out,), "float32"),
               y: T.Buffer((batch, n_out, oh, ow), "float32")):
        T.func_attr({"tirx.noalias": True})
        assert request_tile_state() == T.int64(0), "Linux refused the AMX tile state (arch_prctl XTILEDATA)"
        p = T.alloc_buffer((batch, hp, cw, 16, wq), "uint32", align=64)
        pa = T.alloc_buffer((batch, hp, nseg, cw, kw, 16, 16), "uint32", align=64)
        am = T.alloc_buffer(am_shape, "float32", align=64)   # sum over channels of |x|, 0-padded (XNOR)
        for bh in T.parallel(batch * hp):
            if xnor:
                for ww in T.vectorized(wq):
                    am[bh // hp, bh % hp, ww] = T.float32(0)
                if bh % hp >= ph and bh % hp < h + ph:
                    for c in range(c_in):
                        for ww in T.vectorized(w):
                            am[bh // hp, bh % hp, pw + ww] = am[bh // hp, bh % hp, pw + ww] + T.abs(
                                x[bh // hp, c, bh % hp - ph, ww])
            for g in range(groups):
                for ww in T.vectorized(wq):       # border (and the columns past it): +1 on real channels
                    p[bh // hp, bh % hp, g // 16, g % 16, ww] = _pad_quad(g, c_in)
                if bh % hp >= ph and bh % hp < h + ph:
                    for ww in T.vectorized(w):
                        p[bh // hp, bh % hp, g // 16, g % 16, pw + ww] = _quad(x, bh // hp, g, bh % hp - ph, ww, c_in)
            for seg, cwd, dx, g in T.grid(nseg, cw, kw, 16):   # aligned copies, one per column shift
                for l in T.vectorized(16):
                    pa[bh // hp, bh % hp, seg, cwd, dx, g, l] = p[bh // hp, bh % hp, cwd, g, seg * 16 + dx + l]
        for npair in T.parallel(n_pairs):
            cfg = T.alloc_buffer((64,), "uint8", scope="local")
            acc = T.alloc_buffer((32, 32), "int32", scope="local", align=64)
            kv = T.alloc_buffer((16,), "float32", scope="local", align=64)
            configure_tiles(cfg)
            for mp in range(m_pairs):
                T.evaluate(tile_op("tilezero", T.uint8(0)))
                T.evaluate(tile_op("tilezero", T.uint8(1)))
                T.evaluate(tile_op("tilezero", T.uint8(2)))
                T.evaluate(tile_op("tilezero", T.uint8(3)))
                t0 = mp * 2
                t1 = T.min(mp * 2 + 1, m_tiles - 1)
                # software-pipelined: the next step's tiles load as soon as the tile they replace
                # has been consumed (tile registers are not renamed)
                T.evaluate(tile_op("tileloadd64", T.uint8(4), T.address_of(wa[npair, 0, 0, 0]), T.int64(64)))
                T.evaluate(tile_op("tileloadd64", T.uint8(6), _b_tile(pa, t0, 0, oh, nseg, kw, cw), T.int64(row)))
                T.evaluate(tile_op("tileloadd64", T.uint8(5), T.address_of(wa[npair, 0, 16, 0]), T.int64(64)))
                T.evaluate(tile_op("tileloadd64", T.uint8(7), _b_tile(pa, t1, 0, oh, nseg, kw, cw), T.int64(row)))
                for ks in range(ks_total):
                    nxt = T.min(ks + 1, ks_total - 1)
                    T.evaluate(tile_op("tdpbssd", T.uint8(0), T.uint8(4), T.uint8(6)))
                    T.evaluate(tile_op("tdpbssd", T.uint8(1), T.uint8(4), T.uint8(7)))
                    T.evaluate(tile_op("tileloadd64", T.uint8(4), T.address_of(wa[npair, nxt, 0, 0]), T.int64(64)))
                    T.evaluate(tile_op("tdpbssd", T.uint8(2), T.uint8(5), T.uint8(6)))
                    T.evaluate(tile_op("tileloadd64", T.uint8(6), _b_tile(pa, t0, nxt, oh, nseg, kw, cw), T.int64(row)))
                    T.evaluate(tile_op("tdpbssd", T.uint8(3), T.uint8(5), T.uint8(7)))
                    T.evaluate(tile_op("tileloadd64", T.uint8(5), T.address_of(wa[npair, nxt, 16, 0]), T.int64(64)))
                    T.evaluate(tile_op("tileloadd64", T.uint8(7), _b_tile(pa, t1, nxt, oh, nseg, kw, cw), T.int64(row)))
                T.evaluate(tile_op("tilestored64", T.uint8(0), T.address_of(acc[0, 0]), T.int64(128)))
                T.evaluate(tile_op("tilestored64", T.uint8(1), T.address_of(acc[0, 16]), T.int64(128)))
                T.evaluate(tile_op("tilestored64", T.uint8(2), T.address_of(acc[16, 0]), T.int64(128)))
                T.evaluate(tile_op("tilestored64", T.uint8(3), T.address_of(acc[16, 16]), T.int64(128)))
                for half in range(2):
                    t = T.min(mp * 2 + half, m_tiles - 1)
                    b = t // (oh * nseg)
                    yy = (t // nseg) % oh
                    x0 = (t % nseg) * 16
                    for l in T.vectorized(16):   # the activation scale of these 16 positions, once
                        kv[l] = _window_mean(am, b, yy, x0 + l, kh, kw, inv_window, xnor)
                    for n in range(32):
                        if npair * 32 + n < n_out:
                            if x0 + 16 <= ow:
                                for l in T.vectorized(16):
                                    y[b, npair * 32 + n, yy, x0 + l] = (T.Cast("float32", acc[n, half * 16 + l]) * kv[l]
                                                                        * alpha[npair * 32 + n] + bias[npair * 32 + n])
                            else:
                                for l in T.vectorized(tail):
                                    y[b, npair * 32 + n, yy, x0 + l] = (T.Cast("float32", acc[n, half * 16 + l]) * kv[l]
                                                                        * alpha[npair * 32 + n] + bias[npair * 32 + n])
            T.evaluate(tile_op("tilerelease"))

    return kernel.with_attr("tirx.is_scheduled", True)


def weight_tiles(words, n_out: int):
    """(N, kh, kw, CW) uint64 words -> (ceil(N/32), kh*kw*CW, 32, 64) int8 ±1: per pair of 16-channel
    blocks and per (tap, 64-channel word), the A tiles' rows (rows past N are zero)."""
    import numpy as np

    n_pad = -(-n_out // 32) * 32
    bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=-1, bitorder="little")
    steps = int(np.prod(words.shape[1:]))
    signs = np.zeros((n_pad, steps, 64), np.int8)
    signs[:n_out] = (2 * bits.reshape(n_out, steps, 64).astype(np.int8) - 1)
    return np.ascontiguousarray(signs.reshape(n_pad // 32, 32, steps, 64).transpose(0, 2, 1, 3))


@T.macro
def _unpack_word(dst, kk, row, word):
    """64 bits of ``word`` -> 64 int8 ±1 in ``dst[kk, row]`` (bit t -> byte t): broadcast, one
    ``vpshufbitqmb`` (BITALG, on every AMX CPU) picks bit t for byte t into a mask, one blend."""
    dst[kk, row, T.Ramp(0, 1, 64)] = T.Select(
        T.call_llvm_pure_intrin("boolx64", "llvm.x86.avx512.vpshufbitqmb.512",
                                T.reinterpret("int8x64", T.Broadcast(word, 8)), T.Cast("int8x64", T.Ramp(0, 1, 64))),
        T.Broadcast(T.int8(1), 64), T.Broadcast(T.int8(-1), 64))


def dense_weight_bits(words, n_out: int):
    """(N, W) uint64 words (bit t of word w = input 64w + t) -> (ceil(N/16), W, 16) uint64 in B-tile
    order: word r of tile (nt, w) holds, at bit t, the weight of output 16 nt + t // 4 and input
    64 w + 4 r + t % 4 — so unpacking a word bit-to-byte yields one row of the VNNI B tile."""
    import numpy as np

    n_words = words.shape[1]
    nt = -(-n_out // 16)
    bits = np.zeros((nt * 16, n_words * 64), np.uint8)
    bits[:n_out] = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=-1, bitorder="little")
    tiles = bits.reshape(nt, 16, n_words, 16, 4).transpose(0, 2, 3, 1, 4).reshape(nt, n_words, 16, 64)
    return np.packbits(tiles, axis=-1, bitorder="little").view("<u8").reshape(nt, n_words, 16).astype(np.uint64)


def binary_dense(m: int, k_in: int, n_out: int, xnor: bool, threads: int, chunk: int = 4):
    """PrimFunc ``(x, wbits, alpha, bias, y)``: ``y = (sign(x) · W^T) * s * alpha + bias`` on AMX
    tiles, ``s`` = XNOR's mean |x| per row (or 1), weights ±1 from ``wbits``
    (:func:`dense_weight_bits`), unpacked tile by tile into L1 (the module keeps the packed bits).

    C = A · B with A = the activations as int8 rows (64 rows per block: 4 accumulator tiles) and B =
    16 outputs × 64 inputs of weights. The reduction runs in chunks of ``chunk`` × 64 inputs: a
    chunk of activations stays in L1 while every output tile of the thread passes over it, the
    accumulators going to memory between chunks. ``chunk`` = 4: 16 KB of activations at 64 rows
    (benchmarks/README.md)."""
    kp = -(-k_in // 64) * 64
    ks_total = kp // 64
    nt_total = -(-n_out // 16)
    mg_total = -(-m // 64)
    mp = mg_total * 64
    n_chunks = -(-ks_total // chunk)
    inv_k = 1.0 / k_in
    threads = max(1, min(threads, nt_total))
    per_thread = -(-nt_total // threads)           # output tiles per thread (contiguous ranges)

    @T.prim_func
    def kernel(x: T.Buffer((m, k_in), "float32"), wbits: T.Buffer((nt_total, ks_total, 16), "uint64"),
               alpha: T.Buffer((n_out,), "float32"), bias: T.Buffer((n_out,), "float32"),
               y: T.Buffer((m, n_out), "float32")):
        T.func_attr({"tirx.noalias": True})
        assert request_tile_state() == T.int64(0), "Linux refused the AMX tile state (arch_prctl XTILEDATA)"
        a8 = T.alloc_buffer((mp, kp + 64), "int8", align=64)   # +64: rows 4 KiB apart would share L1 sets
        scale = T.alloc_buffer((mp,), "float32", align=64)
        part = T.alloc_buffer((mp, 64), "float32", align=64)     # 64 partial sums of |x| per row
        cacc = T.alloc_buffer((nt_total, mg_total, 64, 16), "int32", align=64)
        for r in T.parallel(mp):
            for l in T.vectorized(64):
                part[r, l] = T.float32(0)
            for q in range(kp // 64):
                if r < m and q * 64 + 64 <= k_in:    # whole blocks: contiguous vector reads
                    for l in T.vectorized(64):
                        a8[r, q * 64 + l] = T.if_then_else(x[r, q * 64 + l] >= T.float32(0), T.int8(1), T.int8(-1))
                        part[r, l] = part[r, l] + T.abs(x[r, q * 64 + l])
                else:                                # the last partial block, padding rows
                    for l in range(64):
                        a8[r, q * 64 + l] = T.if_then_else(
                            r < m and q * 64 + l < k_in,
                            T.if_then_else(x[T.min(r, m - 1), T.min(q * 64 + l, k_in - 1)] >= T.float32(0),
                                           T.int8(1), T.int8(-1)), T.int8(0))
                        if r < m and q * 64 + l < k_in:
                            part[r, l] = part[r, l] + T.abs(x[r, q * 64 + l])
            scale[r] = T.float32(1)
            if xnor:
                scale[r] = T.float32(0)
                for l in range(64):
                    scale[r] = scale[r] + part[r, l]
                scale[r] = scale[r] * T.float32(inv_k)
        for th in T.parallel(threads):
            cfg = T.alloc_buffer((64,), "uint8", scope="local")
            wt = T.alloc_buffer((2 * chunk, 16, 64), "int8", align=64)   # double-buffered B tiles
            configure_tiles(cfg)
            nt0 = th * per_thread
            nt1 = T.min((th + 1) * per_thread, nt_total)
            for kc in range(T.if_then_else(nt0 < nt1, n_chunks, 0)):   # a thread may get no tile
                for kk in range(T.min(chunk, ks_total - kc * chunk)):
                    for rr in range(16):
                        _unpack_word(wt, kk, rr, wbits[nt0, kc * chunk + kk, rr])
                for nt in range(nt0, nt1):
                    cur = ((nt - nt0) % 2) * chunk
                    nxt = chunk - cur
                    for mg in range(mg_total):
                        if kc == 0:
                            T.evaluate(tile_op("tilezero", T.uint8(0)))
                            T.evaluate(tile_op("tilezero", T.uint8(1)))
                            T.evaluate(tile_op("tilezero", T.uint8(2)))
                            T.evaluate(tile_op("tilezero", T.uint8(3)))
                        else:
                            T.evaluate(tile_op("tileloadd64", T.uint8(0), T.address_of(cacc[nt, mg, 0, 0]), T.int64(64)))
                            T.evaluate(tile_op("tileloadd64", T.uint8(1), T.address_of(cacc[nt, mg, 16, 0]), T.int64(64)))
                            T.evaluate(tile_op("tileloadd64", T.uint8(2), T.address_of(cacc[nt, mg, 32, 0]), T.int64(64)))
                            T.evaluate(tile_op("tileloadd64", T.uint8(3), T.address_of(cacc[nt, mg, 48, 0]), T.int64(64)))
                        for kk in range(T.min(chunk, ks_total - kc * chunk)):
                            ks = kc * chunk + kk
                            T.evaluate(tile_op("tileloadd64", T.uint8(4), T.address_of(wt[cur + kk, 0, 0]), T.int64(64)))
                            T.evaluate(tile_op("tileloadd64", T.uint8(5), T.address_of(a8[mg * 64, ks * 64]), T.int64(kp + 64)))
                            T.evaluate(tile_op("tileloadd64", T.uint8(6), T.address_of(a8[mg * 64 + 16, ks * 64]), T.int64(kp + 64)))
                            T.evaluate(tile_op("tileloadd64", T.uint8(7), T.address_of(a8[mg * 64 + 32, ks * 64]), T.int64(kp + 64)))
                            T.evaluate(tile_op("tdpbssd", T.uint8(0), T.uint8(5), T.uint8(4)))
                            T.evaluate(tile_op("tdpbssd", T.uint8(1), T.uint8(6), T.uint8(4)))
                            T.evaluate(tile_op("tileloadd64", T.uint8(5), T.address_of(a8[mg * 64 + 48, ks * 64]), T.int64(kp + 64)))
                            T.evaluate(tile_op("tdpbssd", T.uint8(2), T.uint8(7), T.uint8(4)))
                            T.evaluate(tile_op("tdpbssd", T.uint8(3), T.uint8(5), T.uint8(4)))
                            if mg == 0 and nt + 1 < nt1:   # the next output tile's weights, between tile ops
                                for rr in range(16):
                                    _unpack_word(wt, nxt + kk, rr, wbits[nt + 1, ks, rr])
                        T.evaluate(tile_op("tilestored64", T.uint8(0), T.address_of(cacc[nt, mg, 0, 0]), T.int64(64)))
                        T.evaluate(tile_op("tilestored64", T.uint8(1), T.address_of(cacc[nt, mg, 16, 0]), T.int64(64)))
                        T.evaluate(tile_op("tilestored64", T.uint8(2), T.address_of(cacc[nt, mg, 32, 0]), T.int64(64)))
                        T.evaluate(tile_op("tilestored64", T.uint8(3), T.address_of(cacc[nt, mg, 48, 0]), T.int64(64)))
            T.evaluate(tile_op("tilerelease"))
        for r in T.parallel(m):
            for nt in range(nt_total):
                if nt * 16 + 16 <= n_out:
                    for l in T.vectorized(16):
                        y[r, nt * 16 + l] = (T.Cast("float32", cacc[nt, r // 64, r % 64, l]) * scale[r]
                                             * alpha[nt * 16 + l] + bias[nt * 16 + l])
                else:
                    for l in range(n_out - nt * 16):
                        y[r, nt * 16 + l] = (T.Cast("float32", cacc[nt, r // 64, r % 64, l]) * scale[r]
                                             * alpha[nt * 16 + l] + bias[nt * 16 + l])

    return kernel.with_attr("tirx.is_scheduled", True)
