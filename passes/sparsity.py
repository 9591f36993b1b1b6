"""Unstructured and structured weight sparsity, stored in CSR (compiler/ops/sparse.py).

* ``method="magnitude"`` — remove the smallest |w| (Han, Pool, Tran & Dally, "Learning both
  Weights and Connections for Efficient Neural Networks", NIPS 2015), with a threshold per layer
  (``scope="layer"``) or one for the whole model (``scope="global"``).
* ``method="snip"`` — connection sensitivity |g ⊙ w| from one batch at initialization (Lee,
  Ajanthan & Torr, "SNIP", ICLR 2019; the paper uses one global threshold: ``scope="global"``);
  give the batch as ``batch=(x, y)``.
* ``method="dns"`` — Dynamic Network Surgery (Guo, Yao & Chen, NIPS 2016): training layers keep
  every weight, the forward pass uses W ⊙ T and the gradient reaches all of W, and
  :func:`dns_callback` re-splices T during training (|w| < a pruned, |w| > b restored, in between
  unchanged), so pruned weights can come back.
* Gradual pruning: :func:`agp_callback` raises sparsity along Zhu & Gupta's cubic schedule
  ``s_t = s_f + (s_i - s_f)(1 - t/n)^3`` (“To prune, or not to prune”, 2017), masks fixed in between.
* ``pattern="block"`` keeps whole ``block`` (rows × cols) tiles ranked by their L1 norm; ``pattern=
  "n:m"`` keeps the ``n`` largest of every ``m`` consecutive input weights (2:4 as on Ampere; the
  sparsity is then 1 - n/m, and a different ``sparsity`` is an error).

``stage="train"`` swaps layers for :class:`MaskedLinear` / :class:`MaskedConv2d` (weight ⊙ mask, the
mask a buffer kept fixed by training) to fine-tune with ``compiler.finetune.train(...,
TrainConfig(step_callback=...))``; ``stage="deploy"`` (default) stores them — or plain layers pruned
directly — as :class:`SparseLinear` / :class:`SparseConv2d`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from compiler import Pass, PassReport, register_pass
from compiler.graph import Graph
from compiler.linear_forms import linear_forms
from compiler.ops.sparse import SparseConv2d, SparseLinear, plain_conv

METHODS = ("magnitude", "snip", "dns")
PATTERNS = ("unstructured", "block", "n:m")


# ---- training layers -----------------------------------------------------------------------------------
class MaskMixin:
    """A layer whose effective weight is ``weight * mask``; with ``splice`` (DNS) the gradient of
    the masked weight reaches every weight, so pruned ones keep learning and can come back."""

    squeezer_leaf = True
    splice: bool

    def _init_mask(self, mask: torch.Tensor, splice: bool) -> None:
        self.register_buffer("mask", mask.to(self.weight.dtype).clone())
        self.splice = splice

    def masked_weight(self) -> torch.Tensor:
        if self.splice:
            return self.weight + (self.weight * self.mask - self.weight).detach()
        return self.weight * self.mask

    @property
    def sparsity(self) -> float:
        return 1.0 - float(self.mask.mean())


class MaskedLinear(MaskMixin, nn.Linear):
    @classmethod
    def from_linear(cls, m: nn.Linear, mask: torch.Tensor, splice: bool = False) -> "MaskedLinear":
        new = cls(m.in_features, m.out_features, bias=m.bias is not None)
        new.load_state_dict(m.state_dict(), strict=False)
        new._init_mask(mask, splice)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


class MaskedConv2d(MaskMixin, nn.Conv2d):
    @classmethod
    def from_conv(cls, m: nn.Conv2d, mask: torch.Tensor, splice: bool = False) -> "MaskedConv2d":
        new = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                  m.bias is not None, m.padding_mode)
        new.load_state_dict(m.state_dict(), strict=False)
        new._init_mask(mask, splice)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)


# ---- masks -----------------------------------------------------------------------------------------------
def _as_2d(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def pattern_scores(score: torch.Tensor, pattern: str, block: tuple[int, int]) -> torch.Tensor:
    """Per-unit scores: elements, (r × c) blocks (L1 of the block), or the elements themselves for n:m."""
    if pattern != "block":
        return score
    s = _as_2d(score)
    r, c = block
    n, k = s.shape
    return s.reshape(n // r, r, k // c, c).sum((1, 3))


def expand_block_mask(keep: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    r, c = block
    return keep.repeat_interleave(r, 0).repeat_interleave(c, 1).reshape(shape)


def n_m_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive weights along the input axis."""
    s = _as_2d(score)
    groups = s.reshape(s.shape[0], -1, m)
    top = groups.topk(n, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(score.shape)


def compute_masks(scores: dict[str, torch.Tensor], sparsity: float, *, scope: str = "layer",
                  pattern: str = "unstructured", block: tuple[int, int] = (16, 1), n: int = 2, m: int = 4
                  ) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (shaped like each score) removing ``sparsity`` of the units: per layer, or
    by one threshold over all layers (``scope="global"``; ties broken by order)."""
    if pattern == "n:m":
        return {k: n_m_mask(s, n, m) for k, s in scores.items()}
    units = {k: pattern_scores(s, pattern, block) for k, s in scores.items()}

    def keep_top(flat: torch.Tensor, n_keep: int) -> torch.Tensor:
        keep = torch.zeros_like(flat, dtype=torch.bool)
        if n_keep > 0:
            keep[flat.topk(n_keep).indices] = True
        return keep

    if scope == "global":
        flat = torch.cat([u.reshape(-1) for u in units.values()])
        keep_flat = keep_top(flat, int(round((1 - sparsity) * flat.numel())))
        out, i = {}, 0
        for k, u in units.items():
            out[k] = keep_flat[i:i + u.numel()].reshape(u.shape)
            i += u.numel()
    else:
        out = {k: keep_top(u.reshape(-1), int(round((1 - sparsity) * u.numel()))).reshape(u.shape) for k, u in units.items()}
    if pattern == "block":
        out = {k: expand_block_mask(out[k], scores[k].shape, block) for k in out}
    return out


def snip_scores(model: nn.Module, layers: dict[str, nn.Module], batch: tuple[torch.Tensor, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """SNIP's connection sensitivity |dL/dc| = |g ⊙ w| for a multiplicative mask c = 1."""
    x, y = batch
    for p in model.parameters():
        p.grad = None
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        F.cross_entropy(model(x), y).backward()
    model.train(was_training)
    scores = {k: (m.weight.grad * m.weight).abs().detach().clone() for k, m in layers.items()}
    for p in model.parameters():
        p.grad = None
    return scores


# ---- training-time callbacks -----------------------------------------------------------------------------
def masked_layers(model: nn.Module) -> dict[str, MaskMixin]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MaskMixin)}


