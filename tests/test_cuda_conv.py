"""The CUDA binary conv (codegen/kernels/cuda_conv.py) without a GPU: a numpy emulation of its two
kernels' index arithmetic (the pack thread's pixel/word decomposition and workspace address, the
conv block's pixel bases, tap offsets, staged weight words and epilogue) against the op's
reference (squeezer::bitserial_conv2d), the generated CUDA, and the lowering picking it. The
numbers themselves are checked on a GPU by benchmarks/gpu_check.py (kernel rows binary-conv)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import codegen
import compiler
from benchmarks import gpu_conv_rows
from codegen import gpu_layouts as gl
from codegen.kernels import cuda_conv as cc
from compiler.ops.bitserial import BitConv2d

from cuda_source import kernel_cuda_source


def _emulate_pack(x: np.ndarray, ph: int, pw: int):
    """Kernel 1: thread i = ((b CW + w) Hp + y) Wp + x -> A, S at ((b Hp + y) Wp + x) CW + w."""
    B, C, H, W = x.shape
    cw, Hp, Wp = cc.conv_words(C), H + 2 * ph, W + 2 * pw
    n_pack = B * Hp * Wp * cw
    i = np.arange(n_pack)
    px, py, w, b = i % Wp, i // Wp % Hp, i // (Hp * Wp) % cw, i // (Hp * Wp * cw)
    word = np.zeros(n_pack, np.uint64)
    s = np.zeros(n_pack, np.float32)
    inside = (ph <= py) & (py < ph + H) & (pw <= px) & (px < pw + W)
    for j in range(32):
        c = w * 32 + j
        real = c < C
        xv = np.where(real & inside, x[b, np.minimum(c, C - 1), np.clip(py - ph, 0, H - 1), np.clip(px - pw, 0, W - 1)],
                      np.float32(0))
        bit = np.where(inside, xv >= 0, True) & real
        s = s + np.where(real & inside, np.abs(xv), np.float32(0)).astype(np.float32)
        word |= bit.astype(np.uint64) << np.uint64(j)
    addr = (b * Hp * Wp + i % (Hp * Wp)) * cw + w
    A, S = np.zeros(n_pack, np.uint32), np.zeros(n_pack, np.float32)
    A[addr], S[addr] = word.astype(np.uint32), s
    return A, S


def _emulate_conv(x, wt, alpha, bias, n_out, kernel, stride, padding, dilation, xnor, rpt, pp):
    """Kernel 2 for every (block, warp, lane, pixel, channel), vectorized over pixels and channels."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    B, C, H, W = x.shape
    A, S = _emulate_pack(x, ph, pw)
    cw, kt = cc.conv_words(C), kh * kw
    kc, Hp, Wp, nt = kt * cw, H + 2 * ph, W + 2 * pw, cc.WARPS * rpt
    OH, OW = (Hp - dh * (kh - 1) - 1) // sh + 1, (Wp - dw * (kw - 1) - 1) // sw + 1
    P = B * OH * OW
    npt, nct = -(-P // (32 * pp)), -(-n_out // nt)
    bx, i, tx = np.meshgrid(np.arange(npt), np.arange(pp), np.arange(32), indexing="ij")
    p = ((bx * pp + i) * 32 + tx).reshape(-1)
    base = np.where(p < P, (p // (OH * OW) * Hp * Wp + p % (OH * OW) // OW * sh * Wp + p % OW * sw) * cw, 0)
    q = np.arange(kc)
    off = (q // cw // kw * dh * Wp + q // cw % kw * dw) * cw + q % cw              # (tap, word) -> offset
    a = A[base[:, None] + off[None, :]]                                           # (pixels, kc)
    scale = S[base[:, None] + off[None, :]].astype(np.float64).sum(1) / (C * kt) if xnor else np.ones(len(p))
    by, ty, r = np.meshgrid(np.arange(nct), np.arange(cc.WARPS), np.arange(rpt), indexing="ij")
    n = (by * nt + ty * rpt + r).reshape(-1)
    ws = wt[(by * kc * nt).reshape(-1)[:, None] + q[None, :] * nt + (ty * rpt + r).reshape(-1)[:, None]]  # (ch, kc)
    acc = np.bitwise_count(a[None, :, :] ^ ws[:, None, :]).astype(np.int64).sum(-1)         # (ch, pixels)
    keep_n, keep_p = n < n_out, p < P
    y = np.zeros((B, n_out, OH, OW))
    nn_, pp_ = n[keep_n], p[keep_p]
    val = (C * kt - 2 * acc[keep_n][:, keep_p]) * scale[keep_p][None, :] * alpha[nn_][:, None] + bias[nn_][:, None]
    y[pp_[None, :] // (OH * OW), nn_[:, None], pp_[None, :] % (OH * OW) // OW, pp_[None, :] % OW] = val
    return y


def _layer(c_in, n_out, kernel, stride, padding, dilation, xnor, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, c_in, *kernel, generator=g)
    return BitConv2d((w >= 0)[None], [2.0], -1.0, w.abs().mean((1, 2, 3)), torch.randn(n_out, generator=g),
                     stride, padding, dilation, "sign", xnor_scale=xnor).eval()


CASES = [  # batch, c_in, h, w, n_out, kernel, stride, padding, dilation, xnor, rpt, pp
    (1, 256, 14, 14, 256, (3, 3), (1, 1), (1, 1), (1, 1), True, 4, 1),
    (2, 64, 10, 10, 96, (3, 3), (1, 1), (1, 1), (1, 1), True, 8, 2),
    (2, 6, 14, 14, 16, (5, 5), (1, 1), (0, 0), (1, 1), True, 2, 2),
    (1, 40, 9, 7, 10, (3, 3), (2, 1), (1, 2), (2, 1), False, 1, 1),
]


@pytest.mark.parametrize("case", CASES)
def test_binary_conv_emulation_matches_the_op(case):
    B, C, H, W, N, kernel, stride, padding, dilation, xnor, rpt, pp = case
    layer = _layer(C, N, kernel, stride, padding, dilation, xnor, seed=C)
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(1))
    x[0, 0, 0, 0] = 0.0                                   # sign(0) = +1, as the op
    wt = gl.binary_conv_tiles(layer.w_planes[0].numpy(), kernel[0] * kernel[1], C, cc.WARPS * rpt)
    y = _emulate_conv(x.numpy(), wt, layer.alpha.numpy().astype(np.float64), layer.bias.detach().numpy(), N, kernel,
                      stride, padding, dilation, xnor, rpt, pp)
    with torch.no_grad():
        ref = layer(x).double().numpy()
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rpt,pp", [(4, 1), (8, 2), (2, 1)])
def test_binary_conv_compiles_to_popc_over_staged_weights(rpt, pp):
    func = cc.binary_conv2d(1, 256, 14, 14, 256, (3, 3), (1, 1), (1, 1), (1, 1), True, rpt=rpt, pp=pp)
    assert [tuple(int(d) for d in p.ty.shape) for p in func.params][1] == \
        gl.binary_conv_tiles(np.zeros((256, 9 * 32), np.uint8), 9, 256, cc.WARPS * rpt).shape
    src = kernel_cuda_source(func)
    assert src.count("__global__ void __launch_bounds__(256)") == 4     # declarations + definitions of 2 kernels
    assert "__popc" in src and "__shared__" in src and "__syncthreads" in src
    assert ("uint4" in src) == (rpt % 4 == 0)


@pytest.mark.slow
def test_cuda_binary_convs_pick_the_implicit_gemm_unless_it_is_held_back(monkeypatch):
    """It passed its GPU check, so builds choose it; a kernel listed in gpu_verified.UNVERIFIED is
    chosen only when SQUEEZER_CUDA_UNVERIFIED names it (how the next new kernel will land)."""
    from codegen.kernels import gpu_verified

    layer = _layer(64, 32, (3, 3), (1, 1), (1, 1), (1, 1), True, seed=0)
    g = compiler.trace(nn.Sequential(layer).eval(), (torch.randn(1, 64, 8, 8),))
    monkeypatch.delenv("SQUEEZER_CUDA_UNVERIFIED", raising=False)
    src = codegen.build(g, "cuda").kernel_source()
    assert "binary_conv2d_cuda" in src and "__popc" in src
    monkeypatch.setattr(gpu_verified, "UNVERIFIED", frozenset({"binary_conv2d_cuda"}))
    assert "binary_conv2d_cuda" not in codegen.build(g, "cuda").kernel_source()
    monkeypatch.setenv("SQUEEZER_CUDA_UNVERIFIED", "binary_conv2d_cuda")
    assert "binary_conv2d_cuda" in codegen.build(g, "cuda").kernel_source()


@pytest.mark.parametrize("variant", range(len(gpu_conv_rows.VARIANTS)))
def test_gpu_benchmark_conv_case_fits_and_emulates_to_its_reference(variant):
    """The bconv rows of benchmarks/gpu_kernels.py: the weights made on the GPU machine fit the
    exported kernel's buffers, and the kernel emulated on them is the row's float64 reference."""
    from benchmarks import gpu_kernels as gk

    case = next(c for c in gk.cases(("bconv",)) if c["name"] == f"bconv-14-b1-v{variant}")
    func = gk.kernel_func(case)
    w = gk.case_weights(case)
    x_shape, y_shape = gk.io_shapes(case)
    arrays = [np.zeros(x_shape, np.float32), *gk.kernel_args(case, w), np.zeros(y_shape, np.float32)]
    assert [(tuple(int(d) for d in p.ty.shape), str(p.ty.dtype)) for p in func.params] == \
        [(a.shape, str(a.dtype)) for a in arrays]
    x = torch.randn(*x_shape, generator=torch.Generator().manual_seed(3))
    ref = gk.reference("bconv", w, x).numpy()
    wt, alpha, bias = w["args"]
    y = _emulate_conv(x.numpy(), wt, alpha.astype(np.float64), bias, case["n"], (3, 3), (1, 1), (1, 1), (1, 1), True,
                      **case["params"])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
