"""TIR kernels for sparse and lookup-table (clustered) weights. Each factory bakes the shapes into
one PrimFunc (sparse loop bounds are data-dependent, so these are hand-written TIR, not TE).

Layouts are built by codegen/weight_codec.py. CPU kernels parallelize over output rows (or row
blocks) and keep a vector accumulator in registers:

* ``csr_chunk``   — batch < 8 (the usual choice): chunks of 16 entries of a row, a base column and
  uint8 offsets per chunk, one AVX-512 gather of ``x`` per chunk; row blocks swept from both ends
  (work_split.py).
* ``csr_gather``  — batch < 8 where chunking pads more: rows padded to 16-entry chunks, int columns.
* ``csr_xt``      — batch >= 8 and convs (im2col): ``x`` transposed to (K, M), a 16-lane vector over
  the batch / output positions per stored weight.
* ``bsr``         — r×c blocks stored (nnz_blocks, c, r): a broadcast FMA over r lanes per stored column.
* ``lut_dense``   — packed b-bit indices decoded in registers (vpermps from a 16-entry codebook for
  b <= 4, a gather for 8 bits), never a full-size fp32 weight in memory.
* ``csr_cuda``    — one thread per output element (CUDA).
With a codebook, sparse kernels store uint8 cluster indices and decode them the same way.
"""

from __future__ import annotations

from tvm.script import tirx as T

from ..target import cpu_has
from .work_split import two_ended

LANES = 16


def has_avx512(target) -> bool:
    """The gather / vpermps kernels need AVX-512F (other x86 CPUs get the batch-vector kernels)."""
    return cpu_has(target, "avx512f", x86=True)


def _gather(base, index_i32x16):
    return T.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.mask.gather.dps.512",
                                   T.Broadcast(T.float32(0), 16), base, index_i32x16,
                                   T.Broadcast(T.bool(True), 16), T.int32(4))


@T.macro
def _store_lane_sum(acc, s, B, Y, i, r, has_bias):
    """Y[i, r] = sum of the 16 accumulator lanes (+ bias): a tree of 4 dependent adds, not 16."""
    acc[T.Ramp(0, 1, 8)] = acc[T.Ramp(0, 1, 8)] + acc[T.Ramp(8, 1, 8)]
    acc[T.Ramp(0, 1, 4)] = acc[T.Ramp(0, 1, 4)] + acc[T.Ramp(4, 1, 4)]
    acc[T.Ramp(0, 1, 2)] = acc[T.Ramp(0, 1, 2)] + acc[T.Ramp(2, 1, 2)]
    s[0] = acc[0] + acc[1]
    if has_bias:
        s[0] = s[0] + B[r]
    Y[i, r] = s[0]


