"""Weight sharing by k-means (Han, Mao & Dally, "Deep Compression", ICLR 2016, section 3).

Each layer's weights are clustered into ``2**bits`` centroids by 1-D k-means; the layer then stores
one b-bit index per weight plus the codebook (:class:`LutLinear` / :class:`LutConv2d`), or — for a
sparse layer — one index per *kept* weight (:class:`SparseLinear` / :class:`SparseConv2d` with a
codebook): zeros stay zero, only the surviving weights are clustered. The codebook is a parameter
whose gradient is the sum of the gradients of its cluster's weights, the paper's centroid
fine-tuning, so ``compiler.finetune.train`` fine-tunes it directly. ``per_channel=true`` gives every
output channel its own codebook (k-means per row), as the paper's option for layers whose channels
have very different ranges.

Centroid initialization (``init=``), the paper's section 3.1: ``linear`` spaces centroids evenly
over [min, max] (the paper's choice: it keeps centroids for the rare large weights, which matter
most); ``density`` puts them at evenly spaced quantiles of the weight CDF; ``random`` picks
weights at random (Forgy). ``codebook_dtype=float16`` rounds centroids to fp16 so the artifact
stores a half-size codebook losslessly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compiler import Pass, PassReport, register_pass
from compiler.graph import Graph
from compiler.linear_forms import linear_forms
from compiler.ops.lut_linear import SUPPORTED_BITS, LutConv2d, LutLinear, pack_indices
from compiler.ops.sparse import SparseConv2d, SparseLinear, _SparseStorage, plain_conv

from .sparsity import MaskMixin

INITS = ("linear", "density", "random")


def init_centroids(w: torch.Tensor, k: int, init: str, seed: int = 0) -> torch.Tensor:
    w = w.reshape(-1).double()
    if init == "linear":
        return torch.linspace(float(w.min()), float(w.max()), k, dtype=torch.float64)
    if init == "density":
        return torch.quantile(w[: 1 << 24], torch.linspace(0, 1, k + 2, dtype=torch.float64)[1:-1])
    gen = torch.Generator().manual_seed(seed)
    return w[torch.randperm(w.numel(), generator=gen)[:k]].sort().values


def kmeans_1d(w: torch.Tensor, k: int, init: str = "linear", iters: int = 50, seed: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on scalars: (centroids (k,) float64 sorted, index of each weight)."""
    x = w.reshape(-1).double()
    k = max(1, min(k, x.numel()))
    c = init_centroids(x, k, init, seed).sort().values
    idx = torch.zeros(x.numel(), dtype=torch.int64)
    for _ in range(iters):
        mids = (c[1:] + c[:-1]) / 2
        idx = torch.searchsorted(mids, x)
        counts = torch.bincount(idx, minlength=k)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, x)
        new = torch.where(counts > 0, sums / counts.clamp_min(1), c)   # an empty cluster stays put
        if torch.allclose(new, c, rtol=0, atol=1e-12):
            c = new
            break
        c = new.sort().values
    idx = torch.searchsorted((c[1:] + c[:-1]) / 2, x)
    return c, idx


def _round_codebook(c: torch.Tensor, dtype: str) -> torch.Tensor:
    return c.to(torch.float16).to(torch.float32) if dtype == "float16" else c.to(torch.float32)


