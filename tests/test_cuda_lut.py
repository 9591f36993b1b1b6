"""The CUDA tiled LUT GEMM (codegen/kernels/cuda_lut.py) without a GPU: a numpy emulation of each
block's staging (the activation tile's padded rows, each weight word's outputs and inputs decoded
through the codebook) and register tiles against X · decode(W)^T, the generated CUDA, and the
lowering picking it past the GEMV's batch. Numbers on a GPU: benchmarks/gpu_check.py (lut rows)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import codegen
import compiler
from codegen import gpu_layouts as gl
from codegen.kernels import cuda_lut as cl
from cuda_source import kernel_cuda_source


def _emulate(x, wi, cb, bias, n, bits, ncb, per_row, tm, tn):
    """Every block (by, bx) and K step as the kernel stages it; the register tiles as one product."""
    m, k = x.shape
    per, mask = 32 // bits, (1 << bits) - 1
    BM, BN, BK, NT = cl.SIDE * tm, cl.SIDE * tn, cl.BK, cl.SIDE * cl.SIDE
    wpr, RS = BK // per, BK + 1
    TW = BN * wpr
    nbk, nbn, nbm = -(-k // BK), -(-n // BN), -(-m // BM)
    y = np.zeros((m, n))
    ia = np.arange(BM * BK)                                    # q NT + tid over the unrolled q
    iw = np.arange(TW)
    for by in range(nbm):
        for bx in range(nbn):
            acc = np.zeros((BM, BN))
            for kb in range(nbk):
                As = np.full(BM * RS, np.nan)
                rows, cols = by * BM + ia // BK, kb * BK + ia % BK
                ok = (rows < m) & (cols < k)
                As[ia // BK * RS + ia % BK] = np.where(ok, x[np.minimum(rows, m - 1), np.minimum(cols, k - 1)], 0)
                Ws = np.full(BK * BN, np.nan)
                word = wi[(bx * nbk + kb) * TW + iw].astype(np.int64)
                for t in range(per):
                    code = (word >> (bits * t)) & mask
                    val = cb[np.minimum(bx * BN + iw % BN, n - 1) * ncb + code] if per_row else cb[code]
                    Ws[(iw // BN * per + t) * BN + iw % BN] = val
                acc += As.reshape(BM, RS)[:, :BK] @ Ws.reshape(BK, BN)
            for i in range(BM):
                mm = by * BM + i
                nn_ = bx * BN + np.arange(BN)
                if mm < m:
                    keep = nn_ < n
                    y[mm, nn_[keep]] = acc[i, keep] + (bias[nn_[keep]] if bias is not None else 0)
    return y


CASES = [  # m, k, n, bits, ncb, per_row, bias, tm, tn
    (64, 512, 256, 4, 16, False, True, 4, 4),
    (20, 1000, 300, 2, 4, True, False, 4, 2),
    (40, 300, 100, 8, 256, False, True, 2, 1),
    (16, 100, 50, 1, 2, False, True, 1, 4),
]


@pytest.mark.parametrize("case", CASES)
def test_lut_gemm_emulation_matches_the_product(case):
    m, k, n, bits, ncb, per_row, has_bias, tm, tn = case
    rng = np.random.default_rng(k)
    idx = rng.integers(0, ncb, (n, k)).astype(np.uint8)
    cb = rng.standard_normal(ncb * n if per_row else ncb)
    x = rng.standard_normal((m, k))
    bias = rng.standard_normal(n) if has_bias else None
    wi = gl.lut_gemm_tiles(idx, bits, cl.SIDE * tn)
    func = cl.lut_gemm(m, k, n, bits, ncb, has_bias, per_row, tm, tn)
    assert tuple(int(d) for d in func.params[1].ty.shape) == wi.shape
    dense = cb.reshape(n, ncb)[np.arange(n)[:, None], idx] if per_row else cb[idx]
    want = x @ dense.T + (bias if has_bias else 0)
    np.testing.assert_allclose(_emulate(x, wi, cb, bias, n, bits, ncb, per_row, tm, tn), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("tm,tn", [(4, 4), (2, 4), (4, 2)])
def test_lut_gemm_compiles_to_shared_tiles(tm, tn):
    src = kernel_cuda_source(cl.lut_gemm(64, 4096, 4096, 4, 16, True, False, tm, tn))
    assert "__shared__" in src and "__syncthreads" in src and f"float{tn}" in src
    assert "__launch_bounds__(256)" in src


@pytest.mark.slow
def test_cuda_lut_linears_pick_the_gemm_past_the_gemv(monkeypatch):
    """The GEMM passed its GPU check (codegen/kernels/gpu_verified.py): chosen by default."""
    from compiler.ops import LutLinear

    monkeypatch.delenv("SQUEEZER_CUDA_UNVERIFIED", raising=False)
    torch.manual_seed(0)
    layer = LutLinear.from_linear(nn.Linear(512, 256), 4)
    for m, name in ((4, "lut_warp"), (32, "lut_gemm")):
        src = codegen.build(compiler.trace(nn.Sequential(layer).eval(), (torch.randn(m, 512),)), "cuda").kernel_source()
        assert name in src, (m, name)


@pytest.mark.parametrize("params", [{"gemm": True, "tm": 4, "tn": 4}, {"gemm": True, "tm": 4, "tn": 2}])
def test_gpu_benchmark_lut_gemm_case_fits_and_emulates_to_its_reference(params):
    """The batch-64 LUT rows of benchmarks/gpu_kernels.py: the weights made on the GPU machine fit
    the exported kernel, and the kernel emulated on them is the row's float64 reference."""
    from benchmarks import gpu_kernels as gk

    n, m = 256, 64
    case = {"kind": "lut", "n": n, "k": n, "batch": m, "params": params}
    func = gk.kernel_func(case)
    w = gk.make_weights("lut", n, n)
    args = gk.kernel_args(case, w)
    arrays = [np.zeros((m, n), np.float32), *args, np.zeros((m, n), np.float32)]
    assert [(tuple(int(d) for d in p.ty.shape), str(p.ty.dtype)) for p in func.params] == \
        [(a.shape, str(a.dtype)) for a in arrays]
    x = np.random.default_rng(1).standard_normal((m, n))
    y = _emulate(x, args[0], args[1].astype(np.float64), args[2].astype(np.float64), n, 4, 16, False, params["tm"],
                 params["tn"])
    np.testing.assert_allclose(y, gk.reference("lut", w, torch.from_numpy(x)).numpy(), rtol=1e-9, atol=1e-9)
