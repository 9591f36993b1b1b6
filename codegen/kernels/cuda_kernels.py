"""Hand-written CUDA kernels (TVMScript with explicit thread bindings) for the compressed ops at
small batch, where a layer is a matrix-vector product and memory-bound: the bytes of the stored
weight set the time, so each kernel streams its weight once, 16 bytes per lane, coalesced.

All three are *warp per row* GEMVs (Bell & Garland, "Implementing sparse matrix-vector
multiplication on throughput-oriented processors", SC 2009, the "vector" CSR kernel; the same
shape serves the dense packed forms): a block of ``WARPS`` warps (threadIdx.y) owns ``WARPS * rpw``
output rows, the 32 lanes (threadIdx.x) of a warp split a row's reduction, and the lanes' partial
sums meet in a butterfly of ``__shfl_xor_sync`` (no shared memory, no barrier). Layouts are in
codegen/gpu_layouts.py.

* :func:`binary_gemv` — pure ±1 layers (BNN / XNOR-Net): each block packs the activations once
  into shared memory (``__ballot_sync``: one 32-bit word per warp instruction, XNOR-Net's
  ``sum |x|`` on the way), then ``popc(w xor a)`` over 128-bit weight loads; ``mb`` batch rows
  share each weight load (batch > 1 tiles the activations through shared memory).
* :func:`csr_gemv` — sparse rows (90 % pruned and the like) as CSR with 16-bit column indices
  where the columns fit (Sputnik, Gale et al., "Sparse GPU kernels for deep learning", SC 2020,
  narrows its indices the same way): lanes stride the row's entries, unrolled 4 deep so several
  gathers are in flight, ``mb`` batch rows per entry load; a clustered weight's uint8 indices are
  decoded through its codebook.
* :func:`lut_gemv` — b-bit cluster indices (LUT-GEMM, Park et al. 2022; FLUTE, Guo et al. 2024):
  the activation row and a shared codebook staged in shared memory, ``32 / b`` indices per word
  decoded in registers; the index layout puts lane ``l`` on activations ``l, l + 32, ...`` so the
  shared-memory reads are conflict-free.

Past ``CUDA_GEMV_ROWS`` batch rows a sparse layer is a matrix product, and :func:`csr_spmm` is
Sputnik's SpMM (Gale et al. 2020): the activations transposed to batch-innermost so that the
lanes serving one weight row read one stored column's batch entries contiguously.
"""

from __future__ import annotations

from tvm.script import tirx as T

from ..gpu_layouts import SMEM_FLOATS, lut_padded_inputs, padded_words, vector_width

WARPS = 8
FULL_MASK = 0xFFFFFFFF


@T.macro
def _warp_sum(v, i):
    """Butterfly sum of ``v[i]`` over the 32 lanes (every lane ends with the total)."""
    for o in T.unroll(5):
        v[i] = v[i] + T.call_pure_extern(v.dtype, "__shfl_xor_sync", T.uint32(FULL_MASK), v[i], 16 >> o, 32)


def binary_config(m: int) -> tuple[int, int]:
    """(rows per warp, batch rows per block) of :func:`binary_gemv` for batch ``m``: one batch
    tile of up to 8 rows shares each weight load; fewer rows per warp as the tile grows (registers)."""
    mb = min(m, 8)
    return (4 if mb <= 2 else 2), mb


