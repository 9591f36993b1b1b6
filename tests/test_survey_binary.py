"""Issue 23, the survey's binary / low-bit methods: Bi-Real Net (Liu et al. 2018), Tang, Hua & Wang
(2017), TBN (Wan et al. 2018) and Network Sketching (Guo et al. 2017), each tested on the property
its paper relies on, and compiled (the bit-plane kernels) against the torch deploy model. Tiny models
keep the file to seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import codegen
import compiler
from compiler.errors import OptionError
from compiler.ops.bitserial import bitserial_linear, pack_bits
from passes import Binarize, NetworkSketching, QuantConv2d, bipolar_regularizer, clip_latent, tang_config
from passes.binary_survey import ApproxSign, MagnitudeAwareSign, TernaryInputBitConv2d, approx_sign_grad, tbn_dot
from passes.sketching import sketch, sketch_errors


class _Net(nn.Module):
    """stem conv -> a shape-keeping conv + BN (a Bi-Real block) -> a shape-changing conv -> ReLU -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 4, 3)
        self.head = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        x = F.hardtanh(self.stem(x))
        x = self.bn(self.conv(x))
        return self.head(F.relu(self.down(x)).flatten(1))


def _net():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    return compiler.trace(_Net().eval(), (x[:1],)), x


def _compiled_matches(graph, x1) -> None:
    """The compiled module equals the torch deploy model within 1e-5 of the output's range."""
    with torch.no_grad():
        ref = graph.module.eval()(x1).numpy()
    out = codegen.build(graph)(x1.numpy())
    assert np.abs(out - ref).max() <= 1e-5 * max(np.abs(ref).max(), 1.0)


# ---- Bi-Real Net ---------------------------------------------------------------------------------------
def test_bireal_shortcut_carries_the_real_valued_activation_exactly():
    g, x = _net()
    g2 = Binarize(method="bireal", layers=("conv", "down"))(g)
    text = str(g2.reports[-1])
    assert "conv: Bi-Real real-valued shortcut around bn" in text
    assert "down: no Bi-Real shortcut" in text              # 8x8x8 -> 4x6x6: shapes differ
    with torch.no_grad():
        g2.module.bn.weight.zero_()
        g2.module.bn.bias.zero_()                           # the binary branch now outputs 0 ...
        seen = {}
        g2.module.down.register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
        g2.module(x)
        real = F.hardtanh(g.module.stem(x))
    assert torch.equal(seen["x"], real)                     # ... so the block passes x on unchanged


def test_approx_sign_derivative_is_the_papers_piecewise_polynomial():
    x = torch.linspace(-1.5, 1.5, 601, dtype=torch.float64, requires_grad=True)
    y = ApproxSign.apply(x)
    assert torch.equal(y, torch.where(x >= 0, 1.0, -1.0).double())
    y.sum().backward()
    xs = x.detach()
    expected = torch.where((xs >= -1) & (xs < 0), 2 + 2 * xs, torch.where((xs >= 0) & (xs < 1), 2 - 2 * xs, 0 * xs))
    assert torch.allclose(x.grad, expected)
    # it is the derivative of ApproxSign: -1 | 2x + x^2 | 2x - x^2 | 1
    poly = lambda v: torch.where(v < -1, -1.0, torch.where(v < 0, 2 * v + v * v, torch.where(v < 1, 2 * v - v * v, 1.0)))  # noqa: E731
    h = 1e-6
    assert torch.allclose(approx_sign_grad(xs), (poly(xs + h) - poly(xs - h)) / (2 * h), atol=1e-5)


def test_magnitude_aware_weight_and_its_gradient():
    torch.manual_seed(1)
    w = (torch.randn(3, 2, 2, 2) * 0.8).requires_grad_()
    wb = MagnitudeAwareSign.apply(w)
    alpha = w.detach().abs().reshape(3, -1).mean(1).reshape(3, 1, 1, 1)
    assert torch.allclose(wb, alpha * torch.where(w >= 0, 1.0, -1.0))
    g = torch.randn_like(w)
    wb.backward(g)
    assert torch.allclose(w.grad, g * alpha * (w.detach().abs() < 1))


# ---- Tang et al. ---------------------------------------------------------------------------------------
def test_tang_prelu_bn_order_regularizer_and_schedule():
    g, x = _net()
    g1 = Binarize(method="tang", stage="train", layers=("down",))(g)
    order = [n.target for n in g1.module.graph.nodes if n.op == "call_module"]
    assert order[order.index("down"):order.index("down") + 3] == ["down", "down_prelu", "down_bn"]   # conv -> PReLU -> BN
    assert isinstance(g1.module.down_prelu, nn.PReLU) and g1.module.down_prelu.weight.numel() == 4
    layer = g1.module.down
    reg = bipolar_regularizer(1.0)
    with torch.no_grad():
        layer.weight.copy_(torch.where(torch.rand_like(layer.weight) < 0.5, 1.0, -1.0))
    assert float(reg(g1.module)) == 0.0                     # zero at ±1 ...
    with torch.no_grad():
        layer.weight.uniform_(-0.5, 0.5)
    assert float(reg(g1.module)) > 0                        # ... positive inside
    opt = torch.optim.SGD([layer.weight], lr=0.05)
    before = float(layer.weight.abs().mean())
    for step in range(20):                                  # the regularizer alone pulls |w| toward 1
        opt.zero_grad()
        reg(g1.module).backward()
        opt.step()
        clip_latent(g1.module, step)
    assert float(layer.weight.abs().mean()) > before + 0.2 and float(layer.weight.abs().max()) <= 1.0
    config = tang_config(epochs=1)
    assert config.lr_schedule == "cosine" and config.weight_decay == 0.0 and config.step_callback is clip_latent
    packed = Binarize(method="tang")(g1).module.down
    assert torch.allclose(packed.alpha, layer.tang_scale.detach().expand(4))   # the scale layer, folded in


