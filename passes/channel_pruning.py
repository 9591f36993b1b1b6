"""Structured channel pruning over coupling groups.

Removes whole output channels (filters) of Conv2d/Linear layers together with every parameter
they feed — the next layers' input channels, BatchNorm/LayerNorm entries, depthwise filters, the
``H*W`` columns of a Linear behind a flatten — so the result is a smaller dense model. Channels
are chosen per coupling group (``compiler.coupling``): residual adds, concatenations, SE gates and
modules used twice are pruned consistently; groups the analysis cannot prove are left whole and
listed in the report with the reason.

Criteria, each scored per group (summed over the layers that produce the group's channels):

* ``l1`` / ``l2`` — filter norm (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017).
* ``fpgm`` — distance to the other filters; filters near the geometric median are redundant
  (He et al., "Filter Pruning via Geometric Median", CVPR 2019).
* ``slimming`` — |γ| of the BatchNorm scaling each channel (Liu et al., "Learning Efficient
  Convolutional Networks through Network Slimming", ICCV 2017); train with
  :func:`slimming_penalty` to push unimportant γ to zero. Groups without BatchNorm are skipped.
* ``taylor`` — first-order Taylor expansion of the loss, |mean(activation × gradient)| per
  channel over a few batches (Molchanov et al., "Pruning Convolutional Neural Networks for
  Resource Efficient Inference", ICLR 2017). Without labels, the model's own predictions are used.
* ``thinet`` — greedy selection by reconstruction of the *next* layers' outputs on sampled
  positions, then least-squares rescaling of the kept channels (Luo et al., "ThiNet: A Filter
  Level Pruning Method for Deep Neural Network Compression", ICCV 2017).
* ``random`` — a seeded random baseline.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from compiler import Pass, PassError, PassReport, register_pass
from compiler.coupling import CouplingAnalysis, Group
from compiler.graph import Graph
from compiler.summary import summarize

from .pruning_criteria import (bn_gammas, slimming_penalty, taylor_scores, thinet_contributions, thinet_order,
                               thinet_rescale)

__all__ = ["CRITERIA", "ChannelPruning", "iterative_prune", "slimming_penalty"]

CRITERIA = ("l1", "l2", "fpgm", "slimming", "taylor", "thinet", "random")


@register_pass
@dataclass(frozen=True)
class ChannelPruning(Pass):
    """Prune a fraction of the channels of every prunable coupling group (filter-norm criteria)."""

    name = "channel-pruning"
    verify_tolerance = None  # lossy
    reported = ("params", "macs")

    ratio: float = 0.5
    criterion: str = "l1"
    round_to: int = 1
    min_channels: int = 1
    exclude: tuple[str, ...] = ()
    seed: int = 0
    scope: str = "local"            # "local": the ratio per group; "global": rank all channels together
    max_layer_ratio: float = 0.9    # global scope: never prune more than this fraction of a group
    overrides: tuple[str, ...] = () # "pattern=ratio" per layer (first match wins; local scope)
    target_macs: float | None = None  # remove this fraction of MACs instead (the ratio is searched)
    # data for data-driven criteria (taylor, thinet): (inputs, labels or None) batches; not in the spec
    calibration: tuple = field(default=(), repr=False, compare=False, metadata={"spec": False})

    def validate(self) -> None:
        self.check_range("ratio", 0.0, 1.0, hi_open=True)
        self.check_choice("criterion", CRITERIA)
        self.check_range("round_to", 1, None, integer=True)
        self.check_range("min_channels", 1, None, integer=True)
        if not isinstance(self.exclude, tuple) or not all(isinstance(p, str) for p in self.exclude):
            self._fail("exclude", self.exclude, "a tuple of layer-name patterns (fnmatch)")
        self.check_choice("scope", ("local", "global"))
        self.check_range("max_layer_ratio", 0.0, 1.0, hi_open=True)
        if not isinstance(self.overrides, tuple):
            self._fail("overrides", self.overrides, "a tuple of 'pattern=ratio' strings")
        self.override_ratios  # parsed (and checked) once
        if self.target_macs is not None:
            self.check_range("target_macs", 0.0, 1.0, lo_open=True, hi_open=True)

    @cached_property
    def override_ratios(self) -> tuple[tuple[str, float], ...]:
        """``overrides`` parsed once: (layer-name pattern, ratio) pairs, the first match wins."""
        out = []
        for item in self.overrides:
            pattern, eq, value = str(item).rpartition("=")
            try:
                ratio = float(value)
                ok = bool(eq and pattern) and 0.0 <= ratio < 1.0
            except ValueError:
                ok = False
            if not ok:
                self._fail("overrides", item, "'pattern=ratio' with ratio in [0, 1)")
            out.append((pattern, ratio))
        return tuple(out)

    # ---- scoring -------------------------------------------------------------------------------
    def scores(self, graph: Graph, group: Group, analysis: CouplingAnalysis,
               signals: dict | None = None) -> torch.Tensor | None:
        """Importance of each channel of ``group`` (higher is kept); None if the criterion has
        nothing to go on for this group. ``signals``: the data-driven criteria's measurements
        (taylor: per-layer scores; thinet: per-group sampled contributions)."""
        if self.criterion == "random":
            gen = torch.Generator().manual_seed(self.seed * 7919 + group.id)
            return torch.rand(group.size, generator=gen)
        if self.criterion == "slimming":
            return bn_gammas(graph, group, analysis)
        if self.criterion == "thinet":
            xhat = signals.get(("thinet", group.id)) if signals else None
            return None if xhat is None else thinet_order(xhat)
        total = torch.zeros(group.size, dtype=torch.float64)
        for name, _ in group.producers:
            if self.criterion == "taylor":   # a layer that got no gradient contributes nothing
                total += signals.get(name, torch.zeros(group.size, dtype=torch.float64))
                continue
            w = graph.module.get_submodule(name).weight.detach().double()
            rows = w.reshape(w.shape[0], -1)
            if self.criterion == "l1":
                total += rows.abs().sum(1)
            elif self.criterion == "l2":
                total += rows.pow(2).sum(1).sqrt()
            else:  # fpgm: sum of distances to the other filters
                total += torch.cdist(rows, rows).sum(1)
        return total

    def channels_to_keep(self, size: int, ratio: float | None = None) -> int:
        ratio = self.ratio if ratio is None else ratio
        return self._rounded(size, max(self.min_channels, size - math.floor(size * ratio)))

    def _rounded(self, size: int, keep: int) -> int:
        """``keep`` rounded up to a multiple of ``round_to``, never above ``size``."""
        return min(size, math.ceil(keep / self.round_to) * self.round_to)

    def _ratio_for(self, layers: list[str], base: float) -> float:
        """The first matching ``pattern=ratio`` override (absolute, also under target_macs, where
        only the other groups' ratio is searched), else the base ratio."""
        for pattern, ratio in self.override_ratios:
            if any(fnmatch.fnmatchcase(m, pattern) for m in layers):
                return ratio
        return base

    # ---- planning ---------------------------------------------------------------------------------
    def _candidates(self, graph: Graph, analysis: CouplingAnalysis, report: PassReport):
        """(group, layers, scores) for every group this pass may prune (the rest go to the
        report), and ThiNet's sampled contributions when that is the criterion."""
        signals = None
        if self.criterion == "taylor":
            signals = taylor_scores(graph, self.calibration)
        elif self.criterion == "thinet":
            signals = thinet_contributions(graph, analysis, self.calibration, self.seed)
        out = []
        for group in analysis.groups:
            layers = [m for m, _ in group.producers]
            if not group.prunable:
                if layers:
                    report.skip(", ".join(layers), "; ".join(sorted(set(group.frozen))))
                continue
            excluded = [m for m in layers if any(fnmatch.fnmatchcase(m, p) for p in self.exclude)]
            if excluded:
                report.skip(", ".join(layers), f"excluded by the user ({', '.join(excluded)})")
                continue
            if len(group.classes) == 1 and group.size > 1:
                report.skip(", ".join(layers), "every channel is tied to every other (grouped convs or GroupNorm "
                                               "through a channel shuffle): nothing can be removed")
                continue
            scores = self.scores(graph, group, analysis, signals)
            if scores is None:
                why = "no BatchNorm scaling factor" if self.criterion == "slimming" else "no Conv2d/Linear consumer to reconstruct"
                report.skip(", ".join(layers), f"criterion '{self.criterion}' has no signal for this group ({why})")
                continue
            out.append((group, layers, scores))
        return out, signals

    def _plan(self, candidates, analysis: CouplingAnalysis, ratio: float) -> dict[int, torch.Tensor]:
        """Channels kept per group root for a given base ratio (local or global ranking)."""
        n_keep: dict[int, int] = {}
        if self.scope == "global":
            # rank every channel of every group together on scores normalized by the group's mean,
            # then prune the weakest ``ratio`` of all channels, at most ``max_layer_ratio`` per group
            pool = []
            for i, (group, layers, scores) in enumerate(candidates):
                norm = scores / scores.mean().clamp_min(1e-12)
                pool += [(float(v), i) for v in norm]
            budget = math.floor(len(pool) * ratio)
            pruned = [0] * len(candidates)
            for _, i in sorted(pool):
                if budget <= 0:
                    break
                group = candidates[i][0]
                cap = min(math.floor(group.size * self.max_layer_ratio), group.size - self.min_channels)
                if pruned[i] < cap:
                    pruned[i] += 1
                    budget -= 1
            for i, (group, _, _) in enumerate(candidates):
                n_keep[i] = self._rounded(group.size, group.size - pruned[i])
        else:
            for i, (group, layers, _) in enumerate(candidates):
                n_keep[i] = self.channels_to_keep(group.size, self._ratio_for(layers, ratio))
        plan = {}
        for i, (group, _, scores) in enumerate(candidates):
            if n_keep[i] < group.size:
                keep = _select(group, scores, n_keep[i])
                root = group.root
                class_of = {c: cls for cls in group.classes for c in cls}
                for pieces, _ in analysis.pieces.values():  # a split piece must keep a channel
                    for piece in pieces:
                        for seg in piece:
                            if analysis.find(seg.space) == root and not any(
                                    seg.start <= c < seg.start + seg.length for c in keep):
                                best = seg.start + int(scores[seg.start: seg.start + seg.length].argmax())
                                keep.update(class_of.get(best, [best]))
                if len(keep) < group.size:
                    plan[root] = torch.tensor(sorted(keep), dtype=torch.long)
        return plan

    def _macs_after(self, graph: Graph, analysis: CouplingAnalysis, plan) -> int:
        trial = graph.copy()
        _rewrite(trial, analysis, plan)
        trial.recompile()
        return summarize(trial).total_macs

    def _check_overrides_reach_prunable_layers(self, analysis: CouplingAnalysis) -> None:
        """An override that asks to prune a layer whose channels are the model's output would
        change the output size: refuse it by name instead of silently ignoring it."""
        for item, (pattern, ratio) in zip(self.overrides, self.override_ratios):
            if ratio == 0.0:
                continue
            for group in analysis.groups:
                hits = [m for m, _ in group.producers if fnmatch.fnmatchcase(m, pattern)]
                if hits and any("model output" in why for why in group.frozen):
                    self._fail("overrides", item, f"layers whose output channels are not the model's output; "
                                                  f"{', '.join(hits)} produces the model output, so pruning it "
                                                  "would change the output size")

    # ---- the pass --------------------------------------------------------------------------------
    def requires(self, graph: Graph) -> None:
        self.check_patterns(graph, "exclude/overrides", (*self.exclude, *(p for p, _ in self.override_ratios)))

    def run(self, graph: Graph, report: PassReport) -> Graph:
        analysis = CouplingAnalysis(graph)
        self._check_overrides_reach_prunable_layers(analysis)
        candidates, contributions = self._candidates(graph, analysis, report)
        ratio = self.ratio
        if self.target_macs is not None:  # bisect the base ratio until the MAC cut is reached
            want = (report.before or summarize(graph)).total_macs * (1.0 - self.target_macs)
            lo, hi = 0.0, 0.999
            if self._macs_after(graph, analysis, self._plan(candidates, analysis, hi)) > want:
                raise PassError(f"{self.name}: target_macs={self.target_macs} is out of reach: pruning every "
                                "prunable group as far as allowed does not remove that many MACs")
            for _ in range(20):
                mid = (lo + hi) / 2
                if self._macs_after(graph, analysis, self._plan(candidates, analysis, mid)) <= want:
                    hi = mid
                else:
                    lo = mid
            ratio = hi
            report.stats["ratio_for_target"] = round(ratio, 4)
        plan = self._plan(candidates, analysis, ratio)
        if self.criterion == "thinet":  # least-squares rescaling of the kept channels (ThiNet §3.3)
            for group, _, _ in candidates:
                keep = plan.get(group.root)
                if keep is not None:
                    thinet_rescale(graph, analysis, group, keep, contributions[("thinet", group.id)])
        for group, layers, _ in candidates:
            keep = plan.get(group.root)
            if keep is not None:
                report.change(f"{', '.join(layers)}: {group.size} -> {len(keep)} channels")
        _rewrite(graph, analysis, plan)
        return graph

    def ensures(self, before: Graph, after: Graph) -> None:
        if _output_shapes(after) != _output_shapes(before):  # a safety net: the analysis freezes outputs
            raise PassError(f"{self.name}: pruning would change the model's output shapes "
                            f"{_output_shapes(before)} -> {_output_shapes(after)}; please report this model")


def _output_shapes(graph: Graph) -> list:
    out = next(n for n in graph.module.graph.nodes if n.op == "output")
    return [tuple(n.meta.get("shape") or ()) for n in out.all_input_nodes]


def _select(group: Group, scores: torch.Tensor, n_keep: int) -> set[int]:
    """The best-scoring channels, at least ``n_keep`` of them, taken in whole classes of tied
    channels (a class scores the sum of its channels)."""
    classes = group.classes or [[c] for c in range(group.size)]
    totals = torch.stack([scores[cls].sum() for cls in classes])
    keep: set[int] = set()
    for ci in torch.argsort(totals, descending=True, stable=True).tolist():
        if len(keep) >= n_keep:
            break
        keep.update(classes[ci])
    return keep


def _layout_indices(analysis: CouplingAnalysis, layout, keep_by_root: dict[int, torch.Tensor]) -> torch.Tensor:
    """Positions (in the consuming tensor's channel/feature axis) that survive pruning."""
    idx, pos = [], 0
    for seg in layout:
        keep = keep_by_root.get(analysis.find(seg.space))
        kept = range(seg.start, seg.start + seg.length) if keep is None else \
            [int(c) for c in keep if seg.start <= c < seg.start + seg.length]
        for c in kept:
            base = pos + (c - seg.start) * seg.repeat
            idx.extend(range(base, base + seg.repeat))
        pos += seg.length * seg.repeat
    return torch.tensor(idx, dtype=torch.long)


def _rewrite(graph: Graph, analysis: CouplingAnalysis, keep_by_root: dict[int, torch.Tensor]) -> None:
    if not keep_by_root:
        return
    out_keep: dict[str, torch.Tensor] = {}
    for sid, name in analysis.producer.items():
        keep = keep_by_root.get(analysis.find(sid))
        if keep is not None:
            out_keep[name] = keep
    in_keep: dict[str, torch.Tensor] = {}
    param_keep: dict[str, torch.Tensor] = {}
    for c in analysis.consumers:
        target = in_keep if c.role in ("in", "grouped") else param_keep
        if c.module not in target:
            target[c.module] = _layout_indices(analysis, c.layout, keep_by_root)
    for name in sorted(set(out_keep) | set(in_keep) | set(param_keep)):
        old = graph.module.get_submodule(name)
        new = _pruned(old, out_keep.get(name), in_keep.get(name), param_keep.get(name))
        if new is not old:
            graph.module.set_submodule(name, new)
    # the analysis may belong to another copy of this graph: find its nodes here by name
    nodes = {n.name: n for n in graph.module.graph.nodes}
    for node, (pieces, cdim) in analysis.pieces.items():  # split/chunk sizes follow the kept channels
        sizes = [len(_layout_indices(analysis, piece, keep_by_root)) for piece in pieces]
        node = nodes[node.name]
        node.op, node.target = "call_function", torch.split
        node.args, node.kwargs = (node.args[0], sizes, cdim), {}
    for node, (dim, layout, divisor) in analysis.view_sizes.items():  # literal view/reshape sizes
        CouplingAnalysis.set_view_dim(nodes[node.name], dim,
                                      len(_layout_indices(analysis, layout, keep_by_root)) // divisor)


def _take(t: torch.Tensor | None, dim: int, idx: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or idx is None:
        return t
    return t.detach().index_select(dim, idx.to(t.device)).clone()


def _full(idx: torch.Tensor | None, n: int) -> bool:
    return idx is None or (len(idx) == n and bool((idx == torch.arange(n)).all()))


def _pruned(m: nn.Module, out_idx, in_idx, param_idx) -> nn.Module:
    """A copy of ``m`` with the given output/input/parameter indices kept (or ``m`` if unchanged)."""
    if isinstance(m, nn.Conv2d) and m.groups > 1 and param_idx is None:  # grouped: same local inputs per group
        n_out, n_in, groups = m.out_channels, m.in_channels, m.groups
        if _full(out_idx, n_out) and _full(in_idx, n_in):
            return m
        out_idx = torch.arange(n_out) if out_idx is None else out_idx
        in_idx = torch.arange(n_in) if in_idx is None else in_idx
        local = in_idx[in_idx < n_in // groups]   # the coupling ties make every group keep these
        if len(in_idx) != groups * len(local) or len(out_idx) % groups:
            raise PassError(f"channel pruning: unbalanced groups planned for grouped conv ({len(in_idx)} inputs, "
                            f"{len(out_idx)} outputs, groups={groups})")
        w = _take(_take(m.weight, 0, out_idx), 1, local)
        new = nn.Conv2d(len(in_idx), len(out_idx), m.kernel_size, m.stride, m.padding, m.dilation, groups,
                        m.bias is not None, m.padding_mode)
        new.weight = nn.Parameter(w, requires_grad=m.weight.requires_grad)
        if m.bias is not None:
            new.bias = nn.Parameter(_take(m.bias, 0, out_idx), requires_grad=m.bias.requires_grad)
        return new.to(m.weight.device).train(m.training)
    if isinstance(m, nn.Conv2d) and m.groups > 1:  # depthwise: every tensor follows its input layout
        if _full(param_idx, m.out_channels):
            return m
        n = len(param_idx)
        new = nn.Conv2d(n, n, m.kernel_size, m.stride, m.padding, m.dilation, n, m.bias is not None, m.padding_mode)
        new.weight = nn.Parameter(_take(m.weight, 0, param_idx), requires_grad=m.weight.requires_grad)
        if m.bias is not None:
            new.bias = nn.Parameter(_take(m.bias, 0, param_idx), requires_grad=m.bias.requires_grad)
        return new.to(m.weight.device).train(m.training)
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        n_out, n_in = m.weight.shape[0], m.weight.shape[1]
        if _full(out_idx, n_out) and _full(in_idx, n_in):
            return m
        w = _take(_take(m.weight, 0, out_idx), 1, in_idx)
        if isinstance(m, nn.Conv2d):
            new = nn.Conv2d(w.shape[1], w.shape[0], m.kernel_size, m.stride, m.padding, m.dilation, 1,
                            m.bias is not None, m.padding_mode)
        else:
            new = nn.Linear(w.shape[1], w.shape[0], m.bias is not None)
        new.weight = nn.Parameter(w, requires_grad=m.weight.requires_grad)
        if m.bias is not None:
            new.bias = nn.Parameter(_take(m.bias, 0, out_idx), requires_grad=m.bias.requires_grad)
        return new.to(m.weight.device).train(m.training)
    if isinstance(m, nn.GroupNorm):
        if _full(param_idx, m.num_channels):
            return m
        new = nn.GroupNorm(m.num_groups, len(param_idx), m.eps, m.affine)
        if m.affine:
            new.weight = nn.Parameter(_take(m.weight, 0, param_idx), requires_grad=m.weight.requires_grad)
            new.bias = nn.Parameter(_take(m.bias, 0, param_idx), requires_grad=m.bias.requires_grad)
        return new.to(m.weight.device if m.affine else 'cpu').train(m.training)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d, nn.LayerNorm)):
        size = m.normalized_shape[0] if isinstance(m, nn.LayerNorm) else m.num_features
        if _full(param_idx, size):
            return m
        new = __import__("copy").deepcopy(m)
        n = len(param_idx)
        if isinstance(m, nn.LayerNorm):
            new.normalized_shape = (n,)
        else:
            new.num_features = n
        for pname, p in list(m.named_parameters(recurse=False)):
            setattr(new, pname, nn.Parameter(_take(p, 0, param_idx), requires_grad=p.requires_grad))
        for bname, b in list(m.named_buffers(recurse=False)):
            if b is not None and b.dim() > 0:
                setattr(new, bname, _take(b, 0, param_idx))
        return new
    raise TypeError(f"channel pruning cannot rewrite {type(m).__name__}")


def iterative_prune(graph: Graph, pruning: ChannelPruning, steps: int, batches, config=None) -> Graph:
    """Prune in ``steps`` rounds, fine-tuning after each with distillation from the unpruned model
    (the iterative schedule of Han et al. / Molchanov et al.: small cuts, recover, repeat).

    The per-round cut is geometric, so ``steps`` rounds reach the pass's ``ratio`` (or
    ``target_macs`` of the original MACs)."""
    import dataclasses

    from compiler.finetune import TrainConfig, train

    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"iterative_prune: steps must be a positive integer, got {steps!r}")
    config = config or TrainConfig(epochs=1, progress=False)
    teacher = graph.copy().module.eval()
    original_macs = summarize(graph).total_macs
    current = graph
    for step in range(1, steps + 1):
        if pruning.target_macs is not None:
            want = original_macs * (1.0 - pruning.target_macs) ** (step / steps)
            now = summarize(current).total_macs
            if now <= want:
                continue
            step_pass = dataclasses.replace(pruning, target_macs=1.0 - want / now)
        else:
            step_pass = dataclasses.replace(pruning, ratio=1.0 - (1.0 - pruning.ratio) ** (1.0 / steps))
        current = step_pass(current)
        train(current.module, batches, config, teacher=teacher)
        current.propagate_shapes()
    return current
