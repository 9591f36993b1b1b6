"""Low-rank training then the low-rank split (pass ``low-rank-train``), two methods:

* ``method=cat`` — compression-aware training (Alvarez & Salzmann, "Compression-aware Training of
  Deep Networks", NIPS 2017): each layer's weight, reshaped to the (out, in·kh·kw) matrix the SVD
  split factorizes, carries the rank-inducing nuclear norm ``τ ||W||_*`` plus the group term
  ``λ_g Σ_rows sqrt(|g|) ||w_g||₂`` (group Lasso on each output unit's weights), minimized by
  proximal stochastic gradient: after each optimizer step of the task loss, the proximal operator of
  the nuclear norm — singular value soft-thresholding ``W ← U max(S − η τ, 0) Vᵀ`` (η the learning
  rate) — then that of the group term ``w_g ← max(0, 1 − η λ_g sqrt(|g|) / ||w_g||) w_g``. Singular
  values that reach 0 stay 0 unless the data pull them back, so the weight's numerical rank falls.
* ``method=trp`` — Trained Rank Pruning (Xu, Li, Zhang, Wen, Wang, Qi, Chen, Lin & Xiong, "Trained
  Rank Pruning for Efficient Deep Neural Networks", IJCAI 2020; arXiv 1812.02402): every ``period``
  optimizer steps each layer's weight is *substituted* by its truncated SVD at the energy threshold
  (the smallest rank keeping ``energy`` of ``Σ s²``), and the loss carries the nuclear-norm
  regularizer ``λ_* Σ ||W||_*`` (its subgradient ``U Vᵀ`` as the gradient), so training
  continues from low-rank points and the spectrum concentrates.

At the end each layer is split with the existing SVD split (``low-rank:method=svd``: Linear →
two Linears, k×k conv → k×k (C→R) + 1×1 (R→N)) at the rank its singular values leave: ``cat`` —
the number of singular values above ``tol · s_max`` (those not soft-thresholded away), capped by
``energy``; ``trp`` — the energy-threshold rank of a final substitution. A split that would not
remove MACs is skipped (the layer stays dense, as trained).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from compiler import PassReport, register_pass
from compiler.graph import Graph

from .low_rank import LowRankSplit, RankRule, rank_from_singular_values
from .trained_compression import TrainedCompression

METHODS = ("cat", "trp")


def matrix_of(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)


def left_singular(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(U, s descending, A, transposed) for A = ``w`` (double) or its transpose, whichever has fewer
    rows, with ``A = U diag(s) Vᵀ``: from the eigendecomposition of the small Gram matrix A Aᵀ. LAPACK's
    SVD slows down by 10-100× on the nearly rank-deficient matrices these methods produce; this does not."""
    a = w.detach().double()
    transposed = a.shape[0] > a.shape[1]
    if transposed:
        a = a.T
    evals, u = torch.linalg.eigh(a @ a.T)
    return u.flip(1), evals.flip(0).clamp_min(0).sqrt(), a, transposed


def _back(m: torch.Tensor, transposed: bool, like: torch.Tensor) -> torch.Tensor:
    return (m.T if transposed else m).to(like.dtype)


def singular_value_soft_threshold(w: torch.Tensor, threshold: float) -> torch.Tensor:
    """The proximal operator of ``threshold · ||·||_*`` on the matrix ``w``: ``U max(S − t, 0) Vᵀ``
    (computed as ``U diag(max(s − t, 0) / s) Uᵀ W``, the same matrix)."""
    u, s, a, transposed = left_singular(w)
    shrink = torch.where(s > 0, (s - threshold).clamp_min(0) / s.clamp_min(1e-300), torch.zeros_like(s))
    return _back((u * shrink) @ (u.T @ a), transposed, w)


def group_soft_threshold(w: torch.Tensor, threshold: float) -> torch.Tensor:
    """The proximal operator of ``threshold · Σ_rows sqrt(|row|) ||row||₂`` (group Lasso over output units)."""
    norms = w.norm(dim=1, keepdim=True)
    scale = (1 - threshold * math.sqrt(w.shape[1]) / norms.clamp_min(1e-30)).clamp_min(0)
    return w * scale


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """The smallest rank keeping ``energy`` of ``Σ s²`` (low_rank's energy rule)."""
    return rank_from_singular_values(s.detach().double().cpu().numpy(), RankRule("energy", energy))


def truncated_svd(w: torch.Tensor, energy: float) -> tuple[torch.Tensor, int]:
    """(the rank-r truncated SVD of the matrix ``w``, r) with r the energy-threshold rank: ``U_r U_rᵀ W``."""
    u, s, a, transposed = left_singular(w)
    r = energy_rank(s, energy)
    return _back(u[:, :r] @ (u[:, :r].T @ a), transposed, w), r


def numerical_rank(w: torch.Tensor, tol: float) -> int:
    s = torch.linalg.svdvals(matrix_of(w).detach().double())
    return int((s > tol * s[0]).sum()) if len(s) and float(s[0]) > 0 else 0


class ProximalNuclear:
    """CAT's proximal step (``TrainConfig(step_callback=...)``): after each optimizer step, singular
    value soft-thresholding at ``lr · tau`` then group soft-thresholding at ``lr · group``."""

    def __init__(self, names: list[str], lr: float, tau: float, group: float) -> None:
        self.names, self.lr, self.tau, self.group = list(names), float(lr), float(tau), float(group)

    @torch.no_grad()
    def __call__(self, model: nn.Module, step: int) -> None:
        for name in self.names:
            p = model.get_submodule(name).weight
            w = singular_value_soft_threshold(matrix_of(p), self.lr * self.tau)
            if self.group:
                w = group_soft_threshold(w, self.lr * self.group)
            p.copy_(w.reshape(p.shape))


