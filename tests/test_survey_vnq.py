"""Issue 23: Variational Network Quantization (Achterhold et al., ICLR 2018), ``cluster-train:method=vnq``:
the KL approximation's properties the paper relies on, the local reparameterization, training toward
the ternary codebook, the nearest-centre deployment and the compiled module. A tiny conv + linear
model on synthetic learnable data keeps the file to seconds (the build dominates)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compiler
from compiler.errors import OptionError
from compiler.ops.lut_linear import LutConv2d, LutLinear
from compiler.ops.sparse import SparseConv2d, SparseLinear
from trained_task import compiled_matches_torch, tiny_task
from passes import TrainedClustering
from passes.sparse_training import vd_kl
from passes.vnq import R_REF, TAU_REF, VNQObjective, kl_lu, to_vnq_layer, vnq_kl


# ---- the KL approximation (Eq. 16-17) ------------------------------------------------------------------
@pytest.mark.parametrize("log_sigma2", [-8.0, -5.0, -2.0])
def test_kl_is_lowest_at_the_codebook_centres_and_symmetric(log_sigma2):
    a = 0.2
    theta = torch.linspace(-2 * a, 2 * a, 4001, dtype=torch.float64)
    kl = vnq_kl(theta, torch.full_like(theta, log_sigma2), torch.tensor([0.0, -a, a], dtype=torch.float64), TAU_REF)
    torch.testing.assert_close(kl, kl.flip(0), rtol=0, atol=1e-12)   # symmetric codebook -> F(θ) = F(-θ)
    for c in (-a, 0.0, a):   # each centre is the minimum of its cell [c - a/2, c + a/2], well below the cell's edges
        cell = (theta - c).abs() <= a / 2
        best = theta[cell][kl[cell].argmin()]
        assert abs(float(best) - c) < 1e-3
        assert float(kl[cell].min()) < 0.25 * min(float(kl[cell][0]), float(kl[cell][-1]))
    assert float(kl.min()) >= 0.0 and float(kl[(theta - a).abs() < 1e-9]) < 1e-3   # ~0 at a non-zero centre
    skewed = vnq_kl(theta, torch.full_like(theta, log_sigma2), torch.tensor([0.0, a], dtype=torch.float64), TAU_REF)
    assert float((skewed - skewed.flip(0)).abs().max()) > 0.1   # (an asymmetric codebook is not)


def test_kl_reduces_to_molchanov_for_one_centre_at_zero_and_is_shifted_molchanov_at_a_centre():
    theta, log_sigma2 = torch.linspace(-1, 1, 201), torch.linspace(-9, 0, 201)
    molchanov = vd_kl(log_sigma2 - torch.log(theta ** 2 + 1e-8))
    torch.testing.assert_close(vnq_kl(theta, log_sigma2, torch.zeros(1), TAU_REF), molchanov, rtol=0, atol=0)
    # near a non-zero centre c the window Ω(θ - c) ≈ 1: Molchanov's approximation shifted to c
    a, d = 0.2, torch.linspace(-0.003, 0.003, 21)   # (1 - Ω(d) <= 8e-4: the other terms' weight)
    near = vnq_kl(a + d, torch.full_like(d, -14.0), torch.tensor([-a, 0.0, a]), TAU_REF)
    shifted = kl_lu(d, torch.full_like(d, -14.0))
    torch.testing.assert_close(near, shifted, rtol=0, atol=1e-2)
    assert float(shifted.max()) > 1.0   # (the shifted approximation itself varies far more than that)


def test_layer_kl_uses_the_papers_rescaled_codebook():
    """F_KL(θ/s, σ/s, c_r) with s = a / r: the same formula with centres ±a and window τ·a/r."""
    layer = to_vnq_layer(nn.Linear(6, 4), log_sigma2=-6.0, scale=0.05)
    s = 0.05 / R_REF
    theta, log_sigma2 = layer.weight.detach(), layer.log_sigma2.detach()
    reference = vnq_kl(theta / s, log_sigma2 - 2 * torch.log(torch.tensor(s)), torch.tensor([-R_REF, 0.0, R_REF]),
                       TAU_REF)
    assert float(layer.penalty().detach()) == pytest.approx(float(reference.sum()), rel=1e-5)


# ---- local reparameterization ---------------------------------------------------------------------------
def test_local_reparameterization_mean_and_variance():
    torch.manual_seed(0)
    layer = to_vnq_layer(nn.Linear(5, 3), log_sigma2=-3.0).train()
    x = torch.randn(1, 5).expand(200_000, 5)
    with torch.no_grad():
        out = layer(x)
        mean = x[:1] @ layer.weight.t() + layer.bias
        var = (x[:1] ** 2) @ layer.log_sigma2.exp().t()
    torch.testing.assert_close(out.mean(0, keepdim=True), mean, rtol=0, atol=4 * float(var.max().sqrt()) / 447)
    torch.testing.assert_close(out.var(0, keepdim=True), var, rtol=0.02, atol=0)
    torch.testing.assert_close(layer.eval()(x[:2]), x[:2] @ layer.weight.t() + layer.bias)   # eval: the means θ


# ---- training and deployment ---------------------------------------------------------------------------------
def test_training_pulls_weights_to_the_centres_and_deploys_the_nearest_centre():
    graph, x, y = tiny_task()
    errors = {}
    for kl_weight in (0.0, 1.0):   # 0: the paper's clipping alone, no KL
        p = TrainedClustering(method="vnq", kl_weight=kl_weight, epochs=2, batch_size=16, train_data=(x, y))
        result = p.apply(graph)
        before, after = map(float, result.report.stats["quantization_error"].split(" -> "))
        errors[kl_weight] = after
    assert errors[1.0] < 0.5 * errors[0.0] and errors[1.0] < 0.5 * before   # the KL pulls θ onto (−a, 0, a)
    mods = dict(result.graph.module.named_modules())
    for name in ("0", "3"):
        assert isinstance(mods[name], (LutConv2d, LutLinear, SparseConv2d, SparseLinear))
        values = torch.unique(mods[name].decoded_weight())
        a = result.report.stats["scales"][name]
        assert len(values) <= 3 and all(min(abs(v - c) for c in (-a, 0.0, a)) < 1e-4 for v in values.tolist())
    # the nearest centre, and 0 for log α >= threshold
    layer = to_vnq_layer(nn.Linear(4, 2), log_sigma2=-8.0, scale=0.1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-0.2, -0.06, -0.04, 0.0], [0.04, 0.06, 0.14, 0.07]]))
        layer.log_sigma2[1, 3] = 0.0   # 0.07 is nearest to a, but log α = 0 - log 0.0049 = 5.3 >= 3: pruned
    idx, codebook = layer.quantize(threshold=3.0)
    torch.testing.assert_close(codebook, torch.tensor([0.0, -0.1, 0.1]))
    assert idx.tolist() == [[1, 1, 0, 0], [0, 2, 2, 0]]


def test_vnq_deploys_ternary_layers_and_compiled_module_matches_torch():
    graph, x, y = tiny_task()
    result = TrainedClustering(method="vnq", epochs=2, batch_size=16, train_data=(x, y)).apply(graph)
    stats = result.report.stats
    assert 0.0 < stats["sparsity"] < 0.5 and set(stats["scales"]) == {"0", "3"}
    mods = dict(result.graph.module.named_modules())
    assert isinstance(mods["0"], LutConv2d) and isinstance(mods["3"], LutLinear) and mods["3"].bits == 2
    assert compiler.summarize(result.graph).total_bytes < compiler.summarize(graph).total_bytes / 8
    compiled_matches_torch(result.graph, x, rtol=1e-5)


def test_warmup_and_clipping():
    layer = to_vnq_layer(nn.Linear(8, 8), log_sigma2=-8.0, scale=0.05)
    objective = VNQObjective([layer], n_train=100, warmup_steps=10)
    assert objective.beta() == 0.0 and float(objective(None).detach()) == 0.0
    objective.after_step(None, 5)
    assert objective.beta() == 0.5
    edge = 0.05 + torch.exp(torch.tensor(-1.5)) * torch.exp(torch.tensor(-4.0))   # a + e^{-3/2} σ
    assert float(layer.weight.detach().abs().max()) <= float(edge) + 1e-7
    assert [g["lr"] for g in objective.param_groups(1e-3)] == [pytest.approx(1e-5)]


# ---- options ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, option", [("cluster-train:method=vnq,bits=3", "bits"),
                                          ("cluster-train:method=vnq,log_sigma2=2", "log_sigma2"),
                                          ("cluster-train:method=vnq,warmup=-1", "warmup"),
                                          ("cluster-train:method=vnq,scale_lr=0", "scale_lr"),
                                          ("cluster-train:method=vnq,kl_weight=-1", "kl_weight"),
                                          ("cluster-train:method=vq", "method")])
def test_bad_options_name_the_option(spec, option):
    with pytest.raises(OptionError, match=f"'{option}'"):
        compiler.parse_pass_spec(spec)


def test_spec_round_trips():
    p = compiler.parse_pass_spec("cluster-train:method=vnq,warmup=1,learn_scale=false")
    assert isinstance(p, TrainedClustering) and p.learn_scale is False
    assert compiler.parse_pass_spec(p.spec()) == p
