"""A tiled LUT GEMM on CUDA for clustered (b-bit codebook) linears past the GEMV's batch
(hand-written TVMScript, explicit thread bindings; kernels/cuda_kernels.lut_gemv serves batch <= 8).

The classic shared-memory SGEMM (a 16×16 thread block, each thread a ``tm × tn`` register tile of
a ``16 tm × 16 tn`` block tile, K in steps of ``BK``) with the weight decoded on its way into
shared memory: per step the block reads its ``16 tn × BK`` cluster indices as ``BK / per`` words a
row (one coalesced run: gpu_layouts.lut_gemm_tiles orders each step's words word-major,
output-minor, so consecutive threads also write consecutive shared addresses), looks each index
up in the codebook (staged in shared memory, or per output row through L1) and writes the float
weights; the activation tile is staged alongside (rows padded by one word: no bank conflicts).
The inner product reads ``tm`` activations (warp broadcasts) and ``tn`` weights (one vector read)
per k for ``tm * tn`` FMAs. The weight crosses memory as b-bit indices, decoded once per block
(LUT-GEMM, Park et al. 2022; FLUTE, Guo et al. 2024, decode into shared memory the same way).
"""

from __future__ import annotations

from tvm.script import tirx as T

BK = 32          # inputs per K step
SIDE = 16        # threads per block side (16 × 16)


def gemm_config(m: int) -> dict:
    """Register tile (``tm`` batch rows × ``tn`` outputs per thread) for batch ``m``."""
    return {"tm": 4, "tn": 4} if m > 32 else {"tm": 2, "tn": 4}


def lut_gemm(M: int, K: int, N: int, bits: int, ncb: int, has_bias: bool, per_row: bool = False, tm: int = 4,
             tn: int = 4):
    """Y (M, N) = X (M, K) · decode(W)^T (+ bias), W from gpu_layouts.lut_gemm_tiles(.., 16 * tn),
    the codebook (ncb,) shared or (N * ncb,) per row."""
    assert bits in (1, 2, 4, 8) and tn in (1, 2, 4), (bits, tn)
    per, mask = 32 // bits, (1 << bits) - 1
    BM, BN = SIDE * tm, SIDE * tn
    wpr = BK // per
    TW = BN * wpr
    nbk, nbn, nbm = -(-K // BK), -(-N // BN), -(-M // BM)
    cb_len = ncb * N if per_row else ncb
    ncb_s = 1 if per_row else ncb
    NT = SIDE * SIDE
    RS = BK + 1                     # activation rows padded by one word

    @T.prim_func
    def f(X: T.Buffer((M, K), "float32"), WI: T.Buffer((nbn * nbk * TW,), "uint32"), CB: T.Buffer((cb_len,), "float32"),
          B: T.Buffer((N,), "float32"), Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for by in T.thread_binding(nbm, thread="blockIdx.y"):
            for bx in T.thread_binding(nbn, thread="blockIdx.x"):
                for ty in T.thread_binding(SIDE, thread="threadIdx.y"):
                    for tx in T.thread_binding(SIDE, thread="threadIdx.x"):
                        As = T.alloc_buffer((BM * RS,), "float32", scope="shared")
                        Ws = T.alloc_buffer((BK * BN,), "float32", scope="shared")
                        cbs = T.alloc_buffer((ncb_s,), "float32", scope="shared")
                        acc = T.alloc_buffer((tm * tn,), "float32", scope="local")
                        af = T.alloc_buffer((tm,), "float32", scope="local")
                        wf = T.alloc_buffer((tn,), "float32", scope="local")
                        wd = T.alloc_buffer((1,), "uint32", scope="local")
                        if not per_row:
                            for q in range((ncb + NT - 1) // NT):
                                if q * NT + ty * SIDE + tx < ncb:
                                    cbs[q * NT + ty * SIDE + tx] = CB[q * NT + ty * SIDE + tx]
                        for i in T.unroll(tm * tn):
                            acc[i] = T.float32(0)
                        for kb in range(nbk):
                            T.tvm_storage_sync("shared")       # the previous step's reads are done
                            for q in T.unroll(BM * BK // NT):   # activations: row (q NT + tid) // BK
                                As[(q * NT + ty * SIDE + tx) // BK * RS + (q * NT + ty * SIDE + tx) % BK] = T.float32(0)
                                if (by * BM + (q * NT + ty * SIDE + tx) // BK < M
                                        and kb * BK + (q * NT + ty * SIDE + tx) % BK < K):
                                    As[(q * NT + ty * SIDE + tx) // BK * RS + (q * NT + ty * SIDE + tx) % BK] = X[
                                        by * BM + (q * NT + ty * SIDE + tx) // BK,
                                        kb * BK + (q * NT + ty * SIDE + tx) % BK]
                            for q in range((TW + NT - 1) // NT):  # weights: word (q NT + tid) = (wq, output)
                                if q * NT + ty * SIDE + tx < TW:
                                    wd[0] = WI[(bx * nbk + kb) * TW + q * NT + ty * SIDE + tx]
                                    for t in T.unroll(per):
                                        if per_row:
                                            Ws[((q * NT + ty * SIDE + tx) // BN * per + t) * BN
                                               + (q * NT + ty * SIDE + tx) % BN] = CB[
                                                T.min(bx * BN + (q * NT + ty * SIDE + tx) % BN, N - 1) * ncb
                                                + T.Cast("int32", (wd[0] >> T.uint32(bits * t)) & T.uint32(mask))]
                                        else:
                                            Ws[((q * NT + ty * SIDE + tx) // BN * per + t) * BN
                                               + (q * NT + ty * SIDE + tx) % BN] = cbs[
                                                T.Cast("int32", (wd[0] >> T.uint32(bits * t)) & T.uint32(mask))]
                            T.tvm_storage_sync("shared")
                            for k in T.unroll(BK):
                                for i in T.unroll(tm):
                                    af[i] = As[(ty * tm + i) * RS + k]
                                if tn > 1:
                                    wf[T.Ramp(0, 1, tn)] = Ws[T.Ramp(k * BN + tx * tn, 1, tn)]
                                else:
                                    wf[0] = Ws[k * BN + tx]
                                for i in T.unroll(tm):
                                    for j in T.unroll(tn):
                                        acc[i * tn + j] = acc[i * tn + j] + af[i] * wf[j]
                        for i in T.unroll(tm):
                            for j in T.unroll(tn):
                                if by * BM + ty * tm + i < M and bx * BN + tx * tn + j < N:
                                    if has_bias:
                                        Y[by * BM + ty * tm + i, bx * BN + tx * tn + j] = (
                                            acc[i * tn + j] + B[bx * BN + tx * tn + j])
                                    else:
                                        Y[by * BM + ty * tm + i, bx * BN + tx * tn + j] = acc[i * tn + j]
    return f
