"""Issue 23, the survey's weight-sharing and sparsity-training methods: soft weight-sharing (Ullrich
et al. 2017), L0 regularization (Louizos et al. 2018) and sparse variational dropout (Molchanov et
al. 2017), each tested on the property its paper relies on; a tiny conv + linear model on synthetic
learnable data keeps the file to seconds (the builds dominate)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import compiler
from compiler.errors import OptionError, PassError
from compiler.finetune import TrainConfig, train
from compiler.ops.lut_linear import LutConv2d
from compiler.ops.sparse import SparseLinear
from trained_task import compiled_matches_torch, tiny_task
from passes import TrainedClustering, TrainedSparsity
from passes.sparse_training import (K1, K2, K3, deterministic_gate, expected_l0, hard_concrete_sample,
                                    prob_gate_zero, to_training_layer, vd_kl)
from passes.trained_compression import deploy_codebook


# ---- soft weight-sharing ----------------------------------------------------------------------------------
def test_soft_weight_sharing_prior_learns_and_quantizes_to_argmax_responsibility():
    graph, x, y = tiny_task()
    pass_ = TrainedClustering(bits=3, tau=1e-3)
    prior = pass_.prior(graph, ["0", "3"])
    with torch.no_grad():
        before = float(prior.nll(prior.weights(graph.module)))
        means0 = prior.means.detach().clone()
    history = train(graph.module, TensorDataset(x, y),
                    TrainConfig(epochs=3, batch_size=16, lr=1e-3, progress=False, regularizer=prior))
    with torch.no_grad():
        after = float(prior.nll(prior.weights(graph.module)))
    assert after < before and history.losses[-1] < history.losses[0]   # the prior's NLL falls in training
    assert not torch.equal(prior.means.detach(), means0)   # the mixture's means are learned with the weights
    _, _, pi = prior.mixture()
    pi = pi.detach()
    assert float(pi[0]) == pytest.approx(0.99) and float(pi.sum()) == pytest.approx(1.0)   # π_0 fixed
    w = graph.module.get_submodule("0").weight.detach()
    idx, means = prior.quantize(w)
    assert torch.equal(idx.reshape(-1), prior.responsibilities(w).argmax(1))   # argmax responsibility
    layer = deploy_codebook(graph.module.get_submodule("0"), idx, means)
    assert isinstance(layer, LutConv2d) and torch.equal(layer.decoded_weight(), means[idx])
    assert float(means[0]) == 0.0   # the zero component's weights are exactly zero


def test_cluster_train_soft_deploys_lut_and_sparse_layers_that_compile():
    graph, x, y = tiny_task()
    result = TrainedClustering(epochs=2, batch_size=16, tau=1e-3, train_data=(x, y)).apply(graph)
    mods = dict(result.graph.module.named_modules())
    assert isinstance(mods["3"], SparseLinear) and mods["3"].codebook is not None   # zero component -> CSR + codebook
    assert result.report.stats["zero_component_share"] > 0.5
    assert compiler.summarize(result.graph).total_bytes < compiler.summarize(graph).total_bytes / 4
    compiled_matches_torch(result.graph, x)


# ---- L0 regularization ----------------------------------------------------------------------------------
def test_hard_concrete_mass_at_zero_and_expected_l0_match_their_closed_forms():
    log_alpha = torch.tensor([-2.0, 0.0, 1.5])
    gen = torch.Generator().manual_seed(0)
    z = hard_concrete_sample(log_alpha.expand(100_000, 3), generator=gen)
    assert float(z.min()) == 0.0 and float(z.max()) == 1.0   # the stretched, clamped concrete has mass at 0 and 1
    p0 = prob_gate_zero(log_alpha)
    closed = torch.sigmoid(2 / 3 * math.log(0.1 / 1.1) - log_alpha)   # Q(s̄ ≤ 0), Louizos et al. Eq. 12
    torch.testing.assert_close(p0, closed)
    torch.testing.assert_close((z == 0).float().mean(0), p0, rtol=0, atol=5e-3)   # 100k draws: std ≤ 1.6e-3
    assert float(expected_l0(log_alpha)) == pytest.approx(float((1 - p0).sum()), rel=1e-6)
    torch.testing.assert_close(deterministic_gate(torch.tensor([-5.0, 0.0, 5.0])),
                               torch.tensor([0.0, 0.5, 1.0]), rtol=0, atol=1e-2)


def test_l0_deploys_exactly_the_deterministic_gates_and_compiles():
    graph, x, y = tiny_task()
    result = TrainedSparsity(method="l0", epochs=8, batch_size=16, l0_lambda=3e-3, droprate=0.3, gate_lr=100.0, train_data=(x, y)).apply(graph)
    assert 0.05 < result.report.stats["sparsity"] < 1.0
    layer = to_training_layer(nn.Linear(6, 4), "l0")
    with torch.no_grad():
        layer.log_alpha.copy_(torch.linspace(-4, 4, 24).reshape(4, 6))
    z = deterministic_gate(layer.log_alpha.detach())
    from passes.sparse_training import deploy

    sparse = deploy(layer)
    assert sparse.nnz == int((z > 0).sum())   # deployed sparsity = the deterministic gates
    torch.testing.assert_close(sparse.decoded_weight(), layer.weight.detach() * z)
    compiled_matches_torch(result.graph, x)


# ---- sparse variational dropout ---------------------------------------------------------------------------
def test_variational_dropout_kl_approximation():
    assert (K1, K2, K3) == (0.63576, 1.87320, 1.48695)
    la = torch.linspace(-8, 8, 161)
    kl = vd_kl(la)
    expected = K1 - K1 * torch.sigmoid(K2 + K3 * la) + 0.5 * torch.log1p(torch.exp(-la))
    torch.testing.assert_close(kl, expected)
    assert bool((kl.diff() < 0).all())   # monotone: more noise (larger α) costs less
    assert float(vd_kl(torch.tensor(20.0))) < 1e-6   # α → ∞: the weight carries no information, KL → 0
    # α → 0: −KL ≈ ½ log α + const (Molchanov et al.: the KL grows as −½ log α)
    assert float(vd_kl(torch.tensor(-20.0)) - vd_kl(torch.tensor(-18.0))) == pytest.approx(1.0, abs=1e-3)
    assert float(vd_kl(torch.tensor(0.0))) == pytest.approx(K1 - K1 / (1 + math.exp(-K2)) + 0.5 * math.log(2))


def test_variational_dropout_local_reparameterization_moments_and_pruning():
    torch.manual_seed(0)
    layer = to_training_layer(nn.Linear(5, 3), "vd", log_sigma2=-3.0).train()
    x = torch.randn(1, 5).expand(200_000, 5)
    with torch.no_grad():
        out = layer(x)
        mean = x[:1] @ layer.weight.t() + layer.bias
        var = (x[:1] ** 2) @ layer.log_sigma2.exp().t()
    torch.testing.assert_close(out.mean(0, keepdim=True), mean, rtol=0, atol=4 * float(var.max().sqrt()) / 447)
    torch.testing.assert_close(out.var(0, keepdim=True), var, rtol=0.02, atol=0)
    with torch.no_grad():
        layer.log_sigma2.copy_(torch.log(layer.weight ** 2) + torch.linspace(-5, 5, 15).reshape(3, 5))
    keep = layer.log_alpha.detach() <= 3.0
    from passes.sparse_training import deploy

    assert deploy(layer).nnz == int(keep.sum()) < 15   # weights with log α > 3 pruned


def test_vd_pass_prunes_and_compiles():
    graph, x, y = tiny_task()
    result = TrainedSparsity(method="vd", epochs=8, batch_size=16, train_data=(x, y)).apply(graph)
    assert result.report.stats["sparsity"] > 0.2
    compiled_matches_torch(result.graph, x)


# ---- options, specs, CLI ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, option", [("cluster-train:method=hashed", "method"),
                                          ("cluster-train:pi_zero=1.0", "pi_zero"),
                                          ("cluster-train:bits=1", "bits"),
                                          ("sparsify-train:method=snip", "method"),
                                          ("sparsify-train:droprate=0", "droprate"),
                                          ("sparsify-train:gate_lr=0", "gate_lr")])
def test_bad_options_name_the_option(spec, option):
    with pytest.raises(OptionError, match=f"'{option}'"):
        compiler.parse_pass_spec(spec)


def test_specs_round_trip_and_are_registered():
    from compiler.registry import registered_passes

    assert {"cluster-train", "sparsify-train"} <= set(registered_passes())
    p = compiler.parse_pass_spec("sparsify-train:method=vd,epochs=2")
    assert isinstance(p, TrainedSparsity) and p.spec() == "sparsify-train:epochs=2,method=vd"
    graph, _, _ = tiny_task()
    with pytest.raises(PassError, match="trains on data"):
        p(graph)
