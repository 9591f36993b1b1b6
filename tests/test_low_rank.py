"""Low-rank splitting: each decomposition reproduces its layer at full rank, error falls with rank,
rank rules (fixed, ratio, energy, VBMF) do what they say, the pass works on every zoo model,
composes after channel pruning, compiles, and refuses what it cannot do by name."""

import numpy as np
import pytest
from tiers import sweep, zoo_sweep
import torch
from torch import nn

import codegen
import compiler
from squeezer import zoo
from passes import ChannelPruning, LowRankSplit
from passes.low_rank import (RankRule, cp_split, evbmf_rank, rank_from_singular_values, separable_split, svd_split,
                             tucker2_split)

CONVS = {
    "plain": lambda: nn.Conv2d(6, 8, 3, padding=1),
    "strided": lambda: nn.Conv2d(6, 8, 3, 2, 1),
    "rect-dilated-reflect": lambda: nn.Conv2d(6, 8, (3, 5), (1, 2), (2, 4), (2, 2), padding_mode="reflect"),
    "same-no-bias": lambda: nn.Conv2d(5, 7, 3, padding="same", bias=False),
    "circular": lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"),
}
TOL = dict(atol=2e-5, rtol=1e-5)  # float32 round-off of a chain of 2-4 layers; exact in real arithmetic


def _full_rank_chain(method, conv):
    n, c, kh, kw = conv.weight.shape
    if method == "tucker2":
        return tucker2_split(conv, n, c)
    if method == "separable":
        return separable_split(conv, min(c * kh, n * kw))
    return cp_split(conv, 1)  # placeholder, not used


@pytest.mark.parametrize("method", ["tucker2", "separable"])
@pytest.mark.parametrize("kind", list(CONVS))
def test_full_rank_conv_splits_reproduce_the_layer(method, kind):
    torch.manual_seed(0)
    conv = CONVS[kind]()
    x = torch.randn(2, conv.in_channels, 12, 13)
    chain = _full_rank_chain(method, conv)
    with torch.no_grad():
        torch.testing.assert_close(chain(x), conv(x), **TOL)


def test_full_rank_svd_reproduces_linear_and_pointwise_conv():
    torch.manual_seed(0)
    lin, x = nn.Linear(10, 7), torch.randn(3, 4, 10)
    conv, y = nn.Conv2d(6, 8, 1, 2, 1), torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(svd_split(lin, 7)(x), lin(x), **TOL)
        torch.testing.assert_close(svd_split(conv, 6)(y), conv(y), **TOL)
    a, b = svd_split(lin, 3)
    assert a.bias is None and b.bias is not None and a.out_features == 3  # bias on the second layer


@pytest.mark.parametrize("kind", ["plain", "strided", "rect-dilated-reflect", "circular"])
def test_cp_at_the_tensors_cp_rank_reproduces_the_layer(kind):
    """The property CP relies on: a kernel of CP rank R is recovered exactly by a rank-R split."""
    torch.manual_seed(0)
    conv = CONVS[kind]()
    n, c, kh, kw = conv.weight.shape
    r = 3
    factors = [torch.randn(d, r, dtype=torch.float64) for d in (n, c, kh, kw)]
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("ar,br,cr,dr->abcd", *factors).float())
    x = torch.randn(2, c, 12, 13)
    chain = cp_split(conv, r)
    assert [type(m).__name__ for m in chain] == ["Conv2d"] * 4 and chain[1].groups == chain[2].groups == r
    with torch.no_grad():
        torch.testing.assert_close(chain(x), conv(x), atol=1e-4, rtol=1e-4)


def _rel_err(chain, conv, x):
    with torch.no_grad():
        ref = conv(x)
        return float((chain(x) - ref).norm() / ref.norm())