def binary_gemv(M: int, K: int, N: int, xnor: bool, rpw: int = 4, mb: int = 1):
    """Y (M, N) = (K - 2 popcount(A xor W)) * scale * alpha + bias with A the sign bits of X
    (bit 1 for x >= 0), W (N, words) from gpu_layouts.binary_rows, scale XNOR-Net's
    ``sum |x| / K`` per batch row (or 1)."""
    KW = -(-K // 32)
    v, KWp = vector_width(KW), padded_words(KW)
    CH, nch = 32 * v, padded_words(KW) // (32 * vector_width(KW))
    RB = WARPS * rpw
    nblk, mt = -(-N // RB), -(-M // mb)

    @T.prim_func
    def f(X: T.Buffer((M, K), "float32"), W: T.Buffer((N, KWp), "uint32"), AL: T.Buffer((N,), "float32"),
          BI: T.Buffer((N,), "float32"), Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for by in T.thread_binding(mt, thread="blockIdx.y"):
            for bx in T.thread_binding(nblk, thread="blockIdx.x"):
                for ty in T.thread_binding(WARPS, thread="threadIdx.y"):
                    for tx in T.thread_binding(32, thread="threadIdx.x"):
                        A = T.alloc_buffer((mb, KWp), "uint32", scope="shared")
                        part = T.alloc_buffer((mb, WARPS), "float32", scope="shared")
                        s = T.alloc_buffer((1,), "float32", scope="local")
                        xv = T.alloc_buffer((1,), "float32", scope="local")
                        scale = T.alloc_buffer((mb,), "float32", scope="local")
                        wv = T.alloc_buffer((rpw, v), "uint32", scope="local")
                        acc = T.alloc_buffer((rpw, mb), "int32", scope="local")
                        # 1. pack the block's activation rows: warp ty packs words ty, ty + WARPS, ...
                        for b in range(mb):
                            s[0] = T.float32(0)
                            for q in range(KWp // WARPS):
                                xv[0] = T.float32(-1)
                                if by * mb + b < M and (q * WARPS + ty) * 32 + tx < K:
                                    xv[0] = X[by * mb + b, (q * WARPS + ty) * 32 + tx]
                                    s[0] = s[0] + T.if_then_else(xv[0] >= T.float32(0), xv[0], T.float32(0) - xv[0])
                                A[b, q * WARPS + ty] = T.call_pure_extern(
                                    "uint32", "__ballot_sync", T.uint32(FULL_MASK), xv[0] >= T.float32(0))
                            if xnor:
                                _warp_sum(s, 0)
                                part[b, ty] = s[0]
                        T.tvm_storage_sync("shared")
                        for b in range(mb):
                            scale[b] = T.float32(1)
                            if xnor:
                                scale[b] = T.float32(0)
                                for u in range(WARPS):
                                    scale[b] = scale[b] + part[b, u]
                                scale[b] = scale[b] * T.float32(1.0 / K)
                        # 2. rpw rows per warp: all rows' loads of a chunk issued before their popcounts
                        for r in T.unroll(rpw):
                            for b in T.unroll(mb):
                                acc[r, b] = 0
                        for c in range(nch):
                            for r in T.unroll(rpw):
                                if bx * RB + ty * rpw + r < N:
                                    if v > 1:
                                        wv[r, T.Ramp(0, 1, v)] = W[bx * RB + ty * rpw + r, T.Ramp(c * CH + tx * v, 1, v)]
                                    else:
                                        wv[r, 0] = W[bx * RB + ty * rpw + r, c * CH + tx]
                            for r in T.unroll(rpw):
                                for j in T.unroll(v):
                                    for b in T.unroll(mb):
                                        acc[r, b] = acc[r, b] + T.Cast("int32", T.popcount(wv[r, j] ^ A[b, c * CH + 32 * j + tx]))
                        # 3. warp sums and the epilogue (lane 0 writes)
                        for r in T.unroll(rpw):
                            for b in T.unroll(mb):
                                for o in T.unroll(5):
                                    acc[r, b] = acc[r, b] + T.call_pure_extern(
                                        "int32", "__shfl_xor_sync", T.uint32(FULL_MASK), acc[r, b], 16 >> o, 32)
                                if tx == 0 and by * mb + b < M and bx * RB + ty * rpw + r < N:
                                    Y[by * mb + b, bx * RB + ty * rpw + r] = (
                                        T.Cast("float32", K - 2 * acc[r, b]) * scale[b] * AL[bx * RB + ty * rpw + r]
                                        + BI[bx * RB + ty * rpw + r])
    return f


def csr_gemv(M: int, N: int, K: int, nnz: int, col_dtype: str, lut: int, has_bias: bool, per_row: bool = False,
             rpw: int = 1, unroll: int = 4):
    """Y (M, N) = X (M, K) · W^T (+ bias), W in CSR (values fp32, or uint8 indices into a codebook
    of ``lut`` entries, shared or per row), columns ``col_dtype`` (uint16 or int32). All M batch
    rows share each entry load (M <= 8: kernel_choice picks this kernel for small batches)."""
    ncb = max(lut, 1)
    cb_len = ncb * N if per_row else ncb
    cb_row = ncb if per_row else 0
    vdt = "uint8" if lut else "float32"
    is_lut = lut > 0
    RB = WARPS * rpw
    nblk = -(-N // RB)
    step = 32 * unroll

    @T.prim_func
    def f(X: T.Buffer((M, K), "float32"), V: T.Buffer((nnz,), vdt), C: T.Buffer((nnz,), col_dtype),
          P: T.Buffer((N + 1,), "int32"), CB: T.Buffer((cb_len,), "float32"), B: T.Buffer((N,), "float32"),
          Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for bx in T.thread_binding(nblk, thread="blockIdx.x"):
            for ty in T.thread_binding(WARPS, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    acc = T.alloc_buffer((M,), "float32", scope="local")
                    wv = T.alloc_buffer((unroll,), "float32", scope="local")
                    col = T.alloc_buffer((unroll,), "int32", scope="local")
                    for r in range(rpw):
                        if bx * RB + ty * rpw + r < N:
                            for b in T.unroll(M):
                                acc[b] = T.float32(0)
                            for i in range((P[bx * RB + ty * rpw + r + 1] - P[bx * RB + ty * rpw + r] + step - 1) // step):
                                for u in T.unroll(unroll):
                                    wv[u] = T.float32(0)
                                    col[u] = 0
                                    if P[bx * RB + ty * rpw + r] + i * step + u * 32 + tx < P[bx * RB + ty * rpw + r + 1]:
                                        col[u] = T.Cast("int32", C[P[bx * RB + ty * rpw + r] + i * step + u * 32 + tx])
                                        if is_lut:
                                            wv[u] = CB[(bx * RB + ty * rpw + r) * cb_row + T.Cast(
                                                "int32", V[P[bx * RB + ty * rpw + r] + i * step + u * 32 + tx])]
                                        else:
                                            wv[u] = V[P[bx * RB + ty * rpw + r] + i * step + u * 32 + tx]
                                for u in T.unroll(unroll):
                                    for b in T.unroll(M):
                                        acc[b] = acc[b] + wv[u] * X[b, col[u]]
                            for b in T.unroll(M):
                                _warp_sum(acc, b)
                                if tx == 0:
                                    if has_bias:
                                        Y[b, bx * RB + ty * rpw + r] = acc[b] + B[bx * RB + ty * rpw + r]
                                    else:
                                        Y[b, bx * RB + ty * rpw + r] = acc[b]
    return f


def lut_fits(k: int, bits: int) -> bool:
    """Whether the LUT GEMV can stage a (padded) activation row in shared memory."""
    return bits in (1, 2, 4, 8) and lut_padded_inputs(k, bits) <= SMEM_FLOATS


def lut_gemv(M: int, K: int, N: int, bits: int, ncb: int, has_bias: bool, per_row: bool = False, rpw: int = 4):
    """Y (M, N) = X (M, K) · decode(W)^T (+ bias), W (N, words) from gpu_layouts.lut_rows, the
    codebook (ncb,) shared (staged in shared memory) or (N * ncb,) per row (read through L1).
    One batch row per block (blockIdx.y): for M <= 8."""
    per, mask = 32 // bits, (1 << bits) - 1
    KW = -(-K // per)
    v, KWp = vector_width(KW), padded_words(KW)
    CH = 32 * v
    nch, Kp = KWp // CH, lut_padded_inputs(K, bits)
    RB = WARPS * rpw
    nblk = -(-N // RB)
    cb_len = ncb * N if per_row else ncb
    ncb_s = 1 if per_row else ncb
    assert Kp <= SMEM_FLOATS and Kp % (32 * WARPS) == 0, (K, bits)

    @T.prim_func
    def f(X: T.Buffer((M, K), "float32"), WI: T.Buffer((N, KWp), "uint32"), CB: T.Buffer((cb_len,), "float32"),
          B: T.Buffer((N,), "float32"), Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for by in T.thread_binding(M, thread="blockIdx.y"):
            for bx in T.thread_binding(nblk, thread="blockIdx.x"):
                for ty in T.thread_binding(WARPS, thread="threadIdx.y"):
                    for tx in T.thread_binding(32, thread="threadIdx.x"):
                        xs = T.alloc_buffer((Kp,), "float32", scope="shared")
                        cbs = T.alloc_buffer((ncb_s,), "float32", scope="shared")
                        wv = T.alloc_buffer((rpw, v), "uint32", scope="local")
                        acc = T.alloc_buffer((rpw,), "float32", scope="local")
                        for q in range(Kp // (32 * WARPS)):
                            xs[(q * WARPS + ty) * 32 + tx] = T.float32(0)
                            if (q * WARPS + ty) * 32 + tx < K:
                                xs[(q * WARPS + ty) * 32 + tx] = X[by, (q * WARPS + ty) * 32 + tx]
                        if not per_row:
                            for q in range((ncb + 32 * WARPS - 1) // (32 * WARPS)):
                                if (q * WARPS + ty) * 32 + tx < ncb:
                                    cbs[(q * WARPS + ty) * 32 + tx] = CB[(q * WARPS + ty) * 32 + tx]
                        T.tvm_storage_sync("shared")
                        for r in T.unroll(rpw):
                            acc[r] = T.float32(0)
                        for c in range(nch):
                            for r in T.unroll(rpw):
                                if bx * RB + ty * rpw + r < N:
                                    if v > 1:
                                        wv[r, T.Ramp(0, 1, v)] = WI[bx * RB + ty * rpw + r, T.Ramp(c * CH + tx * v, 1, v)]
                                    else:
                                        wv[r, 0] = WI[bx * RB + ty * rpw + r, c * CH + tx]
                            for r in T.unroll(rpw):
                                for j in T.unroll(v):
                                    for t in T.unroll(per):
                                        if per_row:
                                            acc[r] = acc[r] + CB[T.min(bx * RB + ty * rpw + r, N - 1) * ncb + T.Cast(
                                                "int32", (wv[r, j] >> T.uint32(bits * t)) & T.uint32(mask))] * xs[
                                                c * CH * per + 32 * (j * per + t) + tx]
                                        else:
                                            acc[r] = acc[r] + cbs[T.Cast("int32", (wv[r, j] >> T.uint32(bits * t)) & T.uint32(
                                                mask))] * xs[c * CH * per + 32 * (j * per + t) + tx]
                        for r in T.unroll(rpw):
                            _warp_sum(acc, r)
                            if tx == 0 and bx * RB + ty * rpw + r < N:
                                if has_bias:
                                    Y[by, bx * RB + ty * rpw + r] = acc[r] + B[bx * RB + ty * rpw + r]
                                else:
                                    Y[by, bx * RB + ty * rpw + r] = acc[r]
    return f


def decode_check(kernel: str) -> tuple[str, ...]:
    """What the generated CUDA source of ``kernel`` must contain (tests, the GPU benchmark)."""
    common = ("__shfl_xor_sync", "threadIdx.y")
    return {"binary": common + ("__popc", "__ballot_sync", "uint4"), "csr": common,
            "lut": common + ("__shared__", "uint4")}[kernel]




# ---- batch > 8: CSR SpMM, Sputnik-style ----------------------------------------------------------------------
@T.macro
def _spmm_entry(nv, nc, i, V, C, CB, row, lo, hi, lane, lanes, K, cb_row, is_lut):
    """Entry ``i * lanes + lane`` of the row [lo, hi) into (nv, nc): its value and column, or
    (0, K) past the row's end (K: the zero row of the transposed activations)."""
    nv[0] = T.float32(0)
    nc[0] = K
    if lo[0] + i * lanes + lane < hi[0]:
        nc[0] = T.Cast("int32", C[lo[0] + i * lanes + lane])
        if is_lut:
            nv[0] = CB[row[0] * cb_row + T.Cast("int32", V[lo[0] + i * lanes + lane])]
        else:
            nv[0] = V[lo[0] + i * lanes + lane]


def spmm_padded_batch(m: int, lanes: int, vec: int) -> int:
    """The batch :func:`csr_spmm` pads its transposed activations to (a whole number of batch
    tiles of ``lanes * vec`` columns and of the 32-wide transpose tiles)."""
    tile = max(lanes * vec, 32)
    return -(-m // tile) * tile


def spmm_config(m: int) -> dict:
    """:func:`csr_spmm`'s lanes per row and batch columns per lane for batch ``m`` (> 8)."""
    return {"lanes": 16, "vec": 4} if m > 32 else {"lanes": 8, "vec": 4}


def csr_spmm(M: int, N: int, K: int, nnz: int, col_dtype: str, lut: int, has_bias: bool, per_row: bool = False,
             lanes: int = 16, vec: int = 4, rpg: int = 1):
    """Y (M, N) = X (M, K) · W^T (+ bias) for a batch too large for :func:`csr_gemv`: Sputnik's
    SpMM (Gale, Zaharia, Young & Elsen, "Sparse GPU kernels for deep learning", SC 2020).

    Two kernels. The first transposes X through 32×32 shared-memory tiles into a workspace XT
    (K + 1, Mp): batch innermost, padded to Mp columns, and a zero row K. The second is the
    SpMM: a group of ``lanes`` lanes owns one weight row (visited in the layout's ``order``:
    rows by decreasing length, Sputnik's row swizzle, so the groups of a warp and the warps of a
    block carry similar work) and one tile of ``lanes * vec`` batch columns (blockIdx.y); the
    group loads ``lanes`` of the row's entries at a time, coalesced (value, 16-bit column), hands
    each to every lane with ``__shfl_sync`` and each lane reads its ``vec`` batch columns of that
    column's XT row in one vector load — a warp's reads of one column are contiguous — keeping
    ``vec`` accumulators in registers. The groups of a warp run the longest of their rows' chunk
    counts; entries past a row's end read the zero row K, so no padding meets a NaN."""
    assert 32 % lanes == 0 and vec in (1, 2, 4), (lanes, vec)
    ncb = max(lut, 1)
    cb_len = ncb * N if per_row else ncb
    cb_row = ncb if per_row else 0
    vdt = "uint8" if lut else "float32"
    is_lut = lut > 0
    G = 32 // lanes
    BT = lanes * vec
    Mp = spmm_padded_batch(M, lanes, vec)
    RB = WARPS * G * rpg
    nblk = -(-N // RB)
    n_max = G.bit_length() - 1        # butterfly steps for the max over a warp's groups

    @T.prim_func
    def f(X: T.Buffer((M, K), "float32"), V: T.Buffer((nnz,), vdt), C: T.Buffer((nnz,), col_dtype),
          P: T.Buffer((N + 1,), "int32"), O: T.Buffer((N,), "int32"), CB: T.Buffer((cb_len,), "float32"),
          B: T.Buffer((N,), "float32"), Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        XT = T.alloc_buffer((K + 1, Mp), "float32")
        # 1. XT = X^T, zero padded (batch columns M.., row K)
        for by in T.thread_binding(Mp // 32, thread="blockIdx.y"):
            for bx in T.thread_binding((K + 32) // 32, thread="blockIdx.x"):
                for ty in T.thread_binding(WARPS, thread="threadIdx.y"):
                    for tx in T.thread_binding(32, thread="threadIdx.x"):
                        tile = T.alloc_buffer((32 * 33,), "float32", scope="shared")   # rows padded: no bank conflicts
                        for i in T.unroll(32 // WARPS):
                            tile[(ty + WARPS * i) * 33 + tx] = T.float32(0)
                            if by * 32 + ty + WARPS * i < M and bx * 32 + tx < K:
                                tile[(ty + WARPS * i) * 33 + tx] = X[by * 32 + ty + WARPS * i, bx * 32 + tx]
                        T.tvm_storage_sync("shared")
                        for i in T.unroll(32 // WARPS):
                            if bx * 32 + ty + WARPS * i <= K:
                                XT[bx * 32 + ty + WARPS * i, by * 32 + tx] = tile[tx * 33 + ty + WARPS * i]
        # 2. the SpMM
        for by in T.thread_binding(Mp // BT, thread="blockIdx.y"):
            for bx in T.thread_binding(nblk, thread="blockIdx.x"):
                for ty in T.thread_binding(WARPS, thread="threadIdx.y"):
                    for tx in T.thread_binding(32, thread="threadIdx.x"):
                        acc = T.alloc_buffer((vec,), "float32", scope="local")
                        xv = T.alloc_buffer((lanes, vec), "float32", scope="local")
                        sw = T.alloc_buffer((lanes,), "float32", scope="local")
                        nv = T.alloc_buffer((1,), "float32", scope="local")
                        nc = T.alloc_buffer((1,), "int32", scope="local")
                        cw = T.alloc_buffer((1,), "float32", scope="local")
                        cc = T.alloc_buffer((1,), "int32", scope="local")
                        row = T.alloc_buffer((1,), "int32", scope="local")
                        lo = T.alloc_buffer((1,), "int32", scope="local")
                        hi = T.alloc_buffer((1,), "int32", scope="local")
                        cnt = T.alloc_buffer((1,), "int32", scope="local")
                        for r in range(rpg):
                            row[0] = 0
                            lo[0] = 0
                            hi[0] = 0
                            if ((bx * WARPS + ty) * rpg + r) * G + tx // lanes < N:
                                row[0] = O[((bx * WARPS + ty) * rpg + r) * G + tx // lanes]
                                lo[0] = P[row[0]]
                                hi[0] = P[row[0] + 1]
                            cnt[0] = (hi[0] - lo[0] + lanes - 1) // lanes
                            for o in T.unroll(n_max):
                                cnt[0] = T.max(cnt[0], T.call_pure_extern(
                                    "int32", "__shfl_xor_sync", T.uint32(FULL_MASK), cnt[0], lanes << o, 32))
                            for t in T.unroll(vec):
                                acc[t] = T.float32(0)
                            _spmm_entry(nv, nc, 0, V, C, CB, row, lo, hi, tx % lanes, lanes, K, cb_row, is_lut)
                            for i in range(cnt[0]):
                                cw[0] = nv[0]            # this chunk; the next one's loads go out first
                                cc[0] = nc[0]
                                _spmm_entry(nv, nc, i + 1, V, C, CB, row, lo, hi, tx % lanes, lanes, K, cb_row, is_lut)
                                for j in T.unroll(lanes):     # all the group's loads first, then the FMAs
                                    sw[j] = T.call_pure_extern("float32", "__shfl_sync", T.uint32(FULL_MASK), cw[0], j, lanes)
                                    if vec > 1:
                                        xv[j, T.Ramp(0, 1, vec)] = XT[T.call_pure_extern(
                                            "int32", "__shfl_sync", T.uint32(FULL_MASK), cc[0], j, lanes),
                                            T.Ramp(by * BT + tx % lanes * vec, 1, vec)]
                                    else:
                                        xv[j, 0] = XT[T.call_pure_extern(
                                            "int32", "__shfl_sync", T.uint32(FULL_MASK), cc[0], j, lanes), by * BT + tx % lanes]
                                for j in T.unroll(lanes):
                                    for t in T.unroll(vec):
                                        acc[t] = acc[t] + sw[j] * xv[j, t]
                            if ((bx * WARPS + ty) * rpg + r) * G + tx // lanes < N:
                                for t in T.unroll(vec):
                                    if by * BT + tx % lanes * vec + t < M:
                                        if has_bias:
                                            Y[by * BT + tx % lanes * vec + t, row[0]] = acc[t] + B[row[0]]
                                        else:
                                            Y[by * BT + tx % lanes * vec + t, row[0]] = acc[t]
    return f
