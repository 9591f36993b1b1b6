"""Deep k-Means (pass ``deep-kmeans``): Wu, Wang, Wu, Wang, Veeraraghavan & Lin, "Deep k-Means:
Re-Training and Parameter Sharing with Harder Cluster Assignments for Compressing Deep
Convolutions", ICML 2018.

Re-training with the *spectrally relaxed k-means regularizer* (the paper's Eq. 3–5, after Zha et
al., "Spectral Relaxation for K-means Clustering", NIPS 2001), then k-means weight sharing. For a
data matrix ``W`` (d × n) whose columns are the n samples being clustered, the within-cluster sum of
squares of any k-clustering equals ``tr(WᵀW) − tr(Hᵀ WᵀW H)`` with ``H`` (n × k) the normalized
cluster indicators; relaxing ``H`` to any orthonormal ``F`` gives the lower bound

    R(W) = ||W||_F² − tr(Fᵀ WᵀW F),   F = the top-k eigenvectors of the Gram matrix WᵀW,

and the re-training loss is ``task loss + λ/2 · Σ_layers R(W)``, F held fixed between refreshes
every ``refresh`` optimizer steps (the paper's alternating update of F and W). The gradient
``λ (W − W F Fᵀ)`` pulls the samples toward the k-dimensional structure a k-clustering has.

Samples are weight *sub-vectors*, not scalars: the Gram matrix of scalar samples has rank 1, so for
any k ≥ 1 its top-k eigenvectors capture all of ``||W||²`` and R ≡ 0. Each row of a layer's
(out, in·kh·kw) weight is cut into sub-vectors of ``d`` consecutive weights along the input axis
(the last one of a row zero-padded when d does not divide the row); rank(WᵀW) ≤ d, so the relaxation is
informative only for ``k < d`` (enforced). After re-training the sub-vectors are clustered by vector
k-means (k-means++ seeding, Lloyd iterations) into k centroids of length d.

``finetune`` epochs then train the deployed model (the centroids through the LUT codebook, whose
gradient sums over the weights sharing an entry, as in Deep Compression; the sub-vector structure
is kept, since entry ``c·d + p`` is shared exactly by position p of cluster c's sub-vectors).

Deployment is exact onto the scalar LUT layers: the codebook is all ``k·d ≤ 256`` centroid entries
and weight ``p`` of a sub-vector assigned to centroid ``c`` indexes entry ``c·d + p``. This stores an
8-bit index per *weight* (LutLinear / LutConv2d), not the paper's log2(k) bits per *sub-vector*: the
stored size is that of 8-bit weight sharing, the accuracy that of k shared sub-vectors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from compiler import PassReport, register_pass
from compiler.graph import Graph

from .trained_compression import TrainedCompression, deploy_codebook


def sub_vectors(weight: torch.Tensor, d: int) -> torch.Tensor:
    """(d, n) matrix whose columns are the length-d runs of consecutive weights along each row (a row
    whose length is not a multiple of d ends in a run padded with zeros)."""
    rows = weight.reshape(weight.shape[0], -1)
    return F.pad(rows, (0, (-rows.shape[1]) % d)).reshape(-1, d).T


def top_eigenvectors(samples: torch.Tensor, k: int) -> torch.Tensor:
    """F (n, k): the top-k eigenvectors of the Gram matrix ``samplesᵀ samples`` (via the SVD of the
    (d, n) samples: its right singular vectors; no n × n matrix is formed)."""
    _, _, vh = torch.linalg.svd(samples.detach().double(), full_matrices=False)
    return vh[:k].T.to(samples.dtype)


def relaxed_kmeans(samples: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``||W||_F² − tr(Fᵀ WᵀW F)`` for W = ``samples`` (d, n) and F (n, k)."""
    return samples.pow(2).sum() - (samples @ f).pow(2).sum()


