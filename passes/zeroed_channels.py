"""Where each channel of a coupling group lives in the model's parameters, so that training methods
can drive whole channels to zero and channel pruning can then remove exactly those, without
changing the model's outputs.

A channel is *zero* when everything that produces it is zero — the filter rows and biases of the
Conv2d/Linear layers producing it, a depthwise filter and its bias, and where a BatchNorm follows,
its eval output for a zero input ``β − γ·μ/√(σ²+ε)`` — and *unread* when every Conv2d/Linear that
reads it has zero input columns for it. Either way removing it is exact, provided the layers in
between map 0 to 0 (ReLU, pooling, additions). Channels normalized by a LayerNorm/GroupNorm, used by a
parameter applied functionally or read by anything but a Conv2d/Linear are never called zero
(their statistics or offsets involve the channel).

Used by the ``zeroed`` criterion of :class:`passes.ChannelPruning` (``threshold=0`` removes
exactly the zero and unread channels), by Soft Filter Pruning (which zeroes filters) and by
Structured Sparsity Learning (whose group lasso drives them to zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from compiler.coupling import CouplingAnalysis, Group
from compiler.coupling_rules import HEADS


@dataclass(frozen=True)
class Slice:
    """Entries of ``module.attr`` along ``dim`` belonging to some of a group's channels:
    ``channels[i]`` (group numbering) owns positions ``positions[i]`` (one row of ``k``)."""

    module: str
    attr: str
    dim: int
    channels: torch.Tensor    # (n,) group channel numbers
    positions: torch.Tensor   # (n, k) indices along ``dim``

    def tensor(self, root: nn.Module) -> torch.Tensor | None:
        return getattr(root.get_submodule(self.module), self.attr, None)

    def norms2(self, root: nn.Module, size: int) -> torch.Tensor:
        """Sum of squares of each channel's entries (group numbering, ``size`` channels)."""
        out = torch.zeros(size, dtype=torch.float64)
        t = self.tensor(root)
        if t is None:
            return out
        vals = t.detach().double().index_select(self.dim, self.positions.reshape(-1))
        vals = vals.movedim(self.dim, 0).reshape(len(self.channels), -1)
        out[self.channels] += vals.pow(2).sum(1)
        return out

    def zero(self, root: nn.Module, channels: torch.Tensor) -> None:
        """Set the entries of ``channels`` (group numbering) to zero, in place."""
        t = self.tensor(root)
        mask = torch.isin(self.channels, channels)
        if t is None or not bool(mask.any()):
            return
        with torch.no_grad():
            t.index_fill_(self.dim, self.positions[mask].reshape(-1).to(t.device), 0.0)


@dataclass(frozen=True)
class ChannelParams:
    """The parameters of one prunable coupling group, per channel."""

    group: Group
    filters: tuple[Slice, ...]      # producing weight rows (what Soft Filter Pruning ranks by L2 norm)
    producing: tuple[Slice, ...]    # everything else that makes the channel non-zero (biases, depthwise)
    batchnorms: tuple[Slice, ...]   # BatchNorms scaling the channel (attr: unused; positions per channel)
    reading: tuple[Slice, ...]      # input columns of the Conv2d/Linear layers reading the channel
    unprovable: torch.Tensor        # (size,) bool: channels whose producing side cannot be shown zero
    unread_unprovable: torch.Tensor  # (size,) bool: channels also read by something other than Conv2d/Linear

    @property
    def size(self) -> int:
        return self.group.size

    def filter_norms(self, root: nn.Module) -> torch.Tensor:
        """L2 norm of each channel's filters (summed over the producing layers' rows)."""
        return sum((s.norms2(root, self.size) for s in self.filters), torch.zeros(self.size, dtype=torch.float64)).sqrt()

    def producing_norms(self, root: nn.Module) -> torch.Tensor:
        """How far each channel is from being zero (inf where that cannot be shown)."""
        total = sum((s.norms2(root, self.size) for s in self.filters + self.producing),
                    torch.zeros(self.size, dtype=torch.float64))
        for s in self.batchnorms:
            bn = root.get_submodule(s.module)
            offset = _bn_zero_output(bn).index_select(0, s.positions.reshape(-1)).reshape(len(s.channels), -1)
            total[s.channels] += offset.pow(2).sum(1)
        total = total.sqrt()
        total[self.unprovable] = math.inf
        return total

    def reading_norms(self, root: nn.Module) -> torch.Tensor:
        """L2 norm of the input columns reading each channel (inf where something else reads it)."""
        total = sum((s.norms2(root, self.size) for s in self.reading), torch.zeros(self.size, dtype=torch.float64)).sqrt()
        total[self.unread_unprovable] = math.inf
        return total

    def zeroed_scores(self, root: nn.Module) -> torch.Tensor:
        """0 exactly for a channel that is zero or unread: the smaller of the two norms."""
        return torch.minimum(self.producing_norms(root), self.reading_norms(root))

    def zero_filters(self, root: nn.Module, channels: torch.Tensor) -> None:
        """Set the filter rows (weights only) producing ``channels`` to zero."""
        for s in self.filters:
            s.zero(root, channels)

    def zero_channels(self, root: nn.Module, channels: torch.Tensor) -> None:
        """Make ``channels`` exactly zero: filters, biases, depthwise filters, and the BatchNorm's β
        and running mean (γ and the running variance are kept)."""
        for s in self.filters + self.producing:
            s.zero(root, channels)
        for s in self.batchnorms:
            for attr in ("bias", "running_mean"):
                Slice(s.module, attr, 0, s.channels, s.positions).zero(root, channels)


