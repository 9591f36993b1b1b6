"""Structured Sparsity Learning (Wen, Wu, Wang, Chen & Li, "Learning Structured Sparsity in Deep
Neural Networks", NIPS 2016).

SSL trains with group lasso on structures of the weights (Eq. 2 of the paper),

    E(W) = E_D(W) + λ_n Σ_l Σ_n ||W_l[n, :, :, :]||_2 + λ_c Σ_l Σ_c ||W_l[:, c, :, :]||_2
                  (+ λ_s Σ_l Σ_{c,h,w} ||W_l[:, c, h, w]||_2 for filter shapes),

which drives whole filters (filter-wise), input channels (channel-wise) and optionally filter
shapes (shape-wise) to zero, and then removes the zero groups. Here:

* the filter-wise and channel-wise groups are those of the channels channel pruning can remove
  (the prunable coupling groups): the filter rows producing each channel, each with its bias —
  the bias rides with its filter, so a zero group is a zero feature map — and the input columns of
  the Conv2d/Linear layers reading it (all ``H*W`` columns of a channel behind a flatten);
* after training, each group whose RMS is at most ``threshold`` is set to exactly zero (the
  vanishing groups of the paper's Fig. 2; Adam leaves them oscillating around 0 at the scale of
  the learning rate), and the channels now zero or unread are removed through channel pruning's
  ``zeroed`` criterion at ``threshold=0`` — an exact removal;
* shape-wise zeros (``lambda_shape``) stay in the weights as zeros (``sparsify`` can store them):
  removing a filter shape needs an im2col lowering that keeps only the live columns.

Python: :class:`GroupLasso` is the regularizer (``TrainConfig(regularizer=GroupLasso(graph, ...))``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from compiler import PassReport, register_pass
from compiler.coupling import CouplingAnalysis
from compiler.graph import Graph

from .train_to_zero import TrainedChannelRemoval
from .zeroed_channels import Slice, prunable_channel_params


def _rows(module: nn.Module, s: Slice) -> torch.Tensor:
    """(channels, entries): each channel's filter rows with its bias (filter-wise groups)."""
    w = module.weight.index_select(0, s.positions.reshape(-1)).reshape(len(s.channels), -1)
    if module.bias is not None:
        w = torch.cat([w, module.bias.index_select(0, s.positions.reshape(-1)).reshape(len(s.channels), -1)], 1)
    return w


def _columns(module: nn.Module, s: Slice) -> torch.Tensor:
    """(channels, entries): each channel's input columns (channel-wise groups)."""
    w = module.weight.index_select(1, s.positions.reshape(-1)).movedim(1, 0)
    return w.reshape(len(s.channels), -1)


def _shapes(module: nn.Module) -> torch.Tensor:
    """(in * kh * kw, out): a conv's filter-shape groups W[:, c, h, w]."""
    return module.weight.reshape(module.weight.shape[0], -1).t()


class GroupLasso:
    """SSL's regularizer: ``λ_n Σ ||filter group|| + λ_c Σ ||channel group|| + λ_s Σ ||shape group||``
    (L2 norm of each group, summed), callable on the model ``graph.module`` (or a copy of it)."""

    def __init__(self, graph: Graph, *, lambda_filter: float = 0.0, lambda_channel: float = 0.0,
                 lambda_shape: float = 0.0, exclude: tuple[str, ...] = ()) -> None:
        def kept(name: str) -> bool:
            return not any(fnmatch.fnmatchcase(name, p) for p in exclude)

        groups = prunable_channel_params(graph.module, CouplingAnalysis(graph))
        self.filters = [s for p in groups for s in p.filters if kept(s.module)]
        self.channels = [s for p in groups for s in p.reading if kept(s.module)]
        self.shapes = [n for n, m in graph.module.named_modules()
                       if type(m) is nn.Conv2d and m.groups == 1 and kept(n)] if lambda_shape else []
        self.lambdas = (lambda_filter, lambda_channel, lambda_shape)

    def groups(self, model: nn.Module):
        """(kind, module name, slice or None, (groups, entries) tensor) for every group family."""
        for s in self.filters:
            yield "filter", s.module, s, _rows(model.get_submodule(s.module), s)
        for s in self.channels:
            yield "channel", s.module, s, _columns(model.get_submodule(s.module), s)
        for name in self.shapes:
            yield "shape", name, None, _shapes(model.get_submodule(name))

    def __call__(self, model: nn.Module) -> torch.Tensor:
        weight = dict(zip(("filter", "channel", "shape"), self.lambdas))
        terms = [weight[kind] * torch.linalg.vector_norm(g, dim=1).sum()
                 for kind, _, _, g in self.groups(model) if weight[kind]]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    @torch.no_grad()
    def zero_small_groups(self, model: nn.Module, threshold: float) -> dict[str, int]:
        """Set every group whose RMS is at most ``threshold`` to exactly zero; counts per kind."""
        counts = {"filter": 0, "channel": 0, "shape": 0}
        for kind, name, s, g in list(self.groups(model)):
            small = g.detach().pow(2).mean(1).sqrt() <= threshold
            if not bool(small.any()):
                continue
            counts[kind] += int(small.sum())
            m = model.get_submodule(name)
            if kind == "shape":
                m.weight.view(m.weight.shape[0], -1)[:, small] = 0.0
                continue
            pos = s.positions[small].reshape(-1)
            m.weight.index_fill_(0 if kind == "filter" else 1, pos, 0.0)
            if kind == "filter" and m.bias is not None:
                m.bias.index_fill_(0, pos, 0.0)
        return counts


@register_pass
@dataclass(frozen=True)
class StructuredSparsity(TrainedChannelRemoval):
    """SSL (Wen et al. 2016): group-lasso training on filters/channels(/shapes), then remove the zero groups."""

    name = "structured-sparsity"

    lambda_filter: float = 1e-2    # λ_n: filter-wise group lasso
    lambda_channel: float = 1e-3   # λ_c: channel-wise group lasso
    lambda_shape: float = 0.0      # λ_s: shape-wise group lasso (conv filter shapes; zeros stay as zeros)
    threshold: float = 1e-2        # groups with RMS <= this are set to zero after training

    def validate(self) -> None:
        super().validate()
        for option in ("lambda_filter", "lambda_channel", "lambda_shape", "threshold"):
            self.check_range(option, 0.0, None)

    def regularizer(self, graph: Graph) -> GroupLasso:
        """The group-lasso term for ``compiler.finetune.train(graph.module, ..., TrainConfig(regularizer=...))``."""
        return GroupLasso(graph, lambda_filter=self.lambda_filter, lambda_channel=self.lambda_channel,
                          lambda_shape=self.lambda_shape, exclude=self.exclude)

    def training_hooks(self, graph: Graph, steps_per_epoch: int) -> dict:
        return {"regularizer": self.regularizer(graph)}

    def settle(self, graph: Graph, report: PassReport, hooks: dict) -> None:
        counts = hooks["regularizer"].zero_small_groups(graph.module, self.threshold)
        report.stats["groups_zeroed"] = counts