def agp_sparsity(step: int, final: float, steps: int, initial: float = 0.0, begin: int = 0) -> float:
    """Zhu & Gupta's cubic schedule."""
    t = min(max(step - begin, 0), steps) / max(steps, 1)
    return final + (initial - final) * (1 - t) ** 3


def agp_callback(final: float, steps: int, *, every: int = 10, initial: float = 0.0, scope: str = "layer",
                 pattern: str = "unstructured", block: tuple[int, int] = (16, 1), n: int = 2, m: int = 4
                 ) -> Callable[[nn.Module, int], None]:
    """``step_callback`` for training: every ``every`` steps, re-mask the masked layers by magnitude
    at the scheduled sparsity (masks only grow sparser; fixed in between)."""

    def callback(model: nn.Module, step: int) -> None:
        if step % every and step != steps:
            return
        layers = masked_layers(model)
        s = agp_sparsity(step, final, steps, initial)
        scores = {k: (l.weight.detach() * l.mask).abs() for k, l in layers.items()}
        masks = compute_masks(scores, s, scope=scope, pattern=pattern, block=block, n=n, m=m)
        with torch.no_grad():
            for k, l in layers.items():
                l.mask.copy_(masks[k].to(l.mask.dtype) * l.mask)
    return callback


class DnsSplicing:
    """Guo et al.'s splicing as a ``step_callback``: with probability (1 + gamma * step)^-power a step
    re-splices each layer: |w| below a = (1 - margin) q is cut, above b = (1 + margin) q restored,
    where q is the |w| quantile of the target ``sparsity``; in between the mask stays. Its random
    stream is part of a training checkpoint (``state_dict``), so a resumed run splices as the
    uninterrupted one would."""

    def __init__(self, sparsity: float, *, gamma: float = 1e-3, power: float = 1.0, margin: float = 0.1,
                 seed: int = 0) -> None:
        self.sparsity, self.gamma, self.power, self.margin = sparsity, gamma, power, margin
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, model: nn.Module, step: int) -> None:
        if float(torch.rand((), generator=self.generator)) > (1 + self.gamma * step) ** (-self.power):
            return
        with torch.no_grad():
            for layer in masked_layers(model).values():
                w = layer.weight.detach().abs()
                q = torch.quantile(w.reshape(-1).float()[: 1 << 24], self.sparsity)
                a, b = (1 - self.margin) * q, (1 + self.margin) * q
                layer.mask.copy_(torch.where(w < a, 0.0, torch.where(w > b, 1.0, layer.mask)))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def dns_callback(sparsity: float, *, gamma: float = 1e-3, power: float = 1.0, margin: float = 0.1,
                 seed: int = 0) -> DnsSplicing:
    """DNS's splicing ``step_callback`` (see :class:`DnsSplicing`)."""
    return DnsSplicing(sparsity, gamma=gamma, power=power, margin=margin, seed=seed)


# ---- the pass ----------------------------------------------------------------------------------------------
def _parse_block(text: str) -> tuple[int, int]:
    r, c = (int(v) for v in str(text).lower().split("x"))
    return r, c