@pytest.mark.parametrize("method", ["svd", "tucker2", "separable", "cp"])
def test_error_decreases_as_rank_grows(method):
    torch.manual_seed(0)
    if method == "svd":
        layer, x = nn.Linear(24, 16), torch.randn(8, 24)
        ranks, make = [1, 2, 4, 8, 12, 16], lambda r: svd_split(layer, r)
    else:
        layer, x = nn.Conv2d(8, 12, 3, padding=1), torch.randn(2, 8, 10, 10)
        if method == "tucker2":
            ranks, make = [1, 2, 4, 6, 8], lambda r: tucker2_split(layer, 12 * r // 8, r)
        elif method == "separable":
            ranks, make = [1, 2, 4, 8, 16, 24], lambda r: separable_split(layer, r)
        else:
            ranks, make = [1, 4, 16, 48], lambda r: cp_split(layer, r)
    errors = [_rel_err(make(r), layer, x) for r in ranks]
    slack = 1e-6 if method != "cp" else 1e-3   # ALS is a local method: allow round-off-sized wiggles
    assert all(b <= a + slack for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < (1e-5 if method != "cp" else 0.2) and errors[0] > 0.1


def test_energy_threshold_is_honoured():
    s = np.array([5.0, 3.0, 2.0, 1.0, 0.5])
    energy = np.cumsum(s ** 2) / np.sum(s ** 2)
    for threshold in (0.5, 0.7, 0.9, 0.95, 0.99, 1.0):
        r = rank_from_singular_values(s, RankRule("energy", threshold))
        assert energy[r - 1] >= threshold - 1e-12 and (r == 1 or energy[r - 2] < threshold)
    torch.manual_seed(0)
    layer = nn.Linear(32, 32)
    g = compiler.trace(nn.Sequential(layer), torch.randn(2, 32))
    out = LowRankSplit(energy=0.8, only_if_fewer_macs=False)(g)
    first = out.module.get_submodule("0.0")
    s = torch.linalg.svdvals(layer.weight.detach().double())
    kept = (s[: first.out_features] ** 2).sum() / (s ** 2).sum()
    assert kept >= 0.8 and (s[: first.out_features - 1] ** 2).sum() / (s ** 2).sum() < 0.8


def test_vbmf_recovers_the_rank_of_a_noisy_low_rank_matrix():
    rng = np.random.default_rng(0)
    for rank, shape in ((3, (60, 80)), (5, (90, 40))):
        y = rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1])) * 2
        y += 0.5 * rng.standard_normal(shape)
        assert evbmf_rank(y) == rank and evbmf_rank(y.T) == rank
    assert evbmf_rank(rng.standard_normal((40, 50))) <= 1  # pure noise: nothing above the threshold


def test_tucker2_with_vbmf_picks_ranks_per_mode():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    u_out, u_in = torch.randn(24, 4), torch.randn(16, 6)
    with torch.no_grad():
        core = torch.randn(4, 6, 3, 3)
        conv.weight.copy_(torch.einsum("oa,ib,abhw->oihw", u_out, u_in, core) + 0.01 * torch.randn(24, 16, 3, 3))
    g = compiler.trace(nn.Sequential(conv), torch.randn(1, 16, 8, 8))
    out = LowRankSplit(vbmf=True)(g)
    first, core_conv, last = (out.module.get_submodule(f"0.{i}") for i in range(3))
    assert (first.out_channels, core_conv.out_channels) == (6, 4)
    assert "ranks (out 4/24, in 6/16)" in out.reports[-1].changed[0]


@pytest.mark.parametrize("name", zoo_sweep(zoo.ZOO))
def test_every_zoo_model_full_rank_is_exact_and_energy_split_runs(name):
    e = zoo.get(name)
    x = e.example_inputs(batch=2)
    g = compiler.trace(e.build(), x)
    full = LowRankSplit(rank_ratio=1.0, only_if_fewer_macs=False)(g)
    torch.testing.assert_close(full.run_example(), g.run_example(), atol=1e-5, rtol=1e-4)
    assert full.reports[-1].changed
    split = LowRankSplit(energy=0.9)(g)
    assert split.run_example().shape == g.run_example().shape
    assert compiler.summarize(split).total_macs <= compiler.summarize(g).total_macs


@pytest.mark.slow
def test_low_rank_composes_after_channel_pruning_and_compiles():
    e = zoo.get("residual")
    x = e.example_inputs(batch=2)
    g = compiler.trace(e.build(), x)
    out = compiler.Pipeline([ChannelPruning(ratio=0.25), LowRankSplit(rank_ratio=0.5)])(g)
    assert out.history[0].startswith("channel-pruning") and out.history[1].startswith("low-rank")
    assert compiler.summarize(out).total_macs < compiler.summarize(g).total_macs
    np.testing.assert_allclose(codegen.build(out)(*x), out.run_example().numpy(), atol=1e-4)


