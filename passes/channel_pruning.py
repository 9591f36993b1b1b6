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

import torch
import torch.nn.functional as F
from torch import nn

from compiler import Pass, PassError, PassReport, register_pass
from compiler.coupling import CouplingAnalysis, Group
from compiler.graph import Graph
from compiler.summary import summarize

CRITERIA = ("l1", "l2", "fpgm", "slimming", "taylor", "thinet", "random")
THINET_SAMPLES = 4096  # sampled (image, position, output channel) triples per group


@register_pass
@dataclass(frozen=True)
class ChannelPruning(Pass):
    """Prune a fraction of the channels of every prunable coupling group (filter-norm criteria)."""

    name = "channel-pruning"
    verify_tolerance = None  # lossy

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
        for item in self.overrides:
            pattern, eq, value = str(item).rpartition("=")
            try:
                ok = bool(eq and pattern) and 0.0 <= float(value) < 1.0
            except ValueError:
                ok = False
            if not ok:
                self._fail("overrides", item, "'pattern=ratio' with ratio in [0, 1)")
        if self.target_macs is not None:
            self.check_range("target_macs", 0.0, 1.0, lo_open=True, hi_open=True)

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
            return _bn_gammas(graph, group, analysis)
        if self.criterion == "thinet":
            xhat = signals.get(("thinet", group.id)) if signals else None
            return None if xhat is None else _thinet_order(xhat)
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
        for item in self.overrides:
            pattern, _, value = item.rpartition("=")
            if any(fnmatch.fnmatchcase(m, pattern) for m in layers):
                return float(value)
        return base

    # ---- planning ---------------------------------------------------------------------------------
    def _candidates(self, graph: Graph, analysis: CouplingAnalysis, report: PassReport):
        """(group, layers, scores) for every group this pass may prune (the rest go to the
        report), and ThiNet's sampled contributions when that is the criterion."""
        signals = None
        if self.criterion == "taylor":
            signals = _taylor_scores(graph, self.calibration)
        elif self.criterion == "thinet":
            signals = _thinet_contributions(graph, analysis, self.calibration, self.seed)
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
        for item in self.overrides:
            pattern, _, value = item.rpartition("=")
            if float(value) == 0.0:
                continue
            for group in analysis.groups:
                hits = [m for m, _ in group.producers if fnmatch.fnmatchcase(m, pattern)]
                if hits and any("model output" in why for why in group.frozen):
                    self._fail("overrides", item, f"layers whose output channels are not the model's output; "
                                                  f"{', '.join(hits)} produces the model output, so pruning it "
                                                  "would change the output size")

    # ---- the pass --------------------------------------------------------------------------------
    def run(self, graph: Graph, report: PassReport) -> Graph:
        self.check_patterns(graph, "exclude/overrides", (*self.exclude, *(o.rpartition("=")[0] for o in self.overrides)))
        before = summarize(graph)
        analysis = CouplingAnalysis(graph)
        self._check_overrides_reach_prunable_layers(analysis)
        out_shapes = _output_shapes(graph)
        candidates, contributions = self._candidates(graph, analysis, report)
        ratio = self.ratio
        if self.target_macs is not None:  # bisect the base ratio until the MAC cut is reached
            want = before.total_macs * (1.0 - self.target_macs)
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
                    _thinet_rescale(graph, analysis, group, keep, contributions[("thinet", group.id)])
        for group, layers, _ in candidates:
            keep = plan.get(group.root)
            if keep is not None:
                report.change(f"{', '.join(layers)}: {group.size} -> {len(keep)} channels")
        _rewrite(graph, analysis, plan)
        graph.recompile()
        if _output_shapes(graph) != out_shapes:  # a safety net: the analysis freezes outputs
            raise PassError(f"{self.name}: pruning would change the model's output shapes "
                            f"{out_shapes} -> {_output_shapes(graph)}; please report this model")
        after = summarize(graph)
        report.stats.update(params=f"{before.total_params:,} -> {after.total_params:,}",
                            macs=f"{before.total_macs:,} -> {after.total_macs:,}")
        return graph


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