@register_pass
@dataclass(frozen=True)
class Sparsify(Pass):
    """Prune individual weights (or blocks / n:m groups) of Conv2d and Linear layers."""

    name = "sparsify"
    reported = ("params", "stored_bytes", "macs")

    sparsity: float = 0.9
    method: str = "magnitude"
    scope: str = "layer"
    pattern: str = "unstructured"
    block: str = "16x1"
    n: int = 2
    m: int = 4
    stage: str = "deploy"
    layers: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    batch: Any = field(default=None, compare=False, repr=False, metadata={"spec": False})

    def validate(self) -> None:
        self.check_range("sparsity", 0.0, 1.0, hi_open=True)
        self.check_choice("method", METHODS)
        self.check_choice("scope", ("layer", "global"))
        self.check_choice("pattern", PATTERNS)
        self.check_choice("stage", ("train", "deploy"))
        self.block_shape  # parsed (and checked) once
        self.check_range("n", 1, integer=True)
        self.check_range("m", 1, integer=True)
        if self.n > self.m:
            self._fail("n", self.n, f"at most m={self.m}")
        if self.pattern == "n:m" and self.sparsity != 0.9 and abs(self.sparsity - (1 - self.n / self.m)) > 1e-9:
            self._fail("sparsity", self.sparsity, f"left out (or {1 - self.n / self.m:g}): pattern n:m with "
                       f"n={self.n}, m={self.m} fixes it")
        if self.method == "snip":
            if self.batch is None or len(self.batch) != 2:
                self._fail("batch", "None" if self.batch is None else type(self.batch).__name__,
                           "an (inputs, labels) batch: SNIP scores connections from one batch")
        if self.method == "dns" and self.stage != "train":
            self._fail("stage", self.stage, "train (DNS splices masks during training; deploy afterwards)")

    @cached_property
    def block_shape(self) -> tuple[int, int]:
        """``block`` parsed once: (rows, cols)."""
        try:
            r, c = _parse_block(self.block)
            if r < 1 or c < 1:
                raise ValueError
        except ValueError:
            self._fail("block", self.block, "ROWSxCOLS with positive integers, e.g. 16x1")
        return r, c

    def requires(self, graph: Graph) -> None:
        self.check_patterns(graph, "layers/exclude", (*self.layers, *self.exclude))

    def run(self, graph: Graph, report: PassReport) -> Graph:
        linear_forms(graph)   # GPT-2's Conv1D: an nn.Linear first
        block = self.block_shape
        chosen: dict[str, nn.Module] = {}
        for name, mod in graph.layers().items():
            if not isinstance(mod, (nn.Conv2d, nn.Linear)):
                continue
            if not self.selects(name, report):
                continue
            if isinstance(mod, nn.Conv2d) and not plain_conv(mod):
                report.skip(name, f"conv with groups={mod.groups}, padding {mod.padding!r}/{mod.padding_mode} "
                                  "is not stored sparse (dense groups=1 convs with numeric zero padding only)")
                continue
            w2 = _as_2d(mod.weight)
            if self.pattern == "block" and (w2.shape[0] % block[0] or w2.shape[1] % block[1]):
                report.skip(name, f"weight {tuple(w2.shape)} is not tiled by {block[0]}x{block[1]} blocks")
                continue
            if self.pattern == "n:m" and w2.shape[1] % self.m:
                report.skip(name, f"{w2.shape[1]} inputs are not a multiple of m={self.m}")
                continue
            chosen[name] = mod
        trained = {k: m for k, m in chosen.items() if isinstance(m, MaskMixin)}
        fresh = {k: m for k, m in chosen.items() if k not in trained}
        masks: dict[str, torch.Tensor] = {k: m.mask.bool() for k, m in trained.items()}
        if fresh:
            if self.method == "snip":
                scores = snip_scores(graph.module, fresh, self.batch)
            else:
                scores = {k: m.weight.detach().abs() for k, m in fresh.items()}
            masks.update(compute_masks(scores, self.sparsity, scope=self.scope, pattern=self.pattern,
                                       block=block, n=self.n, m=self.m))
        for name, mod in chosen.items():
            new = self._convert(mod, masks[name], block)
            graph.module.set_submodule(name, new)
            kept = float(masks[name].float().mean())
            report.change(f"{name}: {type(mod).__name__} -> {type(new).__name__} ({(1 - kept) * 100:.1f} % pruned)")
        return graph

    def _convert(self, mod: nn.Module, mask: torch.Tensor, block: tuple[int, int]) -> nn.Module:
        splice = self.method == "dns"
        blk = block if self.pattern == "block" else (1, 1)
        if self.stage == "train":
            if isinstance(mod, MaskMixin):
                return mod
            if isinstance(mod, nn.Linear):
                return MaskedLinear.from_linear(mod, mask, splice)
            return MaskedConv2d.from_conv(mod, mask, splice)
        w = mod.weight.detach() * mask
        if isinstance(mod, nn.Linear):
            return SparseLinear.from_dense(w, mod.bias, mask=mask.reshape(w.shape), block=blk)
        return SparseConv2d.from_dense(mod, mask=mask, block=blk, weight=w)
