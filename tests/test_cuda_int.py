"""The CUDA ``__dp4a`` GEMV of the integer Linears (codegen/kernels/cuda_int.py) without a GPU: a
numpy emulation of what each lane reads and computes — the staged signed activation words, the
interleaved weight words, the nibble widening, the group scales, the folded corrections — against
the ops' reference, and the CUDA build choosing it only where allowed (gpu_verified.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import codegen
import compiler
from codegen.gpu_layouts import padded_words, vector_width
from codegen.kernels import cuda_int
from codegen.lowering import integer_cuda
from codegen.lowering.int4 import _Weights
from compiler.ops import Int4Linear, IntLinear
from compiler.ops.integer import quantize_codes


def _bytes(words: np.ndarray) -> np.ndarray:
    """int32 words -> their four signed bytes (little-endian), last axis."""
    return np.ascontiguousarray(words.astype(np.int32)).view(np.int8).reshape(*words.shape, 4).astype(np.int64)


def _signed_nibbles(words: np.ndarray, shift: int) -> np.ndarray:
    """__vsub4((w >> shift) & 0x0F0F0F0F, 0x08080808) as four signed bytes."""
    low = (words.astype(np.int64) >> shift) & 0x0F0F0F0F
    return np.ascontiguousarray(low.astype(np.uint32)).view(np.uint8).reshape(*words.shape, 4).astype(np.int64) - 8


def _emulate(codes: np.ndarray, arrays: list[np.ndarray], k: int, int4: bool, group_size: int) -> np.ndarray:
    """The kernel's result for activation codes (M, Kp) uint8, lane by lane (cuda_int.int_gemv)."""
    w, c, s, sc, bi = arrays
    m, n = codes.shape[0], w.shape[0]
    ka = -(-k // (8 if int4 else 4)) * (8 if int4 else 4) // 4
    kw = ka // 2 if int4 else ka
    v, kwp = vector_width(kw), padded_words(kw)
    ch, halves, groups = 32 * v, 2 if int4 else 1, s.shape[1]
    staged = np.zeros((m, halves, kwp, 4), np.int64)
    words = np.ascontiguousarray(codes).view(np.int32).reshape(m, ka)
    flipped = _bytes(words ^ np.int32(cuda_int.SIGN_FLIP - (1 << 32)))
    for idx in range(ka):
        staged[:, idx % halves, idx // halves] = flipped[:, idx]
    lanes = np.arange(32)
    y = np.zeros((m, n))
    for b in range(m):
        part = np.zeros((n, 32))
        for chunk in range(kwp // ch):
            for j in range(v):
                wv = w[:, chunk * ch + lanes * v + j]                   # (N, 32): lane tx's j-th loaded word
                nat = chunk * ch + 32 * j + lanes                       # the natural word it stands for
                if int4:
                    core = (_signed_nibbles(wv, 0) * staged[b, 0, nat]).sum(-1) + \
                           (_signed_nibbles(wv, 4) * staged[b, 1, nat]).sum(-1)
                    scale = s[:, np.minimum(nat * 8 // group_size, groups - 1)]
                    part += (core.astype(np.float32) * scale).astype(np.float32)
                else:
                    part += (_bytes(wv) * staged[b, 0, nat]).sum(-1)
        total = part.sum(1)
        y[b] = total + bi if int4 else (total - c).astype(np.float32) * sc + bi
    return y


CASES = [(3, 100, 40, 32), (1, 4096, 48, 128), (8, 520, 33, 8), (2, 64, 16, 64)]


@pytest.mark.parametrize("m,k,n,group", CASES)
def test_int4_dp4a_emulation_matches_the_op(m, k, n, group):
    g = torch.Generator().manual_seed(m + k)
    codes = torch.randint(-7, 8, (n, k), generator=g).to(torch.int8)
    w_scale = torch.rand(n, -(-k // group), generator=g) * 0.05 + 1e-3
    layer = Int4Linear(codes, w_scale, torch.randn(n, generator=g), 0.037, 91, group_size=group)
    x = torch.randn(m, k, generator=g) * 3
    wts = _Weights(codes.numpy()[:, None, :], w_scale.numpy(), layer.bias.detach().numpy(), 0.037, 91, group)
    arrays = integer_cuda.int4_arrays(wts.codes[:, 0], wts.scale.T, wts.bias, 91, group)
    q = np.zeros((m, wts.cg), np.uint8)
    q[:, :k] = quantize_codes(x, 0.037, 91, 8).numpy()
    want = layer(x).detach().numpy()
    got = _emulate(q, arrays, wts.cg, True, group)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("m,k,n", [(3, 100, 40), (1, 4096, 48), (8, 130, 33)])
def test_int8_dp4a_emulation_matches_the_op(m, k, n):
    g = torch.Generator().manual_seed(k)
    codes = torch.randint(-127, 128, (n, k), generator=g).to(torch.int8)
    w_scale, bias = torch.rand(n, generator=g) * 0.01 + 1e-3, torch.randn(n, generator=g)
    layer = IntLinear(codes, w_scale, bias, 0.037, 200)
    x = torch.randn(m, k, generator=g) * 3
    scale = np.float32(0.037) * w_scale.numpy()
    arrays = integer_cuda.int8_arrays(codes.numpy(), scale, bias.numpy(), 200)
    q = np.zeros((m, -(-k // 4) * 4), np.uint8)
    q[:, :k] = quantize_codes(x, 0.037, 200, 8).numpy()
    want = layer(x).detach().numpy()
    np.testing.assert_allclose(_emulate(q, arrays, k, False, 0), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_cuda_builds_choose_dp4a_only_once_allowed(monkeypatch):
    layer = Int4Linear(torch.randint(-7, 8, (40, 96)).to(torch.int8), torch.rand(40, 3) + 0.1, None, 0.05, 3,
                       group_size=32)
    graph = compiler.trace(layer, (torch.randn(2, 96),))
    assert "__dp4a" not in codegen.build(graph, "cuda").kernel_source()      # not yet run on a GPU
    monkeypatch.setenv("SQUEEZER_CUDA_UNVERIFIED", "int_gemv_dp4a")
    src = codegen.build(graph, "cuda").kernel_source()
    assert "__dp4a" in src and "__vsub4" in src and "__shfl_xor_sync" in src
    big = compiler.trace(layer, (torch.randn(cuda_int.MAX_ROWS + 1, 96),))   # past the GEMV: the portable kernel
    assert "__dp4a" not in codegen.build(big, "cuda").kernel_source()