def csr_gather(M: int, N: int, K: int, nnz_p: int, idx_dtype: str, lut: int, has_bias: bool, rb: int = 128,
               per_row: bool = False):
    """Y (M, N) = X (M, K) · W^T; W in 16-padded CSR (ptr in chunks). ``lut`` = codebook size or 0.
    Rows go in blocks of ``rb`` per parallel task (per-task scratch buffers are not free)."""
    ncb = max(lut, 1)
    cb_len = ncb * N if per_row else ncb
    cb_row = ncb if per_row else 0
    vdt = "uint8" if lut else "float32"
    is_lut = lut > 0
    nb = (N + rb - 1) // rb

    @T.prim_func
    def f(X: T.Buffer((M, K), "float32"), V: T.Buffer((nnz_p,), vdt), C: T.Buffer((nnz_p,), idx_dtype),
          P: T.Buffer((N + 1,), "int32"), CB: T.Buffer((cb_len,), "float32"), B: T.Buffer((N,), "float32"),
          Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.noalias": True})
        for blk in T.parallel(nb):
            acc = T.decl_buffer((16,), "float32", scope="local")
            s = T.decl_buffer((1,), "float32", scope="local")
            for rr in range(rb):
                if blk * rb + rr < N:
                    for i in range(M):
                        acc[T.Ramp(0, 1, 16)] = T.Broadcast(T.float32(0), 16)
                        for e in range(P[blk * rb + rr], P[blk * rb + rr + 1]):
                            if is_lut:
                                acc[T.Ramp(0, 1, 16)] = acc[T.Ramp(0, 1, 16)] + _gather(
                                    T.address_of(CB[(blk * rb + rr) * cb_row]), T.Cast("int32x16", V[T.Ramp(e * 16, 1, 16)])) * _gather(
                                    T.address_of(X[i, 0]), T.Cast("int32x16", C[T.Ramp(e * 16, 1, 16)]))
                            else:
                                acc[T.Ramp(0, 1, 16)] = acc[T.Ramp(0, 1, 16)] + V[T.Ramp(e * 16, 1, 16)] * _gather(
                                    T.address_of(X[i, 0]), T.Cast("int32x16", C[T.Ramp(e * 16, 1, 16)]))
                        _store_lane_sum(acc, s, B, Y, i, blk * rb + rr, has_bias)
    return f


def csr_chunk(M: int, N: int, K: int, n_chunks: int, lut: int, has_bias: bool, rb: int = 128,
              per_row: bool = False):
    """Y (M, N) = X (M, K) · W^T; W in chunked CSR (weight_codec.csr_chunked): per chunk of 16
    lanes a base column and uint8 offsets. With a codebook of <= 16 entries the cluster indices
    are decoded by vpermps (else a gather) and padded lanes masked by the chunk's count."""
    vdt = "uint8" if lut else "float32"
    is_lut = lut > 0
    perm = 0 < lut <= 16
    ncb = 16 if perm else max(lut, 1)
    cb_len = ncb * N if per_row else ncb
    cb_row = ncb if per_row else 0
    nb = (N + rb - 1) // rb
    nch = max(n_chunks, 1)
    nv = nch * 16

    @T.prim_func
    def f(X: T.Buffer((M, K), "float32"), V: T.Buffer((nv,), vdt), OFF: T.Buffer((nv,), "uint8"),
          BASE: T.Buffer((nch,), "int32"), CNT: T.Buffer((nch,), "uint8"),
          P: T.Buffer((N + 1,), "int32"), CB: T.Buffer((cb_len,), "float32"), B: T.Buffer((N,), "float32"),
          Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.noalias": True})
        claimed = T.alloc_buffer((nb,), "int32", align=64)
        for v in range(nb):
            claimed[v] = 0
        for v in T.parallel(2 * nb):   # two-ended sweep over the row blocks (work_split.py)
            blk = two_ended(v, nb)
            if claimed[blk] == 0:
                claimed[blk] = 1
                acc = T.decl_buffer((16,), "float32", scope="local")
                s = T.decl_buffer((1,), "float32", scope="local")
                for rr in range(rb):
                    if blk * rb + rr < N:
                        for i in range(M):
                            acc[T.Ramp(0, 1, 16)] = T.Broadcast(T.float32(0), 16)
                            for e in range(P[blk * rb + rr], P[blk * rb + rr + 1]):
                                if is_lut:
                                    if perm:
                                        acc[T.Ramp(0, 1, 16)] = acc[T.Ramp(0, 1, 16)] + T.Select(
                                            T.Ramp(0, 1, 16) < T.Broadcast(T.Cast("int32", CNT[e]), 16),
                                            T.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.permvar.sf.512",
                                                                    CB[T.Ramp((blk * rb + rr) * cb_row, 1, 16)], T.Cast("int32x16", V[T.Ramp(e * 16, 1, 16)])),
                                            T.Broadcast(T.float32(0), 16)) * _gather(
                                            T.address_of(X[i, 0]),
                                            T.Broadcast(BASE[e], 16) + T.Cast("int32x16", OFF[T.Ramp(e * 16, 1, 16)]))
                                    else:
                                        acc[T.Ramp(0, 1, 16)] = acc[T.Ramp(0, 1, 16)] + T.Select(
                                            T.Ramp(0, 1, 16) < T.Broadcast(T.Cast("int32", CNT[e]), 16),
                                            _gather(T.address_of(CB[(blk * rb + rr) * cb_row]), T.Cast("int32x16", V[T.Ramp(e * 16, 1, 16)])),
                                            T.Broadcast(T.float32(0), 16)) * _gather(
                                            T.address_of(X[i, 0]),
                                            T.Broadcast(BASE[e], 16) + T.Cast("int32x16", OFF[T.Ramp(e * 16, 1, 16)]))
                                else:
                                    acc[T.Ramp(0, 1, 16)] = acc[T.Ramp(0, 1, 16)] + V[T.Ramp(e * 16, 1, 16)] * _gather(
                                        T.address_of(X[i, 0]), T.Broadcast(BASE[e], 16) + T.Cast("int32x16", OFF[T.Ramp(e * 16, 1, 16)]))
                            _store_lane_sum(acc, s, B, Y, i, blk * rb + rr, has_bias)
    return f


def csr_xt(Mp: int, N: int, K: int, nnz: int, lut: int, has_bias: bool, rb: int = 8, per_row: bool = False):
    """YT (N, Mp) = W · XT (K, Mp), Mp a multiple of 16; W in plain CSR; ``rb`` rows per task.
    Each stored weight scales a row of XT into up to 64 accumulator lanes; two accumulator sets
    take alternate weights, so 2-8 independent FMA chains hide the FMA latency."""
    ncb = max(lut, 1)
    cb_len = ncb * N if per_row else ncb
    cb_row = ncb if per_row else 0
    vdt = "uint8" if lut else "float32"
    is_lut = lut > 0
    nb = (N + rb - 1) // rb
    tw = 64 if Mp % 64 == 0 else (32 if Mp % 32 == 0 else 16)

    @T.prim_func
    def f(XT: T.Buffer((K, Mp), "float32"), V: T.Buffer((nnz,), vdt), C: T.Buffer((nnz,), "int32"),
          P: T.Buffer((N + 1,), "int32"), CB: T.Buffer((cb_len,), "float32"), B: T.Buffer((N,), "float32"),
          YT: T.Buffer((N, Mp), "float32")):
        T.func_attr({"tirx.noalias": True})
        for blk in T.parallel(nb):
            acc = T.decl_buffer((2, tw), "float32", scope="local")
            for rr in range(rb):
                if blk * rb + rr < N:
                    for mt in range(Mp // tw):
                        for l in T.vectorized(tw):
                            acc[0, l] = T.float32(0)
                            acc[1, l] = T.float32(0)
                            if has_bias:
                                acc[0, l] = B[blk * rb + rr]
                        for h in range((P[blk * rb + rr + 1] - P[blk * rb + rr]) // 2):
                            for a in T.unroll(2):
                                for l in T.vectorized(tw):
                                    if is_lut:
                                        acc[a, l] = acc[a, l] + CB[(blk * rb + rr) * cb_row + T.Cast(
                                            "int32", V[P[blk * rb + rr] + h * 2 + a])] * XT[
                                            C[P[blk * rb + rr] + h * 2 + a], mt * tw + l]
                                    else:
                                        acc[a, l] = acc[a, l] + V[P[blk * rb + rr] + h * 2 + a] * XT[
                                            C[P[blk * rb + rr] + h * 2 + a], mt * tw + l]
                        if (P[blk * rb + rr + 1] - P[blk * rb + rr]) % 2 == 1:
                            for l in T.vectorized(tw):
                                if is_lut:
                                    acc[0, l] = acc[0, l] + CB[(blk * rb + rr) * cb_row + T.Cast(
                                        "int32", V[P[blk * rb + rr + 1] - 1])] * XT[C[P[blk * rb + rr + 1] - 1], mt * tw + l]
                                else:
                                    acc[0, l] = acc[0, l] + V[P[blk * rb + rr + 1] - 1] * XT[
                                        C[P[blk * rb + rr + 1] - 1], mt * tw + l]
                        for l in T.vectorized(tw):
                            YT[blk * rb + rr, mt * tw + l] = acc[0, l] + acc[1, l]
    return f


def bsr(M: int, N: int, K: int, nnzb: int, br: int, bc: int, has_bias: bool, tm: int = 1):
    """Y (M, N) = X · W^T with W in BSR, blocks (nnzb, bc, br); ``tm`` batch rows share each
    block load (register tile of tm × br)."""

    @T.prim_func
    def f(X: T.Buffer((M, K), "float32"), W: T.Buffer((nnzb, bc, br), "float32"),
          Wind: T.Buffer((nnzb,), "int32"), Wptr: T.Buffer((N // br + 1,), "int32"),
          B: T.Buffer((N,), "float32"), Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.noalias": True})
        for rb in T.parallel(N // br):
            acc = T.decl_buffer((tm, br), "float32", scope="local")
            for it in range(M // tm):
                for ii in T.unroll(tm):
                    for r in T.vectorized(br):
                        acc[ii, r] = T.float32(0)
                        if has_bias:
                            acc[ii, r] = B[rb * br + r]
                for e in range(Wptr[rb], Wptr[rb + 1]):
                    for c in range(bc):
                        for ii in T.unroll(tm):
                            for r in T.vectorized(br):
                                acc[ii, r] = acc[ii, r] + W[e, c, r] * X[it * tm + ii, Wind[e] * bc + c]
                for ii in T.unroll(tm):
                    for r in T.vectorized(br):
                        Y[it * tm + ii, rb * br + r] = acc[ii, r]
    return f


def lut_dense(M: int, Np: int, K: int, bits: int, ncb: int, tm: int, nv: int, has_bias: bool, permute: bool,
              per_row: bool = False):
    """Y (M, Np) = X (M, K) · codebook[idx]^T, idx packed tile-major (Np / 16nv, ceil(K/per), 16nv) uint8.
    Each task owns ``nv`` vectors of outputs (a full cache line of packed bytes per k for nv=4,
    and nv independent FMA chains) × ``tm`` batch rows. ``permute``: codebook padded to 16 entries
    and decoded with vpermps; else a gather."""
    per, mask = 8 // bits, (1 << bits) - 1
    kb_n = -(-K // per)
    width = 16 * nv
    cb_len = ncb * Np if per_row else ncb
    lane_row = ncb if per_row else 0      # per-output-channel codebooks: lane l reads row l's

    @T.prim_func
    def f(X: T.Buffer((M, K), "float32"), PK: T.Buffer((Np // width, kb_n, width), "uint8"),
          CB: T.Buffer((cb_len,), "float32"), B: T.Buffer((Np,), "float32"), Y: T.Buffer((M, Np), "float32")):
        T.func_attr({"tirx.noalias": True})
        for jt in T.parallel(Np // width):
            acc = T.decl_buffer((tm, width), "float32", scope="local")
            byte = T.decl_buffer((width,), "int32", scope="local")
            w = T.decl_buffer((width,), "float32", scope="local")
            for it in range(M // tm):
                for ii, l in T.grid(tm, width):
                    acc[ii, l] = T.float32(0)
                for kb in range(kb_n):
                    for v in T.unroll(nv):
                        byte[T.Ramp(v * 16, 1, 16)] = T.Cast("int32x16", PK[jt, kb, T.Ramp(v * 16, 1, 16)])
                    for s in T.unroll(per):
                        if kb * per + s < K:
                            for v in T.unroll(nv):
                                if permute:
                                    w[T.Ramp(v * 16, 1, 16)] = T.call_llvm_pure_intrin(
                                        "float32x16", "llvm.x86.avx512.permvar.sf.512", CB[T.Ramp(0, 1, 16)],
                                        (byte[T.Ramp(v * 16, 1, 16)] >> T.Broadcast(T.int32(s * bits), 16))
                                        & T.Broadcast(T.int32(mask), 16))
                                else:
                                    w[T.Ramp(v * 16, 1, 16)] = _gather(
                                        T.address_of(CB[0]), T.Ramp((jt * width + v * 16) * lane_row, lane_row, 16)
                                        + ((byte[T.Ramp(v * 16, 1, 16)] >> T.Broadcast(T.int32(s * bits), 16))
                                           & T.Broadcast(T.int32(mask), 16)))
                            for ii in T.unroll(tm):
                                for l in T.vectorized(width):
                                    acc[ii, l] = acc[ii, l] + w[l] * X[it * tm + ii, kb * per + s]
                for ii in range(tm):
                    for l in T.vectorized(width):
                        if has_bias:
                            Y[it * tm + ii, jt * width + l] = acc[ii, l] + B[jt * width + l]
                        else:
                            Y[it * tm + ii, jt * width + l] = acc[ii, l]
    return f


def csr_cuda(M: int, N: int, K: int, nnz: int, lut: int, has_bias: bool, per_row: bool = False):
    """One CUDA thread per output element, walking its row's stored weights."""
    ncb = max(lut, 1)
    cb_len = ncb * N if per_row else ncb
    cb_row = ncb if per_row else 0
    vdt = "uint8" if lut else "float32"
    is_lut = lut > 0
    total = M * N
    nblocks = (total + 127) // 128

    @T.prim_func
    def f(X: T.Buffer((M, K), "float32"), V: T.Buffer((nnz,), vdt), C: T.Buffer((nnz,), "int32"),
          P: T.Buffer((N + 1,), "int32"), CB: T.Buffer((cb_len,), "float32"), B: T.Buffer((N,), "float32"),
          Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.noalias": True})
        for bx in T.thread_binding(nblocks, thread="blockIdx.x"):
            for tx in T.thread_binding(128, thread="threadIdx.x"):
                acc = T.decl_buffer((1,), "float32", scope="local")
                if bx * 128 + tx < total:
                    acc[0] = T.float32(0)
                    if has_bias:
                        acc[0] = B[(bx * 128 + tx) % N]
                    for e in range(P[(bx * 128 + tx) % N], P[(bx * 128 + tx) % N + 1]):
                        if is_lut:
                            acc[0] = acc[0] + CB[((bx * 128 + tx) % N) * cb_row + T.Cast("int32", V[e])] * X[(bx * 128 + tx) // N, C[e]]
                        else:
                            acc[0] = acc[0] + V[e] * X[(bx * 128 + tx) // N, C[e]]
                    Y[(bx * 128 + tx) // N, (bx * 128 + tx) % N] = acc[0]
    return f