def vector_kmeans(samples: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on the columns of ``samples`` (d, n), k-means++ seeded: (centroids (k, d), labels (n,))."""
    x = samples.detach().double().T                                   # (n, d)
    n = x.shape[0]
    k = max(1, min(k, n))
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(n, (1,), generator=gen)]
    for _ in range(1, k):                                             # k-means++: D² sampling
        d2 = torch.cdist(x, centroids).pow(2).min(1).values
        pick = torch.multinomial(d2 / d2.sum(), 1, generator=gen) if float(d2.sum()) > 0 else torch.randint(n, (1,))
        centroids = torch.cat([centroids, x[pick]])
    labels = torch.cdist(x, centroids).argmin(1)
    for _ in range(iters):
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)   # an empty cluster stays put
        new = torch.cdist(x, centroids).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return centroids, labels


def within_cluster_ss(samples: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor) -> float:
    return float((samples.detach().double().T - centroids[labels]).pow(2).sum())


class SpectralKMeansRegularizer:
    """``λ/2 · Σ_layers R(W_l)`` over the layers ``names`` of a model, F refreshed by :meth:`refresh`
    (``TrainConfig(regularizer=reg, step_callback=reg.step)``)."""

    def __init__(self, model: nn.Module, names: list[str], k: int, d: int, lam: float, refresh: int = 10) -> None:
        self.names, self.k, self.d, self.lam, self.every = list(names), int(k), int(d), float(lam), int(refresh)
        self.f: dict[str, torch.Tensor] = {}
        self.refresh(model)

    def samples(self, model: nn.Module, name: str) -> torch.Tensor:
        return sub_vectors(model.get_submodule(name).weight, self.d)

    @torch.no_grad()
    def refresh(self, model: nn.Module) -> None:
        """Recompute each layer's F from its current weights."""
        self.f = {n: top_eigenvectors(self.samples(model, n), self.k) for n in self.names}

    def step(self, model: nn.Module, step: int) -> None:
        if step % self.every == 0:
            self.refresh(model)

    def value(self, model: nn.Module) -> torch.Tensor:
        """Σ_layers R(W_l) (without λ/2)."""
        return sum(relaxed_kmeans(self.samples(model, n), self.f[n]) for n in self.names)

    def __call__(self, model: nn.Module) -> torch.Tensor:
        return 0.5 * self.lam * self.value(model)


@register_pass
@dataclass(frozen=True)
class DeepKMeans(TrainedCompression):
    """Deep k-Means (Wu et al. 2018): spectrally relaxed k-means re-training, sub-vector k-means, LUT layers.

    Sub-vectors of ``d`` weights clustered into ``k < d`` centroids; see the module docstring."""

    name = "deep-kmeans"

    k: int = 8                 # vector centroids per layer (k < d: the relaxation vanishes for k >= d)
    d: int = 16                # sub-vector length (consecutive weights along the input axis); k*d <= 256
    lam: float = 1.0           # λ: the regularizer λ/2 · Σ R(W) added to the mean task loss
    refresh: int = 10          # optimizer steps between recomputations of F
    iters: int = 50            # Lloyd iterations of the final vector k-means
    finetune: int = 0          # epochs of centroid fine-tuning after deployment (LUT codebook, summed gradients)

    def validate(self) -> None:
        super().validate()
        self.check_range("d", 2, 256, integer=True)
        self.check_range("k", 1, None, integer=True)
        if self.k >= self.d:
            self._fail("k", self.k, f"fewer than d={self.d} (rank(WᵀW) <= d: the relaxation is 0 for k >= d)")
        if self.k * self.d > 256:
            self._fail("k", self.k, f"k*d <= 256 (the codebook of k*d entries is indexed by 8 bits; d={self.d})")
        self.check_range("lam", 0.0, None)
        self.check_range("refresh", 1, None, integer=True)
        self.check_range("iters", 1, None, integer=True)
        self.check_range("finetune", 0, None, integer=True)

    def chosen(self, graph: Graph, report: PassReport) -> dict[str, nn.Module]:
        out = {}
        for name, mod in self.targets(graph, report).items():
            count = mod.weight.shape[0] * -(-mod.weight[0].numel() // self.d)
            if count <= self.k:
                report.skip(name, f"{count} sub-vectors: no more than k={self.k}")
            else:
                out[name] = mod
        return out

    def run(self, graph: Graph, report: PassReport) -> Graph:
        chosen = self.chosen(graph, report)
        if not chosen:
            return graph
        self.dataset()
        reg = SpectralKMeansRegularizer(graph.module, list(chosen), self.k, self.d, self.lam, self.refresh)
        with torch.no_grad():
            before = float(reg.value(graph.module))
        if self.epochs:
            self.train(graph, report, regularizer=reg, step_callback=reg.step)
        reg.refresh(graph.module)
        with torch.no_grad():
            report.stats["relaxed_kmeans"] = f"{before:.4g} -> {float(reg.value(graph.module)):.4g}"
        sse = total = 0.0
        for name, mod in chosen.items():
            w = mod.weight.detach()
            samples = sub_vectors(w, self.d)
            centroids, labels = vector_kmeans(samples, self.k, self.iters, self.seed)
            err = within_cluster_ss(samples, centroids, labels)
            sse, total = sse + err, total + float(w.double().pow(2).sum())   # padded positions count: an upper bound
            # weight p of a sub-vector in cluster c -> codebook entry c*d + p
            idx = (labels.reshape(w.shape[0], -1, 1) * self.d + torch.arange(self.d)).reshape(w.shape[0], -1)
            idx = idx[:, :w[0].numel()]                                   # the padding is not deployed
            new = deploy_codebook(mod, idx, centroids.float().reshape(-1))
            graph.module.set_submodule(name, new)
            report.change(f"{name}: {type(mod).__name__} -> {type(new).__name__} ({samples.shape[1]} sub-vectors of "
                          f"{self.d} in {self.k} centroids, relative error {err / max(float(w.pow(2).sum()), 1e-30):.3g})")
        report.stats["relative_clustering_error"] = sse / max(total, 1e-30)
        if self.finetune:   # each codebook entry c*d + p is shared by cluster c's sub-vectors: they stay k vectors
            history = replace(self, epochs=self.finetune).train(graph, PassReport(self.name))
            report.stats["finetune_loss"] = f"{history.losses[0]:.4f} -> {history.losses[-1]:.4f}"
        return graph
