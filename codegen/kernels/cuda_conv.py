"""Binary (pure ±1, BNN / XNOR-Net) convolution on CUDA as an implicit GEMM over packed channels
(hand-written TVMScript, explicit thread bindings; the op is ``squeezer::bitserial_conv2d`` of
compiler/ops/bitserial.py with sign activations and one ±1 weight plane).

Two kernels in one function:

1. *pack* — one thread per (image, padded pixel, channel word): 32 channels' signs (bit 1 for
   x >= 0) into one 32-bit word of a padded NHWC-words workspace ``A`` (B, H + 2ph, W + 2pw, CW);
   padding pixels hold +1 for every real channel (the op pads sign activations with +1), channel
   padding bits are 0. The thread also writes the word's sum of |x| (``S``, same layout, 0 on the
   padding): XNOR-Net's K per pixel. Consecutive threads are consecutive pixels, so the 32 reads
   of a channel word are coalesced across the warp.
2. *conv* — a block of ``WARPS`` warps owns a tile of ``32 * pp`` output pixels (lanes, pixels
   flattened over batch and rows) × ``WARPS * rpt`` output channels (each warp ``rpt`` of them).
   The tile's weights (``kh kw CW`` words per channel, from gpu_layouts.binary_conv_tiles: channel
   innermost) are staged once in shared memory and read as broadcasts (every lane of a warp reads
   the same word; 128-bit reads for 4 channels); each lane loads its pixels' activation words per
   (tap, word) and accumulates ``rpt * pp`` popcounts of ``a xor w`` in registers. The epilogue is
   the op's: ``(C kh kw - 2 popc) * scale * alpha + bias`` with XNOR-Net's scale the window sum
   of ``S`` (zero padded) / (C kh kw), summed by the block's warps over (tap, word) in shared
   memory.
"""

from __future__ import annotations

from tvm.script import tirx as T

from codegen.gpu_layouts import BINARY_CONV_WARPS as WARPS
PACK_THREADS = 256
SMEM_WORDS = 11264            # 44 KiB of staged weights (the rest of the 48 KiB static limit: the scale sums)