def _bn_zero_output(bn: nn.Module) -> torch.Tensor:
    """A BatchNorm's eval output for a zero input, per channel."""
    mean = bn.running_mean.detach().double() if bn.running_mean is not None else torch.zeros(bn.num_features, dtype=torch.float64)
    var = bn.running_var.detach().double() if bn.running_var is not None else torch.ones(bn.num_features, dtype=torch.float64)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    return beta - gamma * mean / torch.sqrt(var + bn.eps)


def _layout_slices(analysis: CouplingAnalysis, group: Group, layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(channels, positions (n, repeat)) of ``group``'s channels in a consumer's layout."""
    channels, positions, pos = [], [], 0
    for seg in layout:
        off = group.offset(analysis.find(seg.space))
        if off is not None:
            for k in range(seg.length):
                channels.append(off + seg.start + k)
                base = pos + k * seg.repeat
                positions.append(list(range(base, base + seg.repeat)))
        pos += seg.length * seg.repeat
    width = max((len(p) for p in positions), default=1)
    return (torch.tensor(channels, dtype=torch.long),
            torch.tensor(positions, dtype=torch.long).reshape(len(channels), width))


def _rows(group: Group, off: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    ch = torch.arange(off, off + n)
    return ch, (ch - off).reshape(-1, 1)


def channel_params(root: nn.Module, analysis: CouplingAnalysis, group: Group) -> ChannelParams | None:
    """The parameters of ``group``'s channels; None for attention heads and producers that are not
    plain Conv2d/Linear layers (an embedding, a transposed Linear), which these methods leave alone."""
    filters, producing, bns, reading = [], [], [], []
    unprovable = torch.zeros(group.size, dtype=torch.bool)
    unread = torch.zeros(group.size, dtype=torch.bool)
    for name, space in group.producers:
        m = root.get_submodule(name) if not name.endswith(HEADS) else None
        if type(m) not in (nn.Conv2d, nn.Linear):   # a subclass (quantized, masked) stores its weight otherwise
            return None
        ch, pos = _rows(group, group.offset(analysis.find(space)), m.weight.shape[0])
        filters.append(Slice(name, "weight", 0, ch, pos))
        if m.bias is not None:
            producing.append(Slice(name, "bias", 0, ch, pos))
    for c in group.consumers:
        ch, pos = _layout_slices(analysis, group, c.layout)
        if not len(ch):
            continue
        m = root.get_submodule(c.module) if c.role != "tensor" else None
        if c.role == "in" and type(m) in (nn.Conv2d, nn.Linear) and getattr(m, "groups", 1) == 1:
            reading.append(Slice(c.module, "weight", 1, ch, pos))
        elif c.role == "param" and isinstance(m, nn.modules.batchnorm._BatchNorm):
            bns.append(Slice(c.module, "weight", 0, ch, pos))
        elif c.role == "param" and type(m) is nn.Conv2d:   # depthwise: the channel's own filter
            producing.append(Slice(c.module, "weight", 0, ch, pos))
            if m.bias is not None:
                producing.append(Slice(c.module, "bias", 0, ch, pos))
        else:   # LayerNorm/GroupNorm statistics, functional parameters, attention inputs: not provable
            unprovable[ch] = True
            unread[ch] = True
    return ChannelParams(group, tuple(filters), tuple(producing), tuple(bns), tuple(reading), unprovable, unread)


def prunable_channel_params(root: nn.Module, analysis: CouplingAnalysis) -> list[ChannelParams]:
    """:func:`channel_params` of every prunable group that has some."""
    out = []
    for group in analysis.groups:
        if group.prunable and group.producers and not group.head_width:
            params = channel_params(root, analysis, group)
            if params is not None:
                out.append(params)
    return out