def test_bireal_and_tang_compile_to_the_popcount_kernels():
    g, x = _net()
    g1 = Binarize(method="bireal", stage="train", layers=("conv",))(g)
    g2 = Binarize(method="tang", layers=("down",))(Binarize(method="bireal", layers=("conv",))(g1))
    with torch.no_grad():
        g2.module.down_bn.running_mean.uniform_(-0.5, 0.5)  # a BatchNorm that is not the identity
    assert type(g2.module.conv).__name__ == type(g2.module.down).__name__ == "BitConv2d"
    _compiled_matches(g2, x[:1])


# ---- TBN -----------------------------------------------------------------------------------------------
def test_tbn_ternary_binary_dot_product_equals_the_float_one():
    rng = np.random.default_rng(0)
    for k in (1, 63, 64, 300):
        a = rng.integers(-1, 2, k)
        w = np.where(rng.random(k) < 0.5, 1, -1)
        assert tbn_dot(a, w) == int((a * w).sum())
    # the op's two activation planes (AND-popcounts) compute the same products
    x = torch.tensor(rng.standard_normal((5, 100)), dtype=torch.float32)
    planes = torch.tensor(rng.random((1, 7, 100)) < 0.5)
    y = bitserial_linear(x, pack_bits(planes), torch.tensor([2.0]), -1.0, torch.ones(7), None, 100, "ternary", 2, False)
    t = (x > 0.5).double() - (x < -0.5).double()
    assert torch.allclose(y.double(), t @ (2 * planes[0].double() - 1).T)


def test_tbn_trains_deploys_and_compiles_exactly():
    g, x = _net()
    g1 = Binarize(method="tbn", stage="train", layers=("conv", "head"), tbn_delta=0.5)(g)
    g1.module.train()
    with torch.no_grad():
        g1.module(x)                                        # the running threshold and scale
    g1.module.eval()
    conv = g1.module.conv
    assert float(conv.tbn_threshold) > 0 and isinstance(conv, QuantConv2d)
    g2 = Binarize(method="tbn", layers=("conv", "head"))(g1)
    assert isinstance(g2.module.conv, TernaryInputBitConv2d) and g2.module.conv.a_mode == "ternary"
    with torch.no_grad():
        assert torch.allclose(g2.module(x), g1.module(x), atol=1e-5)   # packed == fake-quantized
    _compiled_matches(g2, x[:1])                            # padded conv and linear, ternary planes
    with pytest.raises(OptionError, match="method=tbn packs its activation threshold"):
        Binarize(method="tbn", layers=("conv",))(g)         # no statistics yet


# ---- Network Sketching ---------------------------------------------------------------------------------
def test_sketching_error_falls_with_every_plane_and_refined_scales_are_least_squares():
    torch.manual_seed(2)
    w = torch.randn(6, 4, 3, 3)
    for method in ("direct", "refined"):
        errors = sketch_errors(w, 5, method)
        assert all(b < a for a, b in zip(errors, errors[1:])), (method, errors)
    assert all(r <= d + 1e-12 for r, d in zip(sketch_errors(w, 5, "refined"), sketch_errors(w, 5, "direct")))
    bases, scales = sketch(w, 3, "refined")
    flat = w.reshape(6, -1).double().numpy()
    for n in range(6):                                      # each filter's scales: argmin ||w - B a||
        solution = np.linalg.lstsq(bases[:, n].numpy().T, flat[n], rcond=None)[0]
        assert np.allclose(scales[:, n].numpy(), solution)
    b1, a1 = sketch(w, 1, "direct")                         # the first plane: sign(W), mean |W| per filter
    assert torch.equal(b1[0], torch.where(w.reshape(6, -1) >= 0, 1.0, -1.0).double())
    assert torch.allclose(a1[0], w.reshape(6, -1).abs().mean(1).double())


def test_sketching_deploys_to_bit_planes_and_compiles():
    g, x = _net()
    g2 = NetworkSketching(planes=3, method="refined", layers=("conv", "down"))(g)
    assert [type(m).__name__ for m in g2.module.conv] == ["BitConv2d"] * 3
    with torch.no_grad():
        dense = sum(m.dense_weight() for m in g2.module.conv)
        b, a = sketch(g.module.conv.weight, 3, "refined")
        assert torch.allclose(dense.reshape(8, -1), (a[:, :, None] * b).sum(0), atol=1e-6)
    _compiled_matches(g2, x[:1])


# ---- options -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, option", [
    (lambda: Binarize(method="bireal", activations="ternary"), "activations"),
    (lambda: Binarize(method="tbn", tbn_delta=0.0), "tbn_delta"),
    (lambda: Binarize(method="bi-real"), "method"),
    (lambda: NetworkSketching(planes=0), "planes"),
    (lambda: NetworkSketching(method="greedy"), "method"),
])
def test_bad_options_name_the_option(make, option):
    with pytest.raises(OptionError, match=option):
        make()


def test_methods_are_listed_and_parse_from_specs(capsys):
    from compiler.registry import parse_pass_spec
    from squeezer.cli import main

    assert parse_pass_spec("binarize:method=bireal,shortcut=false").shortcut is False
    assert parse_pass_spec("network-sketching:planes=3,method=direct").planes == 3
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "network-sketching" in out and all(m in out for m in ("bireal", "tang", "tbn"))
    g, _ = _net()
    with pytest.raises(OptionError, match="activations"):
        Binarize(method="tbn", activations="sign", layers=("conv",))(g)