def conv_words(c_in: int) -> int:
    return -(-c_in // 32)


def conv_config(pixels: int) -> dict:
    """(``rpt`` channels per thread, ``pp`` pixels per lane) for ``pixels`` output pixels (batch ×
    rows × columns): small maps want more blocks, large ones more reuse per load."""
    return {"rpt": 4, "pp": 1} if pixels <= 1024 else {"rpt": 8, "pp": 2}


def conv_fits(c_in: int, kh: int, kw: int, rpt: int) -> bool:
    """Whether a channel tile's weights fit in shared memory."""
    return kh * kw * conv_words(c_in) * WARPS * rpt <= SMEM_WORDS


def binary_conv2d(B: int, C: int, H: int, W: int, N: int, kernel, stride, padding, dilation, xnor: bool,
                  rpt: int = 4, pp: int = 1):
    """Y (B, N, OH, OW) of the pure ±1 conv of X (B, C, H, W); weights WT from
    gpu_layouts.binary_conv_tiles(..., WARPS * rpt), alpha AL (N,), bias BI (N,)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    CW, KT = conv_words(C), kh * kw
    KC = KT * CW
    Hp, Wp = H + 2 * ph, W + 2 * pw
    OH, OW = (Hp - dh * (kh - 1) - 1) // sh + 1, (Wp - dw * (kw - 1) - 1) // sw + 1
    NT = WARPS * rpt
    nct, P = -(-N // NT), B * OH * OW
    npt = -(-P // (32 * pp))
    n_pack = B * Hp * Wp * CW
    vec = 4 if rpt % 4 == 0 else 1
    k_total = C * KT
    assert conv_fits(C, kh, kw, rpt), (C, kh, kw, rpt)

    @T.prim_func
    def f(X: T.Buffer((B, C, H, W), "float32"), WT: T.Buffer((nct * KC * NT,), "uint32"),
          AL: T.Buffer((N,), "float32"), BI: T.Buffer((N,), "float32"), Y: T.Buffer((B, N, OH, OW), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        A = T.alloc_buffer((n_pack,), "uint32")
        S = T.alloc_buffer((n_pack,), "float32")
        # 1. pack: thread i = ((b CW + w) Hp + y) Wp + x writes A/S[((b Hp + y) Wp + x) CW + w]
        for bx in T.thread_binding((n_pack + PACK_THREADS - 1) // PACK_THREADS, thread="blockIdx.x"):
            for tx in T.thread_binding(PACK_THREADS, thread="threadIdx.x"):
                word = T.alloc_buffer((1,), "uint32", scope="local")
                s = T.alloc_buffer((1,), "float32", scope="local")
                xv = T.alloc_buffer((1,), "float32", scope="local")
                if bx * PACK_THREADS + tx < n_pack:
                    word[0] = T.uint32(0)
                    s[0] = T.float32(0)
                    for j in T.unroll(32):
                        if (bx * PACK_THREADS + tx) // (Hp * Wp) % CW * 32 + j < C:
                            if (ph <= (bx * PACK_THREADS + tx) // Wp % Hp
                                    and (bx * PACK_THREADS + tx) // Wp % Hp < ph + H
                                    and pw <= (bx * PACK_THREADS + tx) % Wp and (bx * PACK_THREADS + tx) % Wp < pw + W):
                                xv[0] = X[(bx * PACK_THREADS + tx) // (Hp * Wp * CW),
                                          (bx * PACK_THREADS + tx) // (Hp * Wp) % CW * 32 + j,
                                          (bx * PACK_THREADS + tx) // Wp % Hp - ph, (bx * PACK_THREADS + tx) % Wp - pw]
                                s[0] = s[0] + T.if_then_else(xv[0] >= T.float32(0), xv[0], T.float32(0) - xv[0])
                                word[0] = word[0] | (T.Cast("uint32", xv[0] >= T.float32(0)) << T.uint32(j))
                            else:
                                word[0] = word[0] | (T.uint32(1) << T.uint32(j))
                    A[((bx * PACK_THREADS + tx) // (Hp * Wp * CW) * Hp * Wp + (bx * PACK_THREADS + tx) % (Hp * Wp)) * CW
                      + (bx * PACK_THREADS + tx) // (Hp * Wp) % CW] = word[0]
                    S[((bx * PACK_THREADS + tx) // (Hp * Wp * CW) * Hp * Wp + (bx * PACK_THREADS + tx) % (Hp * Wp)) * CW
                      + (bx * PACK_THREADS + tx) // (Hp * Wp) % CW] = s[0]
        # 2. conv: block (pixel tile bx, channel tile by); warp ty: channels by NT + ty rpt + r
        for by in T.thread_binding(nct, thread="blockIdx.y"):
            for bx in T.thread_binding(npt, thread="blockIdx.x"):
                for ty in T.thread_binding(WARPS, thread="threadIdx.y"):
                    for tx in T.thread_binding(32, thread="threadIdx.x"):
                        Ws = T.alloc_buffer((KC * NT,), "uint32", scope="shared")
                        part = T.alloc_buffer((WARPS, 32 * pp), "float32", scope="shared")
                        base = T.alloc_buffer((pp,), "int32", scope="local")
                        av = T.alloc_buffer((pp,), "uint32", scope="local")
                        wv = T.alloc_buffer((rpt,), "uint32", scope="local")
                        acc = T.alloc_buffer((rpt, pp), "int32", scope="local")
                        sc = T.alloc_buffer((pp,), "float32", scope="local")
                        for q in range((KC * NT + 32 * WARPS - 1) // (32 * WARPS)):
                            if (q * WARPS + ty) * 32 + tx < KC * NT:
                                Ws[(q * WARPS + ty) * 32 + tx] = WT[by * KC * NT + (q * WARPS + ty) * 32 + tx]
                        for i in T.unroll(pp):     # the pixel's window corner in A (pixels past the end: 0)
                            base[i] = 0
                            if (bx * pp + i) * 32 + tx < P:
                                base[i] = (((bx * pp + i) * 32 + tx) // (OH * OW) * Hp * Wp
                                           + ((bx * pp + i) * 32 + tx) % (OH * OW) // OW * sh * Wp
                                           + ((bx * pp + i) * 32 + tx) % OW * sw) * CW
                        for i in T.unroll(pp):
                            sc[i] = T.float32(1)
                        if xnor:      # the window sum of S: warp ty takes (tap, word) pairs ty, ty + WARPS, ...
                            for i in T.unroll(pp):
                                sc[i] = T.float32(0)
                                for q in range((KC + WARPS - 1) // WARPS):
                                    if q * WARPS + ty < KC:
                                        sc[i] = sc[i] + S[base[i] + ((q * WARPS + ty) // CW // kw * dh * Wp
                                                                    + (q * WARPS + ty) // CW % kw * dw) * CW
                                                          + (q * WARPS + ty) % CW]
                                part[ty, i * 32 + tx] = sc[i]
                        T.tvm_storage_sync("shared")
                        if xnor:
                            for i in T.unroll(pp):
                                sc[i] = T.float32(0)
                                for u in range(WARPS):
                                    sc[i] = sc[i] + part[u, i * 32 + tx]
                                sc[i] = sc[i] * T.float32(1.0 / k_total)
                        for r in T.unroll(rpt):
                            for i in T.unroll(pp):
                                acc[r, i] = 0
                        for t in range(KT):
                            for w in T.unroll(CW):
                                for i in T.unroll(pp):
                                    av[i] = A[base[i] + (t // kw * dh * Wp + t % kw * dw) * CW + w]
                                if vec > 1:
                                    for r4 in T.unroll(rpt // 4):
                                        wv[T.Ramp(r4 * 4, 1, 4)] = Ws[
                                            T.Ramp((t * CW + w) * NT + ty * rpt + r4 * 4, 1, 4)]
                                else:
                                    for r in T.unroll(rpt):
                                        wv[r] = Ws[(t * CW + w) * NT + ty * rpt + r]
                                for r in T.unroll(rpt):
                                    for i in T.unroll(pp):
                                        acc[r, i] = acc[r, i] + T.Cast("int32", T.popcount(av[i] ^ wv[r]))
                        for r in T.unroll(rpt):
                            for i in T.unroll(pp):
                                if (bx * pp + i) * 32 + tx < P and by * NT + ty * rpt + r < N:
                                    Y[((bx * pp + i) * 32 + tx) // (OH * OW), by * NT + ty * rpt + r,
                                      ((bx * pp + i) * 32 + tx) % (OH * OW) // OW, ((bx * pp + i) * 32 + tx) % OW] = (
                                        T.Cast("float32", k_total - 2 * acc[r, i]) * sc[i] * AL[by * NT + ty * rpt + r]
                                        + BI[by * NT + ty * rpt + r])
    return f
