"""Hardware-aware pruning search: meets the latency budget it is given, writes a replayable recipe
and its plots. Latency here comes from a deterministic stand-in provider (MACs), so the test checks
the search logic; benchmarks measure real compiled latency."""

import pytest
import torch

import compiler
import compiler.latency as latency
from squeezer import zoo
from squeezer.search import search_pruning


def _macs_provider(module, inputs, target):
    macs = compiler.summarize(compiler.trace(module, tuple(inputs))).total_macs
    return lambda: macs / 1e6


def _lenet_and_agreement(monkeypatch, n_images):
    """LeNet-5 with MACs standing in for latency, and its accuracy proxy: agreement of the
    compressed model's top-1 with the original's on ``n_images`` random inputs."""
    monkeypatch.setattr(latency, "_provider", _macs_provider)
    e = zoo.get("lenet5")
    g = compiler.trace(e.build(), e.example_inputs(batch=1))
    x = torch.randn(n_images, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = g.module(x).argmax(1)

    def agreement(module):
        with torch.no_grad():
            return float((module(x).argmax(1) == ref).float().mean())

    return g, agreement


@pytest.mark.slow
def test_search_meets_the_budget_and_writes_a_replayable_recipe(monkeypatch, tmp_path):
    g, agreement = _lenet_and_agreement(monkeypatch, 64)
    result = search_pruning(g, agreement, speedup=1.5, step=0.25, rounds=1)
    assert result.chosen.latency_ms <= result.baseline.latency_ms / 1.5
    assert result.sensitivity and all(len(c) == 4 for c in result.sensitivity.values())
    recipe = result.save_recipe(tmp_path / "recipe.txt")
    replayed = compiler.Pipeline(compiler.load_recipe(str(recipe)))(g)
    assert compiler.summarize(replayed).total_macs / 1e6 == pytest.approx(result.chosen.latency_ms)
    assert result.uniform is not None and result.uniform.latency_ms <= result.chosen.latency_ms
    assert all(p.exists() and p.stat().st_size > 0 for p in result.plot(tmp_path / "plots"))
    with pytest.raises(compiler.OptionError):
        search_pruning(g, agreement, speedup=1.5, latency_budget_ms=1.0)


@pytest.mark.parametrize("family,goal", [("low-rank", {"speedup": 1.3}), ("bits", {"compression": 3.0}),
                                         ("sparsity", {"compression": 2.0}), ("int8", {"compression": 2.0})])
@pytest.mark.slow
def test_other_families_meet_their_goal_and_replay(family, goal, monkeypatch, tmp_path):
    from squeezer.search import search

    g, agreement = _lenet_and_agreement(monkeypatch, 32)
    result = search(g, agreement, family_name=family, rounds=1, **goal)
    factor = next(iter(goal.values()))
    assert result.chosen.latency_ms <= result.baseline.latency_ms / factor
    prefix = {"low-rank": "low-rank:", "bits": "cluster:", "sparsity": "sparsify:", "int8": "quantize:"}[family]
    assert result.recipe and all(s.startswith(prefix) for s in result.recipe)
    replayed = compiler.Pipeline(compiler.load_recipe(str(result.save_recipe(tmp_path / "r.txt"))))(g)
    s = compiler.summarize(replayed)
    measured = s.total_bytes if "compression" in goal else s.total_macs / 1e6
    assert measured == pytest.approx(result.chosen.latency_ms)
    assert result.uniform is not None
    assert all(p.exists() for p in result.plot(tmp_path / "plots"))
    with pytest.raises(compiler.OptionError, match="exactly one"):
        search(g, agreement, family_name=family, speedup=2.0, compression=2.0)
    with pytest.raises(compiler.OptionError, match="family"):
        search(g, agreement, family_name="nope", speedup=2.0)
