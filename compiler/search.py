"""Hardware-aware per-layer pruning search: choose a pruning ratio per layer by *measured* compiled
latency on the target and measured accuracy, in the spirit of NetAdapt (Yang et al., ECCV 2018)
and AMC (He et al., ECCV 2018): starting from the unpruned model, repeatedly try cutting each
layer one step further, measure each candidate's latency (compiled for the target) and accuracy
(on a validation set), and keep the candidate that loses the least accuracy per millisecond saved,
until the latency budget is met. A per-layer sensitivity scan and the uniform-ratio model of the
same latency are measured alongside for comparison. The result is a recipe (pass specs, one per
line) that ``squeezer compress --recipe`` replays.

Sits on the top floor (it drives passes and measures through ``compiler.latency``, which codegen
provides).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .errors import OptionError
from .graph import Graph


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
        ax.set_xlabel("channels pruned (fraction)")
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
                       label="uniform ratio")
        ax.set_xlabel("compiled latency (ms)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("latency-accuracy")
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


def _spec(ratios: dict[str, float]) -> str:
    items = ";".join(f"{layer}={r:g}" for layer, r in sorted(ratios.items()) if r > 0)
    return f"channel-pruning:ratio=0,overrides=[{items}]" if items else "channel-pruning:ratio=0"


def search_pruning(graph: Graph, accuracy: Callable[[torch.nn.Module], float], *, latency_budget_ms: float | None = None,
                   speedup: float | None = None, target: str = "llvm", step: float = 0.125, max_ratio: float = 0.875,
                   uniform: bool = True, rounds: int = 5) -> SearchResult:
    """Per-layer channel-pruning ratios meeting ``latency_budget_ms`` (or ``speedup`` over the
    unpruned compiled model) on ``target``, losing as little ``accuracy(module)`` as it can."""
    from passes import ChannelPruning

    from .coupling import CouplingAnalysis
    from .latency import latency_timer

    if (latency_budget_ms is None) == (speedup is None):
        raise OptionError("search_pruning: give exactly one of latency_budget_ms or speedup")
    if not 0 < step < 1 or not 0 < max_ratio < 1:
        raise OptionError(f"search_pruning: step and max_ratio must lie in (0, 1), got {step}, {max_ratio}")

    def latency(g: Graph) -> float:
        timer = latency_timer(g.module, g.example_inputs, target)
        return sorted(timer() for _ in range(rounds))[rounds // 2]

    def evaluate(ratios: dict[str, float]) -> Candidate:
        g = ChannelPruning(ratio=0.0, overrides=tuple(f"{k}={v:g}" for k, v in ratios.items() if v > 0))(graph) \
            if any(v > 0 for v in ratios.values()) else graph
        g.module.eval()
        return Candidate(dict(ratios), latency(g), accuracy(g.module))

    layers = [g.producers[0][0] for g in CouplingAnalysis(graph).groups if g.prunable and g.size > 1]
    if not layers:
        raise OptionError("search_pruning: the model has no prunable layer")
    baseline = evaluate({})
    budget = latency_budget_ms if latency_budget_ms is not None else baseline.latency_ms / speedup
    sensitivity = {}
    for layer in layers:
        sensitivity[layer] = [(0.0, baseline.accuracy)] + [
            (r, accuracy(ChannelPruning(ratio=0.0, overrides=(f"{layer}={r:g}",))(graph).module.eval()))
            for r in (0.25, 0.5, 0.75)]
    current, explored = baseline, []
    for _ in range(len(layers) * math.ceil(max_ratio / step)):
        if current.latency_ms <= budget:
            break
        trials = []
        for layer in layers:
            r = current.ratios.get(layer, 0.0)
            if r + step <= max_ratio + 1e-9:
                trials.append(evaluate({**current.ratios, layer: round(r + step, 4)}))
        explored += trials
        if not trials:
            break
        useful = [c for c in trials if c.latency_ms < current.latency_ms]

        def cost(c: Candidate) -> float:   # accuracy lost per ms saved (NetAdapt's choice)
            return max(current.accuracy - c.accuracy, 0.0) / (current.latency_ms - c.latency_ms)

        # timer noise can hide a small saving: then take the most accurate cut and keep going
        current = min(useful, key=lambda c: (cost(c), c.latency_ms)) if useful else \
            max(trials, key=lambda c: (c.accuracy, -c.latency_ms))
    uniform_cand = None
    if uniform and current.ratios:
        lo, hi = 0.0, max_ratio       # the uniform ratio whose latency matches the chosen model's
        for _ in range(6):
            mid = (lo + hi) / 2
            cand = evaluate({layer: mid for layer in layers})
            explored.append(cand)
            if cand.latency_ms > current.latency_ms:
                lo = mid
            else:
                hi, uniform_cand = mid, cand
        if uniform_cand is None:
            uniform_cand = evaluate({layer: hi for layer in layers})
    return SearchResult([_spec(current.ratios)], current, baseline, uniform_cand, explored, sensitivity)