class RankSubstitution:
    """TRP's substitution (``TrainConfig(step_callback=...)``): every ``period`` steps each weight
    becomes its energy-threshold truncated SVD; ``ranks`` holds the ranks of the last substitution."""

    def __init__(self, names: list[str], energy: float, period: int) -> None:
        self.names, self.energy, self.period = list(names), float(energy), int(period)
        self.ranks: dict[str, int] = {}
        self.substitutions = 0

    @torch.no_grad()
    def substitute(self, model: nn.Module) -> None:
        for name in self.names:
            p = model.get_submodule(name).weight
            w, self.ranks[name] = truncated_svd(matrix_of(p), self.energy)
            p.copy_(w.reshape(p.shape))
        self.substitutions += 1

    def __call__(self, model: nn.Module, step: int) -> None:
        if step % self.period == 0:
            self.substitute(model)


class NuclearNorm:
    """``weight · Σ ||W_l||_*`` (TRP's regularizer; ``TrainConfig(regularizer=...)``)."""

    def __init__(self, names: list[str], weight: float) -> None:
        self.names, self.weight = list(names), float(weight)

    def __call__(self, model: nn.Module) -> torch.Tensor:
        return self.weight * sum(nuclear_norm(matrix_of(model.get_submodule(n).weight)) for n in self.names)


def nuclear_norm(w: torch.Tensor) -> torch.Tensor:
    """``||w||_*`` whose gradient is the subgradient ``U_r V_rᵀ`` (r: the non-zero singular values):
    ``Σ_i u_iᵀ W v_i`` with U, V held fixed."""
    u, s, a, transposed = left_singular(w)
    keep = s > 1e-9 * s[0].clamp_min(1e-300)
    u = u[:, keep]
    vh = (u.T @ a) / s[keep, None]
    return (_back(u @ vh, transposed, w) * w).sum()


@register_pass
@dataclass(frozen=True)
class RankTraining(TrainedCompression):
    """Low-rank training, then the SVD split: cat (Alvarez & Salzmann 2017) or trp (Xu et al. 2020).

    ``method=cat``: compression-aware training; ``method=trp``: Trained Rank Pruning (module docstring)."""

    name = "low-rank-train"

    method: str = "cat"
    tau: float = 1.0           # cat: nuclear-norm strength (soft-threshold lr * tau per step)
    group: float = 0.0         # cat: group-Lasso strength over output units (soft-threshold lr * group)
    tol: float = 1e-3          # cat: singular values above tol * s_max count toward the kept rank
    energy: float = 0.95       # trp: substitution energy; cat: cap on the kept rank (1.0: no cap)
    period: int = 20           # trp: optimizer steps between substitutions
    nuclear: float = 1e-4      # trp: nuclear-norm regularizer weight

    def validate(self) -> None:
        super().validate()
        self.check_choice("method", METHODS)
        self.check_range("tau", 0.0, None)
        self.check_range("group", 0.0, None)
        self.check_range("tol", 0.0, 1.0, hi_open=True)
        self.check_range("energy", 0.0, 1.0, lo_open=True)
        self.check_range("period", 1, None, integer=True)
        self.check_range("nuclear", 0.0, None)

    def chosen(self, graph: Graph, report: PassReport) -> dict[str, nn.Module]:
        out = {}
        for name, mod in graph.layers().items():
            if type(mod) not in (nn.Linear, nn.Conv2d) or not self.selects(name, report):
                continue
            why = LowRankSplit.refusal(mod)
            if why:
                report.skip(name, why)
            else:
                out[name] = mod
        return out

    def kept_rank(self, mod: nn.Module) -> int:
        s = torch.linalg.svdvals(matrix_of(mod.weight).detach().double())
        r = energy_rank(s, self.energy) if self.energy < 1.0 or self.method == "trp" else len(s)
        if self.method == "cat":
            r = min(r, max(1, numerical_rank(mod.weight, self.tol)))
        return r

    def run(self, graph: Graph, report: PassReport) -> Graph:
        from compiler.linear_forms import linear_forms

        linear_forms(graph)
        chosen = self.chosen(graph, report)
        if not chosen:
            return graph
        self.dataset()
        names = list(chosen)
        before = {n: numerical_rank(m.weight, 1e-6) for n, m in chosen.items()}
        if self.method == "cat":
            hooks = {"step_callback": ProximalNuclear(names, self.lr, self.tau, self.group)}
        else:
            substitution = RankSubstitution(names, self.energy, self.period)
            hooks = {"step_callback": substitution, "regularizer": NuclearNorm(names, self.nuclear)}
        if self.epochs:
            self.train(graph, report, **hooks)
        if self.method == "trp":
            substitution.substitute(graph.module)   # the split starts from a substituted (exactly low-rank) weight
        ranks = {n: self.kept_rank(graph.module.get_submodule(n)) for n in names}
        report.stats["ranks"] = ", ".join(f"{n}: {before[n]} -> {ranks[n]}" for n in names)
        split = LowRankSplit(method="svd", layers=tuple(names), overrides=tuple(f"{n}=rank:{r}" for n, r in ranks.items()))
        return split.run(graph, report)


def split_error(layer: nn.Module, chain: nn.Sequential, x: torch.Tensor) -> float:
    """Max |layer(x) − chain(x)| relative to max |layer(x)| (how exactly a split reproduces a layer)."""
    with torch.no_grad():
        ref, out = layer(x), chain(x)
    return float((ref - out).abs().max() / ref.abs().max().clamp_min(1e-30))