@register_pass
@dataclass(frozen=True)
class WeightClustering(Pass):
    """Share weights through a per-layer codebook of ``2**bits`` centroids (k-means)."""

    name = "cluster"
    reported = ("stored_bytes",)

    bits: int = 5
    per_channel: bool = False
    init: str = "linear"
    iters: int = 50
    codebook_dtype: str = "float32"
    seed: int = 0
    layers: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def validate(self) -> None:
        self.check_range("bits", 1, 8, integer=True)
        self.check_choice("init", INITS)
        self.check_range("iters", 1, integer=True)
        self.check_choice("codebook_dtype", ("float32", "float16"))

    def requires(self, graph: Graph) -> None:
        self.check_patterns(graph, "layers/exclude", (*self.layers, *self.exclude))

    def run(self, graph: Graph, report: PassReport) -> Graph:
        linear_forms(graph)   # GPT-2's Conv1D: an nn.Linear first
        for name, mod in graph.layers().items():
            if not isinstance(mod, (nn.Conv2d, nn.Linear, _SparseStorage)):
                continue
            if not self.selects(name, report):
                continue
            if isinstance(mod, _SparseStorage) and mod.codebook is not None:
                report.skip(name, "already clustered")
                continue
            if isinstance(mod, nn.Conv2d) and not plain_conv(mod):
                report.skip(name, f"conv with groups={mod.groups}, padding {mod.padding!r}/{mod.padding_mode} is not clustered")
                continue
            new, err = self._cluster(mod)
            graph.module.set_submodule(name, new)
            report.change(f"{name}: {type(mod).__name__} -> {type(new).__name__} ({2 ** self.bits} clusters"
                          f"{' per output channel' if self.per_channel else ''}, "
                          f"{self.init} init, mean |dw| {err:.2e})")
        return graph

    def _per_row(self, rows: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, k) codebooks and the flat index of every weight, row after row."""
        books, idxs = [], []
        for r in rows:
            if r.numel() == 0:
                books.append(torch.zeros(k, dtype=torch.float64))
                continue
            c, i = kmeans_1d(r, k, self.init, self.iters, self.seed)
            books.append(torch.cat([c, c[-1:].expand(k - len(c))]) if len(c) < k else c)   # few weights: repeat
            idxs.append(i)
        cb = _round_codebook(torch.stack(books), self.codebook_dtype)
        return cb, torch.cat(idxs) if idxs else torch.zeros(0, dtype=torch.int64)

    def _cluster(self, mod: nn.Module) -> tuple[nn.Module, float]:
        k = 2 ** self.bits
        if isinstance(mod, MaskMixin):   # trained with fixed masks: cluster only the kept weights
            w = mod.weight.detach() * mod.mask
            mask = mod.mask.bool()
            if isinstance(mod, nn.Linear):
                mod = SparseLinear.from_dense(w, mod.bias, mask=mask)
            else:
                mod = SparseConv2d.from_dense(mod, mask=mask, weight=w)
        if isinstance(mod, _SparseStorage):
            vals = mod.values.detach()
            if self.per_channel:
                ptr = mod.row_ptr.long()
                cb, idx = self._per_row([vals[ptr[r]:ptr[r + 1]] for r in range(len(ptr) - 1)], k)
                rows = torch.repeat_interleave(torch.arange(len(ptr) - 1), ptr.diff())
                err = float((cb[rows, idx] - vals).abs().mean()) if vals.numel() else 0.0
            elif vals.numel() == 0:       # nothing kept: an all-zero layer, nothing to cluster
                cb, idx, err = torch.zeros(k), torch.zeros(0, dtype=torch.int64), 0.0
            else:
                c, idx = kmeans_1d(vals, k, self.init, self.iters, self.seed)
                cb = _round_codebook(c, self.codebook_dtype)
                err = float((cb[idx] - vals).abs().mean())
            args = (idx.to(torch.uint8), mod.col_idx, mod.row_ptr, cb, mod.bias)
            if isinstance(mod, SparseLinear):
                return SparseLinear(*args, mod.in_features, mod.block), err
            return SparseConv2d(*args, mod.weight_shape, mod.stride, mod.padding, mod.dilation, mod.block), err
        w = mod.weight.detach()
        if self.per_channel:
            cb, idx = self._per_row(list(w.reshape(w.shape[0], -1)), k)
            err = float((cb.gather(1, idx.reshape(w.shape[0], -1)) - w.reshape(w.shape[0], -1)).abs().mean())
        else:
            c, idx = kmeans_1d(w, k, self.init, self.iters, self.seed)
            cb = _round_codebook(c, self.codebook_dtype)
            err = float((cb[idx] - w.reshape(-1)).abs().mean())
        pack = next(b for b in SUPPORTED_BITS if b >= self.bits)     # 3 bits pack as 4, 5-7 as 8
        packed = pack_indices(idx.reshape(w.shape[0], -1), pack)
        if isinstance(mod, nn.Linear):
            return LutLinear(packed, cb, mod.bias, pack, mod.in_features), err
        return LutConv2d(packed, cb, mod.bias, pack, tuple(w.shape), mod.stride, mod.padding, mod.dilation), err
