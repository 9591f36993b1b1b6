"""The CUDA warp-per-row kernels (codegen/kernels/cuda_kernels.py) without a GPU: their layouts
against numpy emulations of what each lane reads (the index arithmetic the kernels use), the
generated CUDA source (thread bindings, warp shuffles, popc, 128-bit loads), and compressed models
built for CUDA picking them. The numbers themselves are checked on a GPU by benchmarks/gpu_check.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import codegen
import compiler
from codegen import gpu_layouts as gl
from codegen.kernels import cuda_kernels as ck
from cuda_source import kernel_cuda_source


def _lanes(n_words: int):
    """(chunk, lane, j) -> (position in the layout, natural word) for a row of ``n_words`` words."""
    v, wp = gl.vector_width(n_words), gl.padded_words(n_words)
    for c in range(wp // (32 * v)):
        for lane in range(32):
            for j in range(v):
                yield c * 32 * v + v * lane + j, c * 32 * v + 32 * j + lane


@pytest.mark.parametrize("k", [64, 1000, 2048, 4096, 4100])
def test_binary_layout_matches_the_lane_reads(k):
    rng = np.random.default_rng(k)
    w = rng.standard_normal((3, k))
    x = rng.standard_normal(k)
    packed = np.packbits(w >= 0, axis=1, bitorder="little")
    rows = gl.binary_rows(packed, k)
    a_bits = np.zeros(gl.padded_words(-(-k // 32)) * 32, bool)
    a_bits[:k] = x >= 0                                   # the ballot: bit l of word q = x[32q + l] >= 0
    a_words = np.packbits(a_bits.reshape(-1, 32), axis=1, bitorder="little").view("<u4")[:, 0]
    for n in range(3):
        mism = sum(bin(int(rows[n, pos]) ^ int(a_words[q])).count("1") for pos, q in _lanes(-(-k // 32)))
        assert k - 2 * mism == int(np.sum(np.where(w[n] >= 0, 1, -1) * np.where(x >= 0, 1, -1)))


@pytest.mark.parametrize("k,bits", [(8192, 4), (1000, 2), (512, 4), (300, 8)])
def test_lut_layout_matches_the_lane_reads(k, bits):
    rng = np.random.default_rng(k)
    idx = rng.integers(0, 1 << bits, (2, k)).astype(np.uint8)
    cb = rng.standard_normal(1 << bits).astype(np.float32)
    x = rng.standard_normal(k).astype(np.float32)
    words = gl.lut_rows(idx, bits)
    per, kp = 32 // bits, gl.lut_padded_inputs(k, bits)
    xs = np.zeros(kp, np.float32)
    xs[:k] = x
    v = gl.vector_width(gl.lut_words(idx, bits))
    for n in range(2):
        total = 0.0
        for pos, _ in _lanes(gl.lut_words(idx, bits)):
            c, lane, j = pos // (32 * v), (pos % (32 * v)) // v, pos % v
            for t in range(per):
                code = (int(words[n, pos]) >> (bits * t)) & ((1 << bits) - 1)
                total += cb[code] * xs[c * 32 * v * per + 32 * (j * per + t) + lane]
        assert total == pytest.approx(float(cb[idx[n]] @ x), rel=1e-4, abs=1e-3)


def test_csr_columns_narrow_where_they_fit():
    ptr, col, val = np.array([0, 2, 3]), np.array([1, 70000, 5]), np.ones(3, np.float32)
    assert gl.csr_narrow(ptr, col, val, 65536, None)["col_idx"].dtype == np.uint16
    assert gl.csr_narrow(ptr, col, val, 70001, None)["col_idx"].dtype == np.int32


@pytest.mark.parametrize("kind,func,wide", [
    ("binary", lambda: ck.binary_gemv(1, 4096, 4096, True), True),
    ("binary", lambda: ck.binary_gemv(64, 8192, 1000, False, *ck.binary_config(64)), True),
    ("csr", lambda: ck.csr_gemv(1, 4096, 4096, 1000, "uint16", 0, True), True),
    ("csr", lambda: ck.csr_gemv(4, 1000, 300, 1000, "int32", 16, False, per_row=True), True),
    ("lut", lambda: ck.lut_gemv(1, 8192, 8192, 4, 16, True), True),
    ("lut", lambda: ck.lut_gemv(2, 1000, 10, 2, 4, False, per_row=True), False),   # 63 words a row: 32-bit loads
])
def test_kernels_compile_to_warp_shuffles(kind, func, wide):
    src = kernel_cuda_source(func())
    missing = [w for w in ck.decode_check(kind) if w not in src and (wide or w != "uint4")]
    assert not missing, f"{kind}: {missing} not in the generated CUDA"
    assert "__launch_bounds__(256)" in src


@pytest.mark.slow
def test_compressed_linears_pick_the_warp_kernels_for_cuda():
    from compiler.ops import LutLinear
    from compiler.ops.bitserial import BitLinear
    from compiler.ops.sparse import SparseLinear

    torch.manual_seed(0)
    w = torch.randn(256, 512)
    keep = w.abs() >= w.abs().flatten().kthvalue(int(0.9 * w.numel())).values
    layers = {"binary_gemv_cuda": BitLinear((w >= 0)[None], [2.0], -1.0, w.abs().mean(1), torch.zeros(256), "sign",
                                            xnor_scale=True),
              "csr_warp": SparseLinear.from_dense(w, None, keep),
              "lut_warp": LutLinear.from_linear(nn.Linear(512, 256), 4)}
    for name, layer in layers.items():
        src = codegen.build(compiler.trace(nn.Sequential(layer).eval(), (torch.randn(1, 512),)), "cuda").kernel_source()
        assert name in src and "__shfl_xor_sync" in src, name


@pytest.mark.parametrize("kind,batch,params", [("binary", 1, {"rpw": 4, "mb": 1}), ("binary", 64, {"rpw": 2, "mb": 8}),
                                               ("csr", 1, {"rpw": 1, "unroll": 4}),
                                               ("csr", 64, {"spmm": True, "lanes": 16, "vec": 4}),
                                               ("lut", 1, {"rpw": 2})])
def test_gpu_benchmark_weights_fit_the_kernel_signature(kind, batch, params):
    """benchmarks/gpu_kernels.py makes its weights on the GPU machine: they must match the
    buffers of the kernel exported here, and its reference must be the layer's product."""
    from benchmarks import gpu_kernels as gk

    n = 512
    case = {"kind": kind, "n": n, "k": n, "batch": batch, "params": params}
    func = gk.kernel_func(case)
    w = gk.make_weights(kind, n, n)
    buffers = [p.ty for p in func.params]
    arrays = [np.zeros((batch, n), np.float32), *gk.kernel_args(case, w), np.zeros((batch, n), np.float32)]
    assert [(tuple(int(d) for d in b.shape), str(b.dtype)) for b in buffers] == \
        [(a.shape, str(a.dtype)) for a in arrays]
    x = torch.randn(batch, n)
    ref = gk.reference(kind, w, x).numpy()
    if kind != "binary":
        np.testing.assert_allclose(ref, x.double().numpy() @ w["dense"].T + w["bias"], rtol=1e-9)
    else:
        want = (np.where(x >= 0, 1, -1) @ w["sign"].T) * x.abs().sum(1, keepdim=True).numpy() / n * w["alpha"] + w["bias"]
        np.testing.assert_allclose(ref, want, rtol=1e-6)


