"""Hardware-aware per-layer search: choose a setting per layer — channel-pruning ratio, low-rank
rank, weight sparsity, weight-sharing bits or int8 vs float (``family``) — by *measured* compiled
latency on the target and measured accuracy, in the spirit of NetAdapt (Yang et al., ECCV 2018)
and AMC (He et al., ECCV 2018): starting from the unpruned model, repeatedly try cutting each
layer one step further, measure each candidate's latency (compiled for the target) and accuracy
(on a validation set), and keep the candidate that loses the least accuracy per millisecond saved,
until the latency budget is met. A per-layer sensitivity scan and the uniform-ratio model of the
same latency are measured alongside for comparison. The goal can also be a stored size (HAQ-style
bit allocation, Wang et al., CVPR 2019, under a model-size budget). The result is a recipe (pass
specs, one per line) that ``squeezer compress --recipe`` replays. Under ``torchrun`` each batch of
candidates (a round's trials, the sensitivity probes) is spread over the ranks (``search_ranks``).

Sits on the top floor (it drives passes and measures through ``compiler.latency``, which codegen
provides).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from compiler.distributed import world
from compiler.errors import OptionError
from compiler.graph import Graph
from compiler.latency import latency_timer
from compiler.pass_infra import Pass
from compiler.pipeline import Pipeline
from compiler.summary import summarize
from passes import ChannelPruning, LowRankSplit, Quantize, Sparsify, WeightClustering

from .search_ranks import evaluate_spread, median_of


@dataclass
class Candidate:
    ratios: dict[str, float]
    latency_ms: float
    accuracy: float


@dataclass
class SearchResult:
    recipe: list[str]
    chosen: Candidate
    baseline: Candidate
    uniform: Candidate | None
    explored: list[Candidate] = field(default_factory=list)
    sensitivity: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    axis: str = "channels pruned (fraction)"
    metric: str = "compiled latency (ms)"      # what Candidate.latency_ms holds (ms, or stored bytes)

    def save_recipe(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text("\n".join(self.recipe) + "\n")
        return path

    def plot(self, directory: str | Path) -> list[Path]:
        """Per-layer sensitivity curves and the latency-accuracy front (PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for layer, curve in self.sensitivity.items():
            ax.plot([r for r, _ in curve], [a * 100 for _, a in curve], marker="o", label=layer)
        ax.set_xlabel(self.axis)
        ax.set_ylabel("accuracy (%)")
        ax.set_title("per-layer sensitivity")
        ax.legend(fontsize=7)
        fig.tight_layout()
        sens = d / "sensitivity.png"
        fig.savefig(sens, dpi=120)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.scatter([c.latency_ms for c in self.explored], [c.accuracy * 100 for c in self.explored], s=10,
                   color="0.6", label="explored")
        front = _pareto(self.explored + [self.baseline, self.chosen])
        ax.plot([c.latency_ms for c in front], [c.accuracy * 100 for c in front], color="C0", label="front")
        ax.scatter([self.chosen.latency_ms], [self.chosen.accuracy * 100], color="C0", s=40, label="chosen")
        if self.uniform is not None:
            ax.scatter([self.uniform.latency_ms], [self.uniform.accuracy * 100], color="C3", marker="x", s=50,
                       label="uniform setting")
        ax.set_xlabel(self.metric)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{self.metric.split(' (')[0]} vs accuracy")
        ax.legend(fontsize=7)
        fig.tight_layout()
        front_png = d / "pareto.png"
        fig.savefig(front_png, dpi=120)
        plt.close(fig)
        return [sens, front_png]


def _pareto(cands: list[Candidate]) -> list[Candidate]:
    out, best = [], -1.0
    for c in sorted(cands, key=lambda c: (c.latency_ms, -c.accuracy)):
        if c.accuracy > best:
            out.append(c)
            best = c.accuracy
    return out


# ---- what can be searched: a family of per-layer settings ----------------------------------------------------
@dataclass(frozen=True)
class Family:
    """Per-layer settings one pass family offers: ``levels`` ordered from untouched (first) to most
    compressed; ``passes`` turns a {layer: level} choice into pass objects (their specs are the
    replayable recipe)."""

    name: str
    levels: tuple[float, ...]
    axis: str                                     # what the sensitivity plot's x axis shows
    layers: Callable[[Graph], list[str]]
    passes: Callable[[dict[str, float]], list[Pass]]

    def specs(self, levels: dict[str, float]) -> list[str]:
        return [p.spec() for p in self.passes(levels)]


def _weight_layers(graph: Graph, *, min_size: int = 8) -> list[str]:
    mods = dict(graph.module.named_modules())
    out = []
    for n in graph.module.graph.nodes:
        m = mods.get(n.target) if n.op == "call_module" else None
        if isinstance(m, nn.Linear) and min(m.in_features, m.out_features) >= min_size:
            out.append(n.target)
        elif isinstance(m, nn.Conv2d) and m.groups == 1 and min(m.in_channels * m.kernel_size[0] * m.kernel_size[1],
                                                                  m.out_channels) >= min_size:
            out.append(n.target)
    return list(dict.fromkeys(out))


def _pruning_layers(graph: Graph) -> list[str]:
    return [g.producers[0][0] for g in graph.channel_groups() if g.prunable and g.size > 1]


def _pruning_passes(ratios: dict[str, float]) -> list[Pass]:
    return [ChannelPruning(ratio=0.0, overrides=tuple(f"{layer}={r:g}" for layer, r in sorted(ratios.items())
                                                       if r > 0))]


def _lowrank_passes(levels: dict[str, float]) -> list[Pass]:
    chosen = {k: v for k, v in levels.items() if v < 1}
    if not chosen:
        return []
    return [LowRankSplit(layers=tuple(sorted(chosen)),
                         overrides=tuple(f"{k}=ratio:{v:g}" for k, v in sorted(chosen.items())))]


def _per_level(make: Callable[[float, tuple[str, ...]], Pass], untouched: float):
    """One pass per distinct level, naming the layers that take it."""
    def passes(levels: dict[str, float]) -> list[Pass]:
        by_value: dict[float, list[str]] = {}
        for k, v in levels.items():
            if v != untouched:
                by_value.setdefault(v, []).append(k)
        return [make(v, tuple(sorted(ls))) for v, ls in sorted(by_value.items())]
    return passes


def family(name: str, *, step: float = 0.125, max_ratio: float = 0.875) -> Family:
    """``pruning`` (channel ratios), ``low-rank`` (fraction of the full rank kept), ``sparsity``
    (unstructured weight sparsity, stored sparse where the kernel measures faster), ``bits``
    (weight-sharing bits, Deep Compression's clustering) or ``int8`` (mixed precision: each layer
    an int8 integer layer or float; calibrated on the graph's example inputs)."""
    if name == "pruning":
        n = int(math.floor(max_ratio / step + 1e-9))
        return Family("pruning", tuple(round(i * step, 6) for i in range(n + 1)), "channels pruned (fraction)",
                      _pruning_layers, _pruning_passes)
    if name == "low-rank":
        return Family("low-rank", (1.0, 0.5, 0.25, 0.125, 0.0625), "fraction of full rank kept",
                      _weight_layers, _lowrank_passes)
    if name == "sparsity":
        return Family("sparsity", (0.0, 0.5, 0.75, 0.9, 0.95), "weights pruned (fraction)", _weight_layers,
                      _per_level(lambda v, layers: Sparsify(sparsity=v, layers=layers), 0.0))
    if name == "bits":
        return Family("bits", (32.0, 8.0, 5.0, 4.0, 3.0, 2.0), "weight bits (clusters = 2**bits)", _weight_layers,
                      _per_level(lambda v, layers: WeightClustering(bits=int(v), layers=layers), 32.0))
    if name == "int8":
        return Family("int8", (32.0, 8.0), "bits (32: float, 8: int8 integer layer)", _int8_layers,
                      _per_level(lambda v, layers: Quantize(w_bits=int(v), layers=layers), 32.0))
    raise OptionError(f"search: family {name!r} is not one of {list(FAMILIES)}")


FAMILIES = ("pruning", "low-rank", "sparsity", "bits", "int8")


def _int8_layers(graph: Graph) -> list[str]:
    """Every Conv2d/Linear ``Quantize`` takes (depthwise and grouped included)."""
    mods = dict(graph.module.named_modules())
    return list(dict.fromkeys(n.target for n in graph.module.graph.nodes if n.op == "call_module"
                              and isinstance(mods.get(n.target), (nn.Conv2d, nn.Linear))))


GOALS = ("latency_budget_ms", "speedup", "size_budget_bytes", "compression")


@dataclass
class _Search:
    """The state one search works on: the untouched graph, the family, how a candidate is scored."""

    graph: Graph
    accuracy: Callable[[torch.nn.Module], float]
    fam: Family
    by_size: bool
    target: str
    rounds: int

    def build(self, levels: dict[str, float]) -> Graph:
        passes = self.fam.passes(levels)
        g = Pipeline(passes)(self.graph) if passes else self.graph
        g.module.eval()
        return g

    def measure(self, g: Graph) -> float:
        if self.by_size:
            return float(summarize(g).total_bytes)
        return median_of(latency_timer(g.module, g.example_inputs, self.target), self.rounds)

    def evaluate(self, levels: dict[str, float]) -> Candidate:
        return self.evaluate_many([levels])[0]

    def evaluate_many(self, batch: list[dict[str, float]], *, measure: bool = True) -> list[Candidate]:
        """A candidate for every setting of ``batch``, in order (``measure=False``: accuracy only, the
        goal's value NaN). In a world of one, one after another; under ``torchrun``, dealt over the
        ranks, timed on the timing ranks (search_ranks), the same list on every rank — even a batch
        of one, so that every rank's search takes the same path."""
        if world().distributed:
            metric = None if not measure else "size" if self.by_size else "latency"
            scored = evaluate_spread(batch, self.build, self.accuracy, metric=metric, target=self.target,
                                     rounds=self.rounds, inputs=self.graph.example_inputs)
            return [Candidate(dict(levels), value, acc) for levels, (value, acc) in zip(batch, scored)]
        out = []
        for levels in batch:
            g = self.build(levels)
            value = self.measure(g) if measure else math.nan
            out.append(Candidate(dict(levels), value, self.accuracy(g.module)))
        return out

    def sensitivity(self, layers: list[str], baseline: Candidate) -> dict[str, list[tuple[float, float]]]:
        """Accuracy with one layer at a time cut to a few levels: every probe evaluated in one batch."""
        levels = self.fam.levels
        probe = [levels[i] for i in sorted({len(levels) // 3, (2 * len(levels)) // 3, len(levels) - 1})]
        scores = iter(self.evaluate_many([{layer: v} for layer in layers for v in probe], measure=False))
        return {layer: [(levels[0], baseline.accuracy)] + [(v, next(scores).accuracy) for v in probe]
                for layer in layers}

    def greedy(self, layers: list[str], start: Candidate, budget: float, explored: list[Candidate]) -> Candidate:
        """NetAdapt's loop: each round moves the one layer whose next level loses the least accuracy
        per unit of the goal saved, until the budget is met or nothing is left to cut."""
        untouched = self.fam.levels[0]
        nxt = {v: self.fam.levels[i + 1] for i, v in enumerate(self.fam.levels[:-1])}
        current = start
        for _ in range(len(layers) * (len(self.fam.levels) - 1)):
            if current.latency_ms <= budget:
                break
            trials = self.evaluate_many([{**current.ratios, layer: nxt[current.ratios.get(layer, untouched)]}
                                         for layer in layers if current.ratios.get(layer, untouched) in nxt])
            explored += trials
            if not trials:
                break
            useful = [c for c in trials if c.latency_ms < current.latency_ms]

            def cost(c: Candidate, now: Candidate = current) -> float:   # accuracy lost per unit saved
                return max(now.accuracy - c.accuracy, 0.0) / (now.latency_ms - c.latency_ms)

            # timer noise can hide a small saving: then take the most accurate step and keep going
            current = min(useful, key=lambda c: (cost(c), c.latency_ms)) if useful else \
                max(trials, key=lambda c: (c.accuracy, -c.latency_ms))
        return current

    def uniform(self, layers: list[str], chosen: Candidate, max_ratio: float,
                explored: list[Candidate]) -> Candidate | None:
        """The uniform setting comparable with ``chosen``: for pruning, the uniform ratio whose
        latency matches (bisection); for discrete levels, the mildest one at least as small/fast."""
        found = None
        if self.fam.name == "pruning":
            lo, hi = 0.0, max_ratio
            for _ in range(6):
                mid = (lo + hi) / 2
                cand = self.evaluate({layer: mid for layer in layers})
                explored.append(cand)
                if cand.latency_ms > chosen.latency_ms:
                    lo = mid
                else:
                    hi, found = mid, cand
            return found if found is not None else self.evaluate({layer: hi for layer in layers})
        for v in self.fam.levels[1:]:
            found = self.evaluate({layer: v for layer in layers})
            explored.append(found)
            if found.latency_ms <= chosen.latency_ms:
                break
        return found


def search(graph: Graph, accuracy: Callable[[torch.nn.Module], float], *, family_name: str = "pruning",
           latency_budget_ms: float | None = None, speedup: float | None = None,
           size_budget_bytes: int | None = None, compression: float | None = None, target: str = "llvm",
           step: float = 0.125, max_ratio: float = 0.875, uniform: bool = True, rounds: int = 5) -> SearchResult:
    """Per-layer settings of one pass family meeting one goal — a compiled latency on ``target``
    (``latency_budget_ms`` or ``speedup`` over the untouched model, measured) or a stored size
    (``size_budget_bytes`` or ``compression``, counted as the layers store their weights) — losing
    as little ``accuracy(module)`` as it can. Greedy in NetAdapt's way: each round moves the one
    layer whose next level loses the least accuracy per unit of the goal saved."""
    goals = dict(zip(GOALS, (latency_budget_ms, speedup, size_budget_bytes, compression)))
    given = [k for k, v in goals.items() if v is not None]
    if len(given) != 1:
        raise OptionError(f"search: give exactly one of {list(goals)} (got {given or 'none'})")
    goal, value = given[0], goals[given[0]]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise OptionError(f"search: {goal}={value!r} must be a finite number > 0")
    if not 0 < step < 1 or not 0 < max_ratio < 1:
        raise OptionError(f"search: step and max_ratio must lie in (0, 1), got {step}, {max_ratio}")
    fam = family(family_name, step=step, max_ratio=max_ratio)
    run = _Search(graph, accuracy, fam, given[0] in ("size_budget_bytes", "compression"), target, rounds)
    layers = fam.layers(graph)
    if not layers:
        raise OptionError(f"search: the model has no layer the {fam.name} family can compress")
    baseline = run.evaluate({})
    if run.by_size:
        budget = size_budget_bytes if size_budget_bytes is not None else baseline.latency_ms / compression
    else:
        budget = latency_budget_ms if latency_budget_ms is not None else baseline.latency_ms / speedup
    sensitivity = run.sensitivity(layers, baseline)
    explored: list[Candidate] = []
    chosen = run.greedy(layers, baseline, budget, explored)
    uniform_cand = run.uniform(layers, chosen, max_ratio, explored) if uniform and chosen.ratios else None
    result = SearchResult(fam.specs(chosen.ratios), chosen, baseline, uniform_cand, explored, sensitivity)
    result.axis, result.metric = fam.axis, ("stored bytes" if run.by_size else "compiled latency (ms)")
    return result


def search_pruning(graph: Graph, accuracy: Callable[[torch.nn.Module], float], *, latency_budget_ms: float | None = None,
                   speedup: float | None = None, target: str = "llvm", step: float = 0.125, max_ratio: float = 0.875,
                   uniform: bool = True, rounds: int = 5) -> SearchResult:
    """Per-layer channel-pruning ratios meeting ``latency_budget_ms`` (or ``speedup`` over the
    unpruned compiled model) on ``target``, losing as little ``accuracy(module)`` as it can."""
    if (latency_budget_ms is None) == (speedup is None):
        raise OptionError("search_pruning: give exactly one of latency_budget_ms or speedup")
    return search(graph, accuracy, family_name="pruning", latency_budget_ms=latency_budget_ms, speedup=speedup,
                  target=target, step=step, max_ratio=max_ratio, uniform=uniform, rounds=rounds)
