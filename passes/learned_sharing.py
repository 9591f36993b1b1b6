"""Weight sharing learned during training (pass ``cluster-train``), deployed to the LUT layers.

* ``method=soft`` — soft weight-sharing (Ullrich, Meeds & Welling, "Soft Weight-Sharing for Neural
  Network Compression", ICLR 2017). A factorized Gaussian-mixture prior over the weights,
  ``p(w) = Π_i Σ_j π_j N(w_i | μ_j, σ_j²)``, with component 0 fixed at ``μ_0 = 0`` and a fixed high
  mixing weight ``π_0`` (``pi_zero``), is trained jointly with the weights: the loss is the task
  loss plus ``τ`` (``tau``) times the prior's negative log-likelihood of the weights (Eq. 2–4 of the
  paper, empirical Bayes: means, log-precisions and mixing proportions of the other components are
  learned). As in the paper's experiments, Gamma hyperpriors on the precisions keep components from
  collapsing (``(α, β) = (5000, 2)`` for the zero component, ``(250, 0.1)`` for the others, as in the
  authors' tutorial, with its learning-rate ratios for means (×0.2), log-precisions and mixing
  logits (×6)); the means start evenly spaced over the weights' range, the precisions at their
  hyperpriors' modes (the tutorial starts at σ = 0.25 and trains for many epochs). After training every weight
  is set to the mean of its most responsible component (argmax_j of π_j N(w | μ_j, σ_j²)): the
  layer becomes a LUT layer whose codebook is (0, μ_1, …, μ_{J-1}), ``J = 2**bits``; a layer with at
  least ``sparse_above`` of its weights in the zero component is stored sparse + clustered (CSR of
  the others, each an index into the non-zero means).

* ``method=vnq`` — Variational Network Quantization (Achterhold et al., ICLR 2018): Gaussian
  weight posteriors under a ternary quantizing prior (−a, 0, a), the paper's KL approximation, then
  each weight set to its nearest codebook value (large-α weights to 0); see :mod:`passes.vnq`.

Python: :class:`GaussianMixturePrior` is the regularizer (``TrainConfig(regularizer=prior)``; it
brings its own parameter groups, which ``compiler.finetune.train`` adds to its optimizer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from compiler import PassReport, register_pass
from compiler.graph import Graph

from . import vnq
from .trained_compression import TrainedCompression, deploy_codebook

GAMMA_ZERO = (5000.0, 2.0)    # Gamma(α, β) hyperprior on the zero component's precision
GAMMA_OTHERS = (250.0, 0.1)   # ... and on the other components' precisions
LR_SCALES = {"means": 0.2, "log_precision": 6.0, "mixing_logits": 6.0}   # relative to the weights' lr


class GaussianMixturePrior(nn.Module):
    """Soft weight-sharing's prior over the weights of the layers ``names`` of a model: ``J``
    components, component 0 at mean 0 with mixing weight ``pi_zero`` fixed; called on the model it
    returns ``tau * (NLL of the weights + hyperprior NLL)``."""

    def __init__(self, model: nn.Module, names: list[str], components: int = 16, *, pi_zero: float = 0.99,
                 tau: float = 2e-5) -> None:
        super().__init__()
        if components < 2:
            raise ValueError(f"GaussianMixturePrior: components must be >= 2, got {components}")
        if not 0.0 < pi_zero < 1.0:
            raise ValueError(f"GaussianMixturePrior: pi_zero must lie in (0, 1), got {pi_zero}")
        self.names, self.pi_zero, self.tau = list(names), float(pi_zero), float(tau)
        w = self.weights(model).detach()
        self.means = nn.Parameter(torch.linspace(float(w.min()), float(w.max()), components - 1))
        # precisions start at the Gamma hyperpriors' modes (α - 1) / β (σ ≈ 0.02), where a long run would take them
        modes = torch.full((components,), (GAMMA_OTHERS[0] - 1) / GAMMA_OTHERS[1])
        modes[0] = (GAMMA_ZERO[0] - 1) / GAMMA_ZERO[1]
        self.log_precision = nn.Parameter(modes.log())
        self.mixing_logits = nn.Parameter(torch.zeros(components - 1))

    def weights(self, model: nn.Module) -> torch.Tensor:
        return torch.cat([model.get_submodule(n).weight.reshape(-1) for n in self.names])

    def mixture(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(means with μ_0 = 0, precisions, mixing proportions with π_0 fixed), each (J,)."""
        means = torch.cat([self.means.new_zeros(1), self.means])
        rest = (1.0 - self.pi_zero) * torch.softmax(self.mixing_logits, 0)
        return means, self.log_precision.exp(), torch.cat([rest.new_full((1,), self.pi_zero), rest])

    def log_joint(self, w: torch.Tensor) -> torch.Tensor:
        """(n, J): log π_j + log N(w_i | μ_j, 1/λ_j)."""
        means, precision, pi = self.mixture()
        return (pi.log() + 0.5 * (self.log_precision - math.log(2 * math.pi))
                - 0.5 * precision * (w.unsqueeze(1) - means) ** 2)

    def nll(self, w: torch.Tensor) -> torch.Tensor:
        """−Σ_i log p(w_i): the prior's negative log-likelihood of the weights."""
        return -torch.logsumexp(self.log_joint(w.reshape(-1)), 1).sum()

    def hyperprior_nll(self) -> torch.Tensor:
        """−log Gamma(λ_j | α, β) of the precisions (up to constants)."""
        lam, g = self.log_precision.exp(), self.log_precision
        (a0, b0), (a, b) = GAMMA_ZERO, GAMMA_OTHERS
        return ((1 - a0) * g[0] + b0 * lam[0]) + ((1 - a) * g[1:] + b * lam[1:]).sum()

    def responsibilities(self, w: torch.Tensor) -> torch.Tensor:
        """(n, J): the posterior probability of each component for each weight."""
        return torch.softmax(self.log_joint(w.reshape(-1)), 1)

    def forward(self, model: nn.Module) -> torch.Tensor:
        return self.tau * (self.nll(self.weights(model)) + self.hyperprior_nll())

    def param_groups(self, lr: float) -> list[dict]:
        """The prior's own Adam groups (added by ``compiler.finetune.train``)."""
        return [{"params": [getattr(self, k)], "lr": lr * s, "weight_decay": 0.0} for k, s in LR_SCALES.items()]

    @torch.no_grad()
    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index of the most responsible component of each weight (shaped like ``w``), means (J,))."""
        idx = self.log_joint(w.reshape(-1).float()).argmax(1).reshape(w.shape)
        return idx, self.mixture()[0].detach().clone()


# vnq: passes/vnq.py; Deep k-Means (Wu et al. 2018) is its own pass: deep-kmeans (passes/deep_kmeans.py)
METHODS = ("soft", "vnq")


@register_pass
@dataclass(frozen=True)
class TrainedClustering(TrainedCompression):
    """Trained weight sharing: soft weight-sharing (Ullrich et al. 2017) or VNQ (Achterhold et al. 2018).

    Deployed to LUT (or sparse + clustered) layers."""

    name = "cluster-train"

    method: str = "soft"
    bits: int = 4                # LUT index bits: soft: J = 2**bits components (zero included)
    tau: float = 2e-5            # soft: prior NLL (summed over weights) vs the mean task loss (5e-3 zeroed LeNet-5)
    pi_zero: float = 0.99        # soft: the zero component's fixed mixing proportion
    sparse_above: float = 0.5    # soft, vnq: layers with at least this share of zero-component weights are stored CSR
    log_sigma2: float = -8.0     # vnq: initial log σ² of the weight posteriors (the paper: -8)
    threshold: float = 3.0       # vnq: weights with log α = log σ² - log θ² >= this are pruned (log T_α)
    kl_weight: float = 1.0       # vnq: scale of the KL term (1: the ELBO, KL / training-set size)
    warmup: int = 0              # vnq: epochs over which the KL's factor ramps linearly from 0 to 1
    learn_scale: bool = True     # vnq: learn each layer's ternary level a (false: fixed at its start)
    scale_lr: float = 0.01       # vnq: learning rate of a as a multiple of lr (the paper: 1/100)

    def validate(self) -> None:
        super().validate()
        self.check_choice("method", METHODS)
        self.check_range("bits", 1, 8, integer=True)
        self.check_range("tau", 0.0, None)
        self.check_range("pi_zero", 0.0, 1.0, lo_open=True, hi_open=True)
        self.check_range("sparse_above", 0.0, 1.0)
        if self.method == "soft" and self.bits < 2:
            self._fail("bits", self.bits, "at least 2 with method=soft (the zero component and another)")
        vnq.check_options(self)

    def prior(self, graph: Graph, names: list[str]) -> GaussianMixturePrior:
        """Soft weight-sharing's prior over ``names`` of ``graph.module`` (``TrainConfig(regularizer=...)``)."""
        return GaussianMixturePrior(graph.module, names, 2 ** self.bits, pi_zero=self.pi_zero, tau=self.tau)

    def run(self, graph: Graph, report: PassReport) -> Graph:
        if self.method == "vnq":
            return vnq.run(self, graph, report)
        chosen = self.targets(graph, report)
        if not chosen:
            return graph
        prior = self.prior(graph, list(chosen))
        with torch.no_grad():
            before = float(prior.nll(prior.weights(graph.module)))
        self.train(graph, report, regularizer=prior)
        with torch.no_grad():
            report.stats["prior_nll"] = f"{before:.4g} -> {float(prior.nll(prior.weights(graph.module))):.4g}"
        zeros = total = 0
        for name, mod in chosen.items():
            idx, means = prior.quantize(mod.weight.detach())
            share = float((idx == 0).float().mean())
            new = deploy_codebook(mod, idx, means, zero_index=0, sparse=share >= self.sparse_above)
            graph.module.set_submodule(name, new)
            zeros, total = zeros + int((idx == 0).sum()), total + idx.numel()
            report.change(f"{name}: {type(mod).__name__} -> {type(new).__name__} ({len(means)} components, "
                          f"{share:.1%} of the weights in the zero component)")
        report.stats["zero_component_share"] = zeros / max(total, 1)
        return graph