def _bn_gammas(graph: Graph, group: Group, analysis: CouplingAnalysis) -> torch.Tensor | None:
    """|γ| of the BatchNorms that scale this group's channels, summed (Network Slimming)."""
    root = group.root
    total, found = torch.zeros(group.size, dtype=torch.float64), False
    for c in group.consumers:
        m = graph.module.get_submodule(c.module)
        if c.role != "param" or not isinstance(m, nn.modules.batchnorm._BatchNorm) or m.weight is None:
            continue
        pos = 0
        for seg in c.layout:
            if analysis.find(seg.space) == root:   # (BatchNorm1d after a flatten: `repeat` entries per channel)
                gamma = m.weight.detach().double().abs()[pos: pos + seg.length * seg.repeat]
                total[seg.start: seg.start + seg.length] += gamma.reshape(seg.length, seg.repeat).sum(1)
                found = True
            pos += seg.length * seg.repeat
    return total if found else None


def slimming_penalty(model: nn.Module, strength: float = 1e-4) -> torch.Tensor:
    """Network Slimming's sparsity regularizer: ``strength * sum |γ|`` over every BatchNorm; add it
    to the training loss (``finetune.TrainConfig(regularizer=...)``)."""
    terms = [m.weight.abs().sum() for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    return strength * torch.stack(terms).sum() if terms else torch.zeros(())


def _taylor_scores(graph: Graph, batches) -> dict[str, torch.Tensor]:
    """Molchanov et al.'s first-order Taylor criterion for the output channels of every Conv2d and
    Linear: |mean over batch and positions of activation * dLoss/dactivation|, averaged over
    batches. Labels default to the model's own predictions."""
    batches = list(batches) or [(graph.example_inputs, None)]
    module = graph.module
    acts: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_m, _inp, out):
            out.retain_grad()
            acts[name] = out
        return fn

    names = [n for n, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [module.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    was_training = module.training
    module.eval()
    try:
        for inputs, labels in batches:
            inputs = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
            module.zero_grad(set_to_none=True)
            out = module(*inputs)
            logits = out.reshape(-1, out.shape[-1]) if out.dim() > 1 else out.unsqueeze(0)
            target = labels if labels is not None else logits.detach().argmax(-1)
            torch.nn.functional.cross_entropy(logits, target.reshape(-1)).backward()
            for n in names:
                a = acts[n]
                if a.grad is None:
                    continue
                prod = (a * a.grad).detach().double()
                ch_dim = 1 if a.dim() == 4 else a.dim() - 1
                other = [d for d in range(a.dim()) if d != ch_dim and d != 0]
                per_sample = prod.mean(dim=other) if other else prod  # (batch, channels)
                score = per_sample.abs().mean(0) if ch_dim != 0 else per_sample.abs()
                sums[n] = sums.get(n, 0) + score
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
        module.zero_grad(set_to_none=True)
    return {n: sums[n] / len(batches) for n in sums}


def _thinet_contributions(graph: Graph, analysis: CouplingAnalysis, batches, seed: int) -> dict:
    """Per group, sampled per-channel contributions x̂ (samples × channels) to the outputs of the
    Conv2d/Linear layers that consume it, from the consumers' real inputs on ``batches``."""
    batches = list(batches) or [(graph.example_inputs, None)]
    module = graph.module
    consumers = {c.module for c in analysis.consumers if c.role == "in"}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in consumers}
    handles = [module.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: seen[n].append(args[0].detach())) for n in consumers]
    try:
        with torch.no_grad():
            was = module.training
            module.eval()
            for inputs, _ in batches:
                module(*(inputs if isinstance(inputs, (tuple, list)) else (inputs,)))
            module.train(was)
    finally:
        for hnd in handles:
            hnd.remove()
    gen = torch.Generator().manual_seed(seed)
    per_consumer: dict[str, torch.Tensor] = {}   # module -> (samples, input positions) contributions
    for name, xs in seen.items():
        m = module.get_submodule(name)
        x = torch.cat(xs).double()
        w = m.weight.detach().double()
        if isinstance(m, nn.Conv2d):
            cols = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)       # (N, C*K, L)
            n, ck, length = cols.shape
            k = ck // m.in_channels
            s = THINET_SAMPLES
            ni = torch.randint(0, n, (s,), generator=gen)
            li = torch.randint(0, length, (s,), generator=gen)
            oi = torch.randint(0, m.out_channels, (s,), generator=gen)
            u = cols[ni, :, li].reshape(s, m.in_channels, k)
            per_consumer[name] = (u * w[oi].reshape(s, m.in_channels, k)).sum(-1)
        else:  # Linear: one contribution per input feature
            x2 = x.reshape(-1, x.shape[-1])
            s = THINET_SAMPLES
            ri = torch.randint(0, x2.shape[0], (s,), generator=gen)
            oi = torch.randint(0, w.shape[0], (s,), generator=gen)
            per_consumer[name] = x2[ri] * w[oi]
    out = {}
    for group in analysis.groups:
        if not group.producers:
            continue
        root = group.root
        blocks = []
        for c in group.consumers:
            if c.role != "in" or c.module not in per_consumer or any(c.module == b[0] for b in blocks):
                continue
            contrib, pos, cols = per_consumer[c.module], 0, torch.zeros(THINET_SAMPLES, group.size, dtype=torch.float64)
            for seg in c.layout:
                if analysis.find(seg.space) == root:
                    part = contrib[:, pos: pos + seg.length * seg.repeat]
                    cols[:, seg.start: seg.start + seg.length] += part.reshape(-1, seg.length, seg.repeat).sum(-1)
                pos += seg.length * seg.repeat
            blocks.append((c.module, cols))
        if blocks:
            out[("thinet", group.id)] = torch.cat([b for _, b in blocks])
    return out


