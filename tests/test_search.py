"""Hardware-aware pruning search: meets the latency budget it is given, writes a replayable recipe
and its plots. Latency here comes from a deterministic stand-in provider (MACs), so the test checks
the search logic; benchmarks measure real compiled latency."""

import pytest
import torch

import compiler
import compiler.latency as latency
from compiler import zoo
from compiler.search import search_pruning


def _macs_provider(module, inputs, target):
    macs = compiler.summarize(compiler.trace(module, tuple(inputs))).total_macs
    return lambda: macs / 1e6


def test_search_meets_the_budget_and_writes_a_replayable_recipe(monkeypatch, tmp_path):
    monkeypatch.setattr(latency, "_provider", _macs_provider)
    e = zoo.get("lenet5")
    g = compiler.trace(e.build(), e.example_inputs(batch=1))
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = g.module(x).argmax(1)

    def agreement(module):
        with torch.no_grad():
            return float((module(x).argmax(1) == ref).float().mean())

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