@pytest.mark.parametrize("method", sweep(["tucker2", "cp", "separable"], quick=["separable"]))
def test_each_split_compiles_and_matches_pytorch(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    x = (torch.randn(2, 16, 16, 16),)
    out = LowRankSplit(method=method, rank=8)(compiler.trace(model, x))
    assert any(method in c for c in out.reports[-1].changed)
    np.testing.assert_allclose(codegen.build(out)(*x), out.run_example().numpy(), atol=1e-4)


def test_refusals_overrides_and_reports():
    e = zoo.get("depthwise-grouped")
    g = compiler.trace(e.build(), e.example_inputs())
    report = LowRankSplit(rank_ratio=0.5)(g).reports[-1]
    assert any("groups=" in why for _, why in report.skipped)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    g = compiler.trace(model, torch.randn(1, 64))
    out = LowRankSplit(rank=4, overrides=("2=skip", "4=rank:64"))(g)
    skipped = dict(out.reports[-1].skipped)
    assert skipped["2"] == "skipped by an override" and "would not remove MACs" in skipped["4"]
    assert out.module.get_submodule("0.0").out_features == 4
    assert isinstance(out.module.get_submodule("2"), nn.Linear)


def test_bad_options_give_clear_errors():
    for bad in (dict(rank=0), dict(rank=2.5), dict(rank_ratio=0.0), dict(rank_ratio=1.5), dict(energy=1.2),
                dict(rank=4, energy=0.9), dict(vbmf=True, rank_ratio=0.5), dict(method="qr"),
                dict(method="cp", vbmf=True), dict(overrides=("fc1",)), dict(overrides=("fc1=rank:0",)),
                dict(overrides=("fc1=energy",)), dict(layers="fc1")):
        with pytest.raises(compiler.OptionError):
            LowRankSplit(**bad)
    e = zoo.get("lenet5")
    with pytest.raises(compiler.OptionError, match="'layers/exclude/overrides'='nope'"):
        LowRankSplit(layers=("nope",))(compiler.trace(e.build(), e.example_inputs()))
    assert compiler.parse_pass_spec("low-rank:method=cp,rank=4") == LowRankSplit(method="cp", rank=4)


def test_latency_aware_keeps_only_splits_measured_faster(monkeypatch):
    import compiler.latency as latency

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    g = compiler.trace(model, torch.randn(1, 64))
    # a fake target where a chain costs its layer count and a dense layer 1.5: splits lose
    monkeypatch.setattr(latency, "_provider",
                        lambda module, x, target: (lambda: float(len(module)) if isinstance(module, nn.Sequential) else 1.5))
    out = LowRankSplit(rank=4, latency_aware=True)(g)
    assert not out.reports[-1].changed and all("not faster" in why for _, why in out.reports[-1].skipped)
    monkeypatch.setattr(latency, "_provider",
                        lambda module, x, target: (lambda: 1.0 if isinstance(module, nn.Sequential) else 1.5))
    out = LowRankSplit(rank=4, latency_aware=True)(g)
    assert len(out.reports[-1].changed) == 2 and "1.5000 -> 1.0000 ms" in out.reports[-1].changed[0]
    monkeypatch.setattr(latency, "_provider", None)
    with pytest.raises(compiler.OptionError, match="latency provider"):
        LowRankSplit(rank=4, latency_aware=True)(g)


@pytest.mark.slow
def test_latency_aware_with_the_real_compiler():
    """One real measurement through codegen's provider: the decision and both timings are reported."""
    torch.manual_seed(0)
    g = compiler.trace(nn.Sequential(nn.Linear(256, 256)), torch.randn(1, 256))
    report = LowRankSplit(rank=16, latency_aware=True)(g).reports[-1]
    text = " ".join(report.changed) + " ".join(why for _, why in report.skipped)
    assert "ms" in text and "llvm" in text


def test_svd_on_a_kxk_conv_keeps_the_kernel_in_the_first_layer_and_is_exact_at_full_rank():
    torch.manual_seed(0)
    conv = CONVS["strided"]()
    chain = svd_split(conv, min(conv.out_channels, conv.in_channels * 9))
    assert chain[0].kernel_size == (3, 3) and chain[1].kernel_size == (1, 1)
    x = torch.randn(2, conv.in_channels, 12, 13)
    with torch.no_grad():
        torch.testing.assert_close(chain(x), conv(x), **TOL)
    g = compiler.trace(nn.Sequential(conv), (x,))
    assert "svd" in LowRankSplit(method="svd", rank=4)(g).reports[-1].changed[0]