# ---- the batch > 8 CSR SpMM (ck.csr_spmm), emulated lane by lane ------------------------------------------------
def _emulate_spmm(x, vals, cols, ptr, order, cb, bias, lanes, vec, rpg=1, cb_row=0):
    """What ck.csr_spmm computes, following its index arithmetic: the transpose kernel's tiles,
    then per (block, warp, row slot) each lane's entry, the group-wise __shfl_sync and the vector
    load of XT. Also checks every XT read is in bounds, aligned to its vector and initialised, and
    every output is written once."""
    m, k = x.shape
    n, warps, g = len(ptr) - 1, ck.WARPS, 32 // lanes
    bt, mp = lanes * vec, ck.spmm_padded_batch(m, lanes, vec)
    xt = np.full((k + 1, mp), np.nan)             # the workspace pool's garbage
    written = np.zeros((k + 1, mp), bool)
    for by in range(mp // 32):
        for bx in range((k + 32) // 32):
            tile = np.zeros(32 * 33)
            for ty in range(warps):
                for tx in range(32):
                    for i in range(32 // warps):
                        b, c = by * 32 + ty + warps * i, bx * 32 + tx
                        tile[(ty + warps * i) * 33 + tx] = x[b, c] if b < m and c < k else 0.0
            for ty in range(warps):
                for tx in range(32):
                    for i in range(32 // warps):
                        if bx * 32 + ty + warps * i <= k:
                            xt[bx * 32 + ty + warps * i, by * 32 + tx] = tile[tx * 33 + ty + warps * i]
                            written[bx * 32 + ty + warps * i, by * 32 + tx] = True
    assert written.all() and not xt[k].any()
    y = np.full((m, n), np.nan)
    writes = np.zeros((m, n), int)
    lane = np.arange(32)
    gl = lane % lanes

    def entry(i, row, lo, hi):
        idx = lo + i * lanes + gl
        inside = idx < hi
        safe = np.where(inside, idx, 0)
        w = cb[row * cb_row + vals[safe].astype(int)] if cb is not None else vals[safe]
        return np.where(inside, w, 0.0), np.where(inside, cols[safe].astype(int), k)

    for by in range(mp // bt):
        for bx in range(-(-n // (warps * g * rpg))):
            for ty in range(warps):
                for r in range(rpg):
                    slot = ((bx * warps + ty) * rpg + r) * g + lane // lanes
                    live = slot < n
                    row = np.where(live, order[np.minimum(slot, n - 1)], 0)
                    lo, hi = np.where(live, ptr[row], 0), np.where(live, ptr[row + 1], 0)
                    cnt = (hi - lo + lanes - 1) // lanes
                    for o in range(g.bit_length() - 1):
                        cnt = np.maximum(cnt, cnt[lane ^ (lanes << o)])
                    assert (cnt == cnt[0]).all()            # warp-uniform: every shfl has all 32 lanes
                    acc = np.zeros((32, vec))
                    nv, nc = entry(0, row, lo, hi)
                    for i in range(cnt[0]):
                        cw, cc = nv, nc
                        nv, nc = entry(i + 1, row, lo, hi)
                        for j in range(lanes):
                            src = lane // lanes * lanes + j     # __shfl_sync(mask, v, j, lanes)
                            c, start = cc[src], by * bt + gl * vec
                            assert ((c * mp + start) % vec == 0).all() and (start + vec <= mp).all()
                            xv = xt[c[:, None], start[:, None] + np.arange(vec)]
                            assert not np.isnan(xv).any()
                            acc += cw[src][:, None] * xv
                    for ln in np.flatnonzero(live):
                        for t in range(vec):
                            b = by * bt + gl[ln] * vec + t
                            if b < m:
                                y[b, row[ln]] = acc[ln, t] + (bias[row[ln]] if bias is not None else 0.0)
                                writes[b, row[ln]] += 1
    assert (writes == 1).all()
    return y


def _random_csr(rng, n, k, density):
    """Rows of random lengths (an empty one, a full one, a single entry among them); column 0 unused."""
    lengths = rng.binomial(k - 1, density, n)
    lengths[:3] = [0, k - 1, 1]
    rng.shuffle(lengths)
    cols = [1 + np.sort(rng.choice(k - 1, size=ln, replace=False)) for ln in lengths]
    ptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return ptr, np.concatenate(cols).astype(np.int64)


@pytest.mark.parametrize("m,n,k,lanes,vec,rpg,lut", [
    (64, 70, 96, 16, 4, 1, 0), (64, 40, 65, 32, 2, 1, 0), (9, 33, 40, 8, 4, 1, 0), (50, 50, 31, 32, 1, 2, 16),
    (33, 20, 64, 8, 4, 2, -16),   # negative lut: per-row codebooks
])
def test_csr_spmm_emulation_matches_the_product(m, n, k, lanes, vec, rpg, lut):
    rng = np.random.default_rng(m * n + k)
    ptr, cols = _random_csr(rng, n, k, 0.15)
    x = rng.standard_normal((m, k))
    x[:, 0] = np.nan               # no stored entry reads column 0: padding must not either (0 * NaN)
    ncb = abs(lut)
    lay = gl.csr_rows(ptr, cols, rng.standard_normal(len(cols)).astype(np.float32) if not lut else
                      rng.integers(0, ncb, len(cols)).astype(np.uint8), k,
                      rng.standard_normal(ncb * (n if lut < 0 else 1)).astype(np.float32) if lut else None)
    assert lay["col_idx"].dtype == np.uint16 and np.all(np.diff(np.diff(ptr)[lay["order"]]) <= 0)
    cb = lay.get("codebook")
    bias = rng.standard_normal(n)
    y = _emulate_spmm(x, lay["values"], lay["col_idx"], lay["row_ptr"], lay["order"], cb, bias, lanes, vec, rpg,
                      cb_row=ncb if lut < 0 else 0)
    w = np.zeros((n, k))
    rows = np.repeat(np.arange(n), np.diff(ptr))
    w[rows, cols] = cb[rows * (ncb if lut < 0 else 0) + lay["values"]] if lut else lay["values"]
    want = np.where(np.isnan(x), 0, x) @ w.T + bias
    np.testing.assert_allclose(y, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("params", [{"lanes": 16, "vec": 4}, {"lanes": 32, "vec": 2}, {"lanes": 8, "vec": 4, "rpg": 2}])
def test_csr_spmm_compiles_to_two_kernels_with_vector_loads(params):
    src = kernel_cuda_source(ck.csr_spmm(64, 4096, 4096, 4096 * 410, "uint16", 0, True, **params))
    assert src.count("__global__ void __launch_bounds__(256)") == 4     # declarations + definitions of 2 kernels
    assert "__shfl_sync" in src and "__syncthreads" in src and f"float{params['vec']}" in src


def test_cuda_sparse_layers_pick_the_spmm_above_eight_rows():
    from codegen.kernel_choice import sparse_plan
    from codegen.target import resolve_target

    w = type("W", (), {"codebook": None})()
    assert sparse_plan(w, 8, (1, 1), resolve_target("cuda"))[0] == "csr_warp"
    assert sparse_plan(w, 9, (1, 1), resolve_target("cuda"))[:2] == ("csr_spmm", "csr16_rows")


def test_gpu_benchmark_spmm_case_emulates_to_its_reference():
    """The batch-64 SpMM row of benchmarks/gpu_kernels.py, on its own weights (one order, equal
    rows), through the lane emulation: what the GPU run checks against torch float64."""
    from benchmarks import gpu_kernels as gk

    n, m = 256, 64
    w = gk.make_weights("csr", n, n)
    vals, cols, ptr, _, bias = w["args"]
    x = np.random.default_rng(1).standard_normal((m, n))
    y = _emulate_spmm(x, vals, cols, ptr, w["order"], None, bias, lanes=16, vec=4)
    np.testing.assert_allclose(y, gk.reference("csr", w, torch.from_numpy(x)).numpy(), rtol=1e-9, atol=1e-9)
