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
  Attention heads get Michel et al.'s head importance, |Σ over the head's outputs of a × gradient|
  ("Are Sixteen Heads Really Better than One?", NeurIPS 2019): the gradient of a gate on the head.
* ``thinet`` — greedy selection by reconstruction of the *next* layers' outputs on sampled
  positions, then least-squares rescaling of the kept channels (Luo et al., "ThiNet: A Filter
  Level Pruning Method for Deep Neural Network Compression", ICCV 2017).
* ``random`` — a seeded random baseline.
* ``zeroed`` — how far a channel is from being exactly zero or unread (``passes.zeroed_channels``);
  with ``threshold=0`` the pass removes exactly the channels that training drove to zero —
  Structured Sparsity Learning's group lasso (``passes.ssl``) or Soft Filter Pruning's zeroed
  filters (``passes.soft_filter_pruning``) — and the outputs do not change.

``threshold`` prunes every channel whose score is at most that value instead of a ``ratio``.

A grouped conv (not depthwise) is pruned in one of two ways (``grouped_convs``): ``channels``
keeps the same local channels in every group, so the groups narrow; ``whole`` keeps or removes
whole groups (their inputs and outputs together), so the group width stays. ``auto`` (the
default) prunes whole groups where the group is too narrow for ``round_to`` to hold in it:
RegNet's 16-channel groups at ``round_to=16`` would narrow to 11 channels each, one vector's
lanes two-thirds used by every layer around them.

``round_to`` rounds each group's kept count up to a multiple (a vector's lanes; for attention, the
fewest heads whose channels are one), except that rounding never cancels a ratio's cut: where up
is the whole group, the nearer multiple below is kept instead (see ``_rounded``).
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
from compiler.coupling_rules import HEADS
from compiler.graph import Graph
from compiler.summary import summarize

from .channel_rewrite import producer_rows, rewrite
from .headwise_forms import headwise_forms
from .pruning_criteria import (bn_gammas, head_importance, slimming_penalty, taylor_scores, thinet_contributions, thinet_order,
                               thinet_rescale)
from .zeroed_channels import channel_params

__all__ = ["CRITERIA", "ChannelPruning", "iterative_prune", "slimming_penalty"]