def _thinet_order(xhat: torch.Tensor) -> torch.Tensor:
    """Greedy removal (ThiNet Alg. 1): repeatedly remove the channel whose contribution, added to
    the already-removed ones, changes the sampled outputs least. Earlier removal = lower score."""
    n = xhat.shape[1]
    removed = torch.zeros(n, dtype=torch.bool)
    running = torch.zeros(xhat.shape[0], dtype=xhat.dtype)
    score = torch.empty(n, dtype=torch.float64)
    for step in range(n):
        cost = (running.unsqueeze(1) + xhat).pow(2).sum(0)
        cost[removed] = float("inf")
        c = int(cost.argmin())
        removed[c] = True
        running += xhat[:, c]
        score[c] = step
    return score


def _thinet_rescale(graph: Graph, analysis: CouplingAnalysis, group: Group, keep: torch.Tensor,
                    xhat: torch.Tensor) -> None:
    """Least squares: kept-channel scales w minimizing ||Σ_all x̂ - x̂_keep w||² on the samples;
    folded into the consuming layers' weights (input columns of the kept channels)."""
    target = xhat.sum(1)
    sol = torch.linalg.lstsq(xhat[:, keep], target.unsqueeze(1)).solution.squeeze(1)
    scale = torch.ones(group.size, dtype=torch.float64)
    scale[keep] = sol
    root = group.root
    done = set()
    with torch.no_grad():
        for c in group.consumers:
            if c.role != "in" or c.module in done:
                continue
            done.add(c.module)
            w = graph.module.get_submodule(c.module).weight
            pos = 0
            for seg in c.layout:
                if analysis.find(seg.space) == root:
                    factors = scale[seg.start: seg.start + seg.length].repeat_interleave(seg.repeat).to(w.dtype)
                    shape = [1, -1] + [1] * (w.dim() - 2)
                    w[:, pos: pos + seg.length * seg.repeat] *= factors.reshape(shape)
                pos += seg.length * seg.repeat


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
