"""Scaled dot-product attention as one fused CPU kernel (codegen/kernels/attention_cpu.py):
the compiled model matches torch's SDPA for every mask form, causal, scale, grouped-query and
cross attention, fully masked rows (zeros) and NaN (NaN), and the kernel is what runs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import codegen
import compiler
from codegen.options import BuildOptions
from codegen.relax_pipeline import kernel_calls, scheduled_module
from codegen.frontend import import_graph


class Attention(nn.Module):
    def __init__(self, mask=None, **kwargs):
        super().__init__()
        self.kwargs = kwargs
        self.register_buffer("mask", mask)

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, **self.kwargs)


def _build_and_compare(model, inputs):
    graph = compiler.trace(model.eval(), inputs)
    calls = kernel_calls(scheduled_module(import_graph(graph)[0], BuildOptions.create("llvm")))
    got = np.asarray(codegen.build(graph, "llvm")(*inputs))
    with torch.no_grad():
        ref = model(*inputs).numpy()
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    assert np.abs(got[finite] - ref[finite]).max() <= 1e-4 * max(np.abs(ref[finite]).max(), 1e-30)
    return calls


def _qkv(b, h, rows, keys, d, hk=None, dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, rows, d, generator=g), torch.randn(b, hk or h, keys, d, generator=g),
            torch.randn(b, hk or h, keys, dv or d, generator=g))


def _fused(calls) -> bool:
    return any(name.startswith("fused_attention_") for name in calls)


@pytest.mark.parametrize("shape", [(1, 12, 197, 197, 64), (2, 3, 13, 13, 16), (1, 2, 5, 40, 8), (2, 4, 33, 7, 32)])
def test_plain_attention_runs_fused_and_matches_torch(shape):
    """ViT's shape (197 keys, padded to whole vectors), short and cross-attention shapes."""
    assert _fused(_build_and_compare(Attention(), _qkv(*shape)))


@pytest.mark.parametrize("mask_shape, dtype", [((2, 1, 1, 13), torch.float32), ((9, 13), torch.float32),
                                               ((2, 3, 9, 13), torch.float32), ((1, 1, 9, 13), torch.bool),
                                               ((1, 13), torch.bool)])
def test_masks_in_every_broadcast_form(mask_shape, dtype):
    """Additive float masks and boolean keep-masks, broadcast from any of their axes."""
    g = torch.Generator().manual_seed(1)
    mask = torch.randn(mask_shape, generator=g) if dtype == torch.float32 else torch.rand(mask_shape, generator=g) > 0.3
    if dtype == torch.bool:
        mask[..., 0] = True
    assert _fused(_build_and_compare(Attention(mask), _qkv(2, 3, 9, 13, 16)))


def test_fully_masked_rows_give_zeros_and_causal_keeps_the_past():
    mask = torch.ones(1, 1, 6, 20, dtype=torch.bool)
    mask[..., 2, :] = False                      # a row with no key: torch's safe softmax gives zeros
    calls = _build_and_compare(Attention(mask), _qkv(1, 2, 6, 20, 16))
    assert _fused(calls)
    assert _fused(_build_and_compare(Attention(is_causal=True), _qkv(2, 2, 11, 11, 16)))
    assert _fused(_build_and_compare(Attention(is_causal=True), _qkv(1, 2, 5, 9, 16)))


def test_scale_grouped_query_and_value_width():
    assert _fused(_build_and_compare(Attention(scale=0.3), _qkv(1, 2, 10, 10, 16)))
    assert _fused(_build_and_compare(Attention(enable_gqa=True), _qkv(2, 6, 9, 9, 16, hk=2)))
    assert _fused(_build_and_compare(Attention(), _qkv(1, 2, 10, 12, 16, dv=24)))


def test_a_nan_query_poisons_its_row_only():
    """As torch's math path (its reference semantics) has it: a NaN score makes its row NaN. (torch's
    fused CPU kernel returns zeros for that row instead; the decomposed graph gave NaN too.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _qkv(1, 2, 7, 10, 16)
    q[0, 1, 3, 0] = float("nan")
    with sdpa_kernel(SDPBackend.MATH):
        calls = _build_and_compare(Attention(), (q, k, v))
    assert _fused(calls)


def test_attention_too_long_for_the_kernel_keeps_the_decomposed_form():
    """A score tile that would not fit the stack (4200 keys) is decomposed as before."""
    calls = _build_and_compare(Attention(), _qkv(1, 1, 3, 4200, 8))
    assert not _fused(calls)


def test_multihead_attention_layer_uses_one_kernel_for_every_call():
    torch.manual_seed(0)
    layer = nn.Sequential(*(nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True) for _ in range(2)))
    x = torch.randn(2, 17, 64)
    graph = compiler.trace(layer.eval(), (x,))
    calls = kernel_calls(scheduled_module(import_graph(graph)[0], BuildOptions.create("llvm")))
    fused = [name for name in calls if name.startswith("fused_attention_")]
    assert len(fused) == 1 and calls[fused[0]] == 2, calls
    with torch.no_grad():
        ref = layer(x).numpy()
    got = codegen.build(graph, "llvm")(x)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