CRITERIA = ("l1", "l2", "fpgm", "slimming", "taylor", "thinet", "random", "zeroed")
GROUPED_CONVS = ("auto", "channels", "whole")


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
    threshold: float | None = None    # prune every channel scoring <= this instead (criterion zeroed: 0 = exact)
    grouped_convs: str = "auto"       # "channels" | "whole" groups | "auto" (whole where round_to cannot hold)
    # data for data-driven criteria (taylor, thinet): (inputs, labels or None) batches; not in the spec
    calibration: tuple = field(default=(), repr=False, compare=False, metadata={"spec": False})

    def validate(self) -> None:
        self.check_range("ratio", 0.0, 1.0, hi_open=True)
        self.check_choice("criterion", CRITERIA)
        self.check_range("round_to", 1, None, integer=True)
        self.check_choice("grouped_convs", GROUPED_CONVS)
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
        if self.threshold is not None:
            self.check_range("threshold", 0.0, None)
            for other in ("target_macs", "overrides"):
                if getattr(self, other):
                    self._fail("threshold", self.threshold, f"None when {other} is given (a threshold decides the "
                                                            "channels by their scores, not by a ratio)")

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
        if self.criterion == "zeroed":
            params = channel_params(graph.module, analysis, group)
            return None if params is None or group.head_width else params.zeroed_scores(graph.module)
        attention_heads = any(HEADS in m for m, _ in group.producers)   # one channel per head
        if group.members and (self.criterion in ("thinet", "slimming") or self.criterion == "taylor" and (
                attention_heads or group.head_width)):
            return None   # their signals are per single space (a shuffle's tied spaces: l1/l2/fpgm/taylor/random)
        if self.criterion == "taylor" and (attention_heads or group.head_width):   # Michel et al.'s score
            return head_importance(graph, group, analysis, signals or {})
        if self.criterion in ("thinet", "slimming") and attention_heads:
            return None   # attention heads: norms of their weights (l1, l2, fpgm), taylor, or random
        if self.criterion == "slimming":
            return bn_gammas(graph, group, analysis)
        if self.criterion == "thinet":
            readers = [graph.module.get_submodule(c.module) for c in group.consumers if c.role.startswith("in")]
            if not all(isinstance(m, (nn.Conv2d, nn.Linear)) for m in readers):
                return None   # its rescaling folds into Conv2d/Linear inputs only (not an attention's q/k/v)
            xhat = signals.get(("thinet", group.id)) if signals else None
            return None if xhat is None else thinet_order(xhat)
        total = torch.zeros(group.size, dtype=torch.float64)
        for name, space in group.producers:
            off = group.offset(analysis.find(space))   # where its channels sit in the group
            if self.criterion == "taylor":   # a layer that got no gradient contributes nothing
                score = signals.get(name)
                if score is not None:
                    total[off:off + len(score)] += score
                continue
            w = producer_rows(graph.module, name).double()
            rows = w.reshape(w.shape[0], -1)
            if self.criterion == "l1":
                score = rows.abs().sum(1)
            elif self.criterion == "l2":
                score = rows.pow(2).sum(1).sqrt()
            else:  # fpgm: sum of distances to the other filters
                score = torch.cdist(rows, rows).sum(1)
            total[off:off + len(score)] += score
        return total

    def whole_groups(self, conv: nn.Conv2d) -> bool:
        """Whether the grouped ``conv`` is pruned by whole groups. ``auto``: where a group is
        narrower than two multiples of ``round_to`` (or not one), so narrowing it cannot keep
        whole vectors; never for ``thinet`` and ``slimming``, whose signals are per layer."""
        if self.grouped_convs != "auto":
            return self.grouped_convs == "whole"
        if self.round_to == 1 or self.criterion in ("thinet", "slimming"):
            return False
        widths = (conv.in_channels // conv.groups, conv.out_channels // conv.groups)
        return any(w % self.round_to or w < 2 * self.round_to for w in widths)

    def channels_to_keep(self, size: int, ratio: float | None = None, unit: int | None = None) -> int:
        ratio = self.ratio if ratio is None else ratio
        return self._rounded(size, max(self.min_channels, size - math.floor(size * ratio)), unit, cut=True)

    def _rounded(self, size: int, keep: int, unit: int | None = None, *, cut: bool = False) -> int:
        """``keep`` rounded up to a multiple of ``unit`` (default ``round_to``), never above ``size``.
        For a ratio's cut (``cut``), rounding up may not cancel it: where it would keep the whole
        group though ``keep`` is smaller, the multiple below is taken when it is nearer (and keeps
        a unit and ``min_channels``). A 32-channel group at a 0.33 ratio keeps 16, not 32: rounded
        up, every narrow early layer stayed whole and ``target_macs`` pruned the wide late ones
        harder to make up the MACs, so the latency fell less than the MACs (efficientnet_b0's stem
        and first block; realized cut 0.88 -> 0.94 kernel by kernel). A threshold keeps every
        channel above it, so its counts only round up."""
        unit = unit or self.round_to
        up = min(size, math.ceil(keep / unit) * unit)
        down = keep // unit * unit
        if cut and keep < up == size and down >= max(unit, self.min_channels) and keep - down < up - keep:
            return down
        return up

    def _unit(self, group: Group, layers: list[str], analysis: CouplingAnalysis) -> int:
        """What ``round_to`` rounds a group's kept count to, in the group's own units. Attention
        heads (one unit of the group per head): the fewest heads whose channels are a multiple of
        ``round_to`` (one 32-wide head at 16; rounding the head count itself to 16 kept every head
        of ViT-B, Swin-T and MaxViT-T). A grouped conv pruned by whole groups: ``round_to`` in each
        of its equal spaces, input and output (else a group of 4-channel groups kept 88 a side). A
        grouped conv narrowed in every group (its channels tied in classes, the same local channel
        of each of k groups): ``round_to`` local channels a group, ``k · round_to`` in all (RegNet's
        16-wide groups at ``round_to=8`` kept 11 or 12 a group: vectors of 1 or 6 lanes, and the
        pruned regnet_x_400mf ran no faster than the dense one on an AVX2 CPU)."""
        heads = [analysis.modules[m[: -len(HEADS)]] for m in layers if m.endswith(HEADS)]
        if heads:
            return math.lcm(*(self.round_to // math.gcd(self.round_to, int(m.head_dim)) for m in heads))
        spans = [len(span) for _, span in group.spans()]
        whole = not analysis.whole_group_convs.isdisjoint(layers)
        if whole and len(set(spans)) == 1:
            return self.round_to * len(spans)
        tied = {len(c) for c in group.classes}
        if len(tied) == 1 and (k := tied.pop()) > 1 and k * len(group.classes) == group.size:
            return self.round_to * k
        return self.round_to

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
                why = {"slimming": "no BatchNorm scaling factor", "zeroed": "produced by attention heads or layers that "
                       "are not plain Conv2d/Linear"}.get(self.criterion, "no Conv2d/Linear consumer to reconstruct")
                report.skip(", ".join(layers), f"criterion '{self.criterion}' has no signal for this group ({why})")
                continue
            out.append((group, layers, scores))
        return out, signals

    def _plan(self, candidates, analysis: CouplingAnalysis, ratio: float) -> dict[int, torch.Tensor]:
        """Channels kept per group root for a given base ratio (local or global ranking)."""
        n_keep: dict[int, int] = {}
        if self.threshold is not None:   # every channel above the threshold stays
            for i, (group, layers, scores) in enumerate(candidates):
                alive = int((scores > self.threshold).sum())
                n_keep[i] = self._rounded(group.size, max(self.min_channels, alive), self._unit(group, layers, analysis))
        elif self.scope == "global":
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
            for i, (group, layers, _) in enumerate(candidates):
                n_keep[i] = self._rounded(group.size, group.size - pruned[i], self._unit(group, layers, analysis), cut=True)
        else:
            for i, (group, layers, _) in enumerate(candidates):
                n_keep[i] = self.channels_to_keep(group.size, self._ratio_for(layers, ratio),
                                                  self._unit(group, layers, analysis))
        plan = {}
        for i, (group, _, scores) in enumerate(candidates):
            if n_keep[i] < group.size:
                class_of = {c: cls for cls in group.classes for c in cls}
                pieces = [mine for pieces, _ in analysis.pieces.values() for piece in pieces
                          if (mine := [off + seg.start + k for seg in piece
                                       if (off := group.offset(analysis.find(seg.space))) is not None
                                       for k in range(seg.length)])]
                # a split piece must keep a channel: one lying in a single class of tied channels
                # keeps that class (counted in the budget); the others are checked after choosing
                required = {tuple(class_of.get(p[0], [p[0]])) for p in pieces
                            if all(class_of.get(c, [c]) == class_of.get(p[0], [p[0]]) for c in p)}
                keep = _select(group, scores, n_keep[i], [list(cls) for cls in required])
                members = [span for _, span in group.spans()] if group.members else []
                for mine in pieces + members:   # a piece, or a member layer of a merged group, keeps a channel
                    if not keep.intersection(mine):   # the smallest class there, then the best
                        best = min(mine, key=lambda c: (len(class_of.get(c, [c])), -float(scores[c])))
                        keep.update(class_of.get(best, [best]))
                plan.update(group.split(keep))
        return plan

    def _macs_after(self, graph: Graph, analysis: CouplingAnalysis, plan) -> int:
        trial = graph.copy()
        rewrite(trial, analysis, plan)
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
        patterns = (*self.exclude, *(p for p, _ in self.override_ratios))   # "<layer>::heads": an attention's heads
        self.check_patterns(graph, "exclude/overrides", (p.removesuffix(HEADS) for p in patterns))

    def run(self, graph: Graph, report: PassReport) -> Graph:
        # Swin's window attention: widths made independent; for Michel et al.'s head importance
        # (taylor), nn.MultiheadAttention too (exact rewrites)
        rewritten = headwise_forms(graph, multihead=self.criterion == "taylor")
        analysis = CouplingAnalysis(graph, whole_groups=self.whole_groups)
        self._check_overrides_reach_prunable_layers(analysis)
        candidates, contributions = self._candidates(graph, analysis, report)
        ratio = self.ratio
        if self.target_macs is not None:  # bisect the base ratio until the MAC cut is reached
            base = summarize(graph) if rewritten or report.before is None else report.before   # with its attention MACs
            want = base.total_macs * (1.0 - self.target_macs)
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
            removed = sum(len(span) - len(plan[root]) for root, span in group.spans() if root in plan)
            if removed:
                units = "heads" if all(m.endswith(HEADS) for m in layers) else "channels"
                report.change(f"{', '.join(layers)}: {group.size} -> {group.size - removed} {units}")
        rewrite(graph, analysis, plan)
        return graph

    def ensures(self, before: Graph, after: Graph) -> None:
        if _output_shapes(after) != _output_shapes(before):  # a safety net: the analysis freezes outputs
            raise PassError(f"{self.name}: pruning would change the model's output shapes "
                            f"{_output_shapes(before)} -> {_output_shapes(after)}; please report this model")


def _output_shapes(graph: Graph) -> list:
    out = next(n for n in graph.module.graph.nodes if n.op == "output")
    return [tuple(n.meta.get("shape") or ()) for n in out.all_input_nodes]


def _select(group: Group, scores: torch.Tensor, n_keep: int, required: list[list[int]] = ()) -> set[int]:
    """The best-scoring channels, at least ``n_keep`` of them, taken in whole classes of tied
    channels (a class scores the mean of its channels: classes of unequal sizes, as a shuffle's
    ties make, are ranked per channel kept)."""
    classes = group.classes or [[c] for c in range(group.size)]
    totals = torch.stack([scores[cls].mean() for cls in classes])
    order = torch.argsort(totals, descending=True, stable=True).tolist()
    keep: set[int] = {c for cls in required for c in cls}
    for ci in order:   # best first, a class that would overshoot the count left for smaller ones
        if len(keep) + len(classes[ci]) <= n_keep and not keep.intersection(classes[ci]):
            keep.update(classes[ci])
    for ci in order:   # still short (no class fits exactly): the best of the rest
        if len(keep) >= n_keep:
            break
        keep.update(classes[ci])
    return keep


def iterative_prune(graph: Graph, pruning: ChannelPruning, steps: int, batches, config=None) -> Graph:
    """Prune in ``steps`` rounds, fine-tuning after each with distillation from the unpruned model
    (the iterative schedule of Han et al. / Molchanov et al.: small cuts, recover, repeat).
    ``batches``: a Dataset (global batches of ``config.batch_size``, split over the ranks under
    torchrun) or, in one process, ready-made batches.

    The per-round cut is geometric, so ``steps`` rounds reach the pass's ``ratio`` (or
    ``target_macs`` of the original MACs)."""
    import dataclasses

    from compiler.distributed import decided_on_main
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
        # the cut is decided once on rank 0 and broadcast: every rank of a distributed run holds it
        current = decided_on_main(lambda p=step_pass, g=current: p(g))
        train(current.module, batches, config, teacher=teacher)
        current.propagate_shapes()
    return current
