"""Soft Filter Pruning (He, Kang, Dong, Fu & Yang, "Soft Filter Pruning for Accelerating Deep
Convolutional Neural Networks", IJCAI 2018).

Algorithm 1 of the paper: train; at the end of every epoch (every ``interval`` epochs), in each
layer set the ``rate`` (P) fraction of filters with the smallest L2 norm to zero — but keep them in
the model, so the next epoch's updates reach them and a filter zeroed once can grow back and be
kept while another is zeroed instead (unlike hard pruning, which removes them for good). After the
last epoch's zeroing the zero filters are removed, with their feature maps and the next layers'
input channels, by channel pruning's ``zeroed`` criterion — exactly: the removed maps are zero.

Here a "layer" is a coupling group (``compiler.coupling``): layers whose channels are tied (a
residual add) are ranked and zeroed together, the norm summed over their filters. During training
only the filter weights are zeroed, as in the paper: the bias (or the BatchNorm's β) keeps the
feature map's activation alive, which is what lets the gradient reach a zeroed filter through a
ReLU (at exactly zero its gradient is zero). A zero filter's feature map is then a constant, not
zero; after the last zeroing the bias and the BatchNorm's β and running mean of the zero filters
are zeroed too (the change this makes is reported as ``settle_max_abs_change``), so that the maps
are exactly zero, as the paper's removal step assumes, and the removal is exact.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch
from torch import nn

from compiler import register_pass
from compiler.coupling import CouplingAnalysis
from compiler.graph import Graph

from .train_to_zero import TrainedChannelRemoval
from .zeroed_channels import ChannelParams, prunable_channel_params


class SoftPruner:
    """Soft Filter Pruning's epoch-end step as a ``TrainConfig.step_callback``: after every
    ``steps_per_epoch * interval`` optimizer steps, zero the weakest ``rate`` of each group's
    filters. Stateless between calls (the norms decide), so a resumed run zeroes the same filters."""

    def __init__(self, graph: Graph, rate: float, steps_per_epoch: int, *, interval: int = 1,
                 exclude: tuple[str, ...] = ()) -> None:
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"SoftPruner: rate must be in [0, 1), got {rate!r}")
        if steps_per_epoch < 1 or interval < 1:
            raise ValueError(f"SoftPruner: steps_per_epoch and interval must be >= 1, got {steps_per_epoch}, {interval}")
        self.rate, self.every = rate, steps_per_epoch * interval
        self.groups: list[ChannelParams] = [
            p for p in prunable_channel_params(graph.module, CouplingAnalysis(graph))
            if not any(fnmatch.fnmatchcase(s.module, pat) for s in p.filters for pat in exclude)]
        self.zeroed: list[list[torch.Tensor]] = []   # per zeroing, per group: the channels zeroed

    def __call__(self, model: nn.Module, step: int) -> None:
        if step % self.every == 0:
            self.zero_weakest(model)

    def zero_weakest(self, model: nn.Module) -> list[torch.Tensor]:
        """Zero the ``rate`` fraction of lowest-L2-norm filters of each group (at least one filter
        stays); returns the zeroed channels per group."""
        chosen = []
        for params in self.groups:
            n = min(math.floor(params.size * self.rate), params.size - 1)
            norms = params.filter_norms(model)
            weakest = torch.argsort(norms, stable=True)[:n]
            params.zero_filters(model, weakest)
            chosen.append(weakest)
        self.zeroed.append(chosen)
        return chosen


@register_pass
@dataclass(frozen=True)
class SoftFilterPruning(TrainedChannelRemoval):
    """Soft Filter Pruning (He et al. 2018): zero the weakest filters every epoch, train on, remove them."""

    name = "soft-filter-pruning"

    rate: float = 0.3      # P: the fraction of each layer's filters zeroed at every epoch's end
    interval: int = 1      # epochs between zeroings

    def validate(self) -> None:
        super().validate()
        self.check_range("rate", 0.0, 1.0, hi_open=True)
        self.check_range("interval", 1, None, integer=True)

    def callback(self, graph: Graph, steps_per_epoch: int) -> SoftPruner:
        """The step callback for ``compiler.finetune.train(graph.module, ..., TrainConfig(step_callback=...))``."""
        return SoftPruner(graph, self.rate, steps_per_epoch, interval=self.interval, exclude=self.exclude)

    def training_hooks(self, graph: Graph, steps_per_epoch: int) -> dict:
        return {"step_callback": self.callback(graph, steps_per_epoch)}

    def settle(self, graph: Graph, report, hooks: dict) -> None:
        pruner = hooks["step_callback"]
        if not pruner.zeroed or self.epochs % self.interval:   # no zeroing after the last epoch: do it now
            pruner.zero_weakest(graph.module)
        last = {(g, c) for g, chans in enumerate(pruner.zeroed[-1]) for c in chans.tolist()}
        earlier = {(g, c) for z in pruner.zeroed[:-1] for g, chans in enumerate(z) for c in chans.tolist()}
        report.stats["zeroings"] = len(pruner.zeroed)
        report.stats["zeroed_then_kept"] = len(earlier - last)   # soft: filters zeroed once that grew back
        for params, chans in zip(pruner.groups, pruner.zeroed[-1]):   # their maps: exactly zero
            params.zero_channels(graph.module, chans)
