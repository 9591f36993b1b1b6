"""The compressed-op mechanism, proven on squeezer::lut_linear: torch reference, autograd, export."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compiler
from compiler.ops import LutLinear, pack_indices, unpack_indices


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("k", [8, 13, 64])
def test_pack_unpack_round_trip(bits, k):
    idx = torch.randint(0, 2 ** bits, (5, k), generator=torch.Generator().manual_seed(bits * k))
    packed = pack_indices(idx, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-k * bits // 8))
    assert torch.equal(unpack_indices(packed, bits, k), idx)


def test_pack_layout_is_little_endian_within_a_byte():
    assert pack_indices(np.array([[1, 2, 3, 0]]), 2).tolist() == [[1 | 2 << 2 | 3 << 4]]


def test_pack_rejects_out_of_range_and_bad_bits():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_indices(np.array([[4]]), 2)
    with pytest.raises(ValueError, match="bits=3"):
        pack_indices(np.array([[1]]), 3)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_lut_linear_matches_linear_with_decoded_weight(bits):
    torch.manual_seed(0)
    lin = nn.Linear(40, 12)
    lut = LutLinear.from_linear(lin, bits)
    x = torch.randn(2, 3, 40)
    expected = F.linear(x, lut.decoded_weight(), lin.bias)
    assert torch.allclose(lut(x), expected, atol=1e-6)
    # every decoded weight is the nearest codebook entry (linear initialization over [min, max])
    w = lin.weight.detach()
    nearest = (w.unsqueeze(-1) - lut.codebook.detach()).abs().min(-1).values
    assert torch.allclose((lut.decoded_weight() - w).abs(), nearest)
    assert lut.stored_bytes() < 40 * 12 * 4


def test_lut_with_an_exact_codebook_is_lossless():
    w = torch.tensor([[0.5, -1.0, 0.25], [0.25, 0.5, -1.0]])
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(w)
    lut = LutLinear.from_linear(lin, 2, codebook=torch.tensor([-1.0, 0.25, 0.5]))
    x = torch.randn(4, 3)
    assert torch.equal(lut.decoded_weight(), w)
    assert torch.allclose(lut(x), lin(x), atol=1e-7)


def test_codebook_gradient_is_the_sum_over_its_cluster():
    """Deep Compression's centroid fine-tuning: dL/dc_k = sum of dL/dW_ij over weights in cluster k."""
    torch.manual_seed(1)
    lut = LutLinear.from_linear(nn.Linear(16, 6), 2)
    x = torch.randn(5, 16, requires_grad=True)
    lut(x).square().sum().backward()
    w = lut.decoded_weight().detach().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, w, lut.bias.detach()).square().sum().backward()
    idx = unpack_indices(lut.packed, 2, 16)
    expected = torch.stack([w.grad[idx == k].sum() for k in range(4)])
    assert torch.allclose(lut.codebook.grad, expected, atol=1e-4)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


def test_export_keeps_the_op_as_one_node_and_trace_keeps_the_layer():
    lut = LutLinear.from_linear(nn.Linear(8, 4), 4)
    model = nn.Sequential(nn.Linear(8, 8), lut)
    x = torch.randn(2, 8)
    ep = torch.export.export(model, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count("squeezer.lut_linear.default") == 1
    g = compiler.trace(model, x)
    assert type(g.layers()["1"]).__name__ == "LutLinear"


def test_bad_construction_is_named():
    with pytest.raises(ValueError, match="bits=5"):
        LutLinear(torch.zeros(2, 1, dtype=torch.uint8), torch.zeros(4), None, 5, 8)
    with pytest.raises(ValueError, match=r"shape \(out, 4\)"):
        LutLinear(torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(4), None, 4, 8)
    with pytest.raises(ValueError, match="codebook has 3 entries"):
        LutLinear(pack_indices(np.array([[0, 3]]), 2), torch.zeros(3), None, 2, 2)
    with pytest.raises(ValueError, match=r"bias must have shape \(1,\)"):
        LutLinear(pack_indices(np.array([[0, 1]]), 2), torch.zeros(4), torch.zeros(2), 2, 2)
