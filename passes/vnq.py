"""Variational Network Quantization (pass ``cluster-train:method=vnq``), deployed to ternary LUT / CSR layers.

Achterhold, Köhler, Schmeink & Genewein, "Variational Network Quantization", ICLR 2018
(https://openreview.net/forum?id=ry-TW-WAb). What is implemented, by the paper's equations:

* Posterior: each weight of a chosen layer is ``N(θ, σ²)`` (mean θ — the pre-trained weight — and a
  learned ``log σ²``, starting at ``log_sigma2``, the paper: −8), Molchanov's additive-noise
  parameterization (Eq. 8). Training samples the layer's *outputs* with the local reparameterization
  trick (Kingma et al. 2015; the paper's App. A.2): ``y = x θᵀ + b + sqrt(x² σ²ᵀ) ε``, ε ~ N(0, 1).
* Prior: the quantizing prior ``p(w) ∝ Σ_k p_k / |w − c_k|`` (Eq. 12), log-uniform spikes at a
  ternary codebook ``c = (−a, 0, a)`` with ``p_k = 1/3``; ``a`` is one learned scale per layer
  (``learn_scale``; trained at ``scale_lr`` × lr, the paper: 100× lower), kept positive as ``exp(log a)``.
  The paper does not say where ``a`` starts: we start it at the ternary fit of Ternary Weight
  Networks (Li et al. 2016), the mean |θ| of the weights with |θ| > 0.7 · mean |θ|.
* KL: the paper's approximation (Eq. 16–17), built from Molchanov et al.'s approximation (Eq. 7)
  ``F_LU(d, σ) = k1 − k1 S(k2 + k3 log α) + ½ log(1 + 1/α)``, ``log α = log σ² − log d²``
  (k1 = 0.63576, k2 = 1.87320, k3 = 1.48695; ``passes.sparse_training.vd_kl``; written as the KL
  itself, i.e. minus the paper's Eq. 7, with the constant chosen so that it → 0 as α → ∞):

      F_KL(θ, σ, c) = Σ_{k: c_k ≠ 0} Ω(θ − c_k) F_LU(θ − c_k, σ)  +  Ω_0(θ) F_LU(θ, σ),
      Ω(d) = exp(−d² / (2 τ²)),   Ω_0(θ) = 1 − Σ_{k: c_k ≠ 0} Ω(θ − c_k),

  with τ = 0.075 for the reference codebook r = 0.2. A codebook ``(−a, 0, a)`` uses the paper's
  rescaling ``F_KL(θ/s, σ/s, c_r)``, ``s = a/r`` (Sec. 3.3, App. A.4): ``log α`` is unchanged by the
  common scale, so this is exactly the formula above with ``c = (−a, 0, a)`` and ``τ = 0.075 · a / 0.2``.
  The loss is the per-example negative ELBO: the mean task loss + ``β`` · ``kl_weight`` · Σ F_KL /
  (training-set size), ``β`` ramping linearly from 0 to 1 over the first ``warmup`` epochs (the
  paper's warm-up; 0: no warm-up).
* Clipping (Sec. 4): after every step ``log σ² ∈ [−10, 1]`` and θ is clipped to
  ``[−a − e^{−3/2} σ, a + e^{−3/2} σ]`` (outside the outer funnels: a shifted log α of 3).
* Post-training quantization (Sec. 3.2, Sec. 4): weights with ``log α = log σ² − log θ² ≥ threshold``
  (log T_α, the paper: 3) are set to 0, every other weight to its nearest codebook value
  (argmin_k (c_k − θ)², the MAP assignment of Eq. 15) — no fine-tuning. Each layer becomes a 2-bit
  LUT layer with codebook (0, −a, a), or, where at least ``sparse_above`` of its weights are 0, a
  CSR + codebook layer (``passes.trained_compression.deploy_codebook``).

Differences from the paper, and approximations: its learning rate decays linearly to 0 over 195
epochs; here the constant ``lr`` of the pass's short run. Its Sec. 4 also clips the learned level
``a`` (to ≤ 0.05 for its LeNet-5); here ``a`` is only kept positive. The mixing weights p_k of
Eq. 12 do not enter Eq. 16 (the paper's approximation has none). ``log d²`` is computed as
``log(d² + 1e-8)`` so that the KL stays finite at a centre. The KL is the paper's approximation, not
the exact (intractable) KL: the paper reports a maximum absolute deviation of 1.07 nats from a Monte
Carlo estimate over its relevant range.

Python: :func:`vnq_kl` (the KL approximation for any codebook), :func:`to_vnq_layer`,
:class:`VNQObjective` (a ``TrainConfig`` regularizer + step callback) for your own training loop.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from compiler import PassReport
from compiler.graph import Graph

from .sparse_training import _copy, _Stochastic, vd_kl
from .trained_compression import deploy_codebook

R_REF, TAU_REF = 0.2, 0.075             # the reference codebook (−r, 0, r) and its window width τ (Sec. 3.3)
LOG_SIGMA2_RANGE = (-10.0, 1.0)         # the paper's clipping of log σ²
FUNNEL = math.exp(-1.5)                 # |θ − c| = e^{−3/2} σ  <=>  log σ² − log (θ − c)² = 3
EPS = 1e-8


def kl_lu(d: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """Molchanov et al.'s KL approximation for a log-uniform prior centred ``d`` away from the mean
    (log α = log σ² − log d²), elementwise; → 0 as α → ∞."""
    return vd_kl(log_sigma2 - torch.log(d * d + EPS))


def vnq_kl(theta: torch.Tensor, log_sigma2: torch.Tensor, codebook: torch.Tensor, tau: float | torch.Tensor
           ) -> torch.Tensor:
    """The paper's Eq. 16, elementwise over ``theta``: shifted :func:`kl_lu` terms at the non-zero
    ``codebook`` values windowed by Ω (width ``tau``), plus the zero-centred term windowed by
    Ω_0 = 1 − Σ Ω. A codebook (0,) gives Molchanov et al.'s approximation itself."""
    centres = codebook.reshape(-1)
    centres = centres[centres != 0]
    d = theta.unsqueeze(-1) - centres
    omega = torch.exp(-0.5 * (d / tau) ** 2)
    local = (omega * kl_lu(d, log_sigma2.unsqueeze(-1))).sum(-1)
    return local + (1.0 - omega.sum(-1)) * kl_lu(theta, log_sigma2)


def ternary_fit(w: torch.Tensor) -> float:
    """Ternary Weight Networks' scale (Li et al. 2016): mean |w| over |w| > 0.7 mean |w| (a's start)."""
    mag = w.detach().abs().reshape(-1)
    big = mag[mag > 0.7 * mag.mean()]
    return float(big.mean()) if len(big) else max(float(mag.mean()), 1e-3)


class VNQMixin(_Stochastic):
    """A Linear / Conv2d whose weights are N(θ, σ²) under a ternary quantizing prior (−a, 0, a)."""

    def _init_vnq(self, log_sigma2: float, scale: float) -> None:
        self.log_sigma2 = nn.Parameter(torch.full_like(self.weight, log_sigma2))
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale), dtype=self.weight.dtype))

    def codebook(self) -> torch.Tensor:
        """(0, −a, a): index 0 is the zero the pruned weights take."""
        a = self.log_scale.exp()
        return torch.stack([torch.zeros_like(a), -a, a])

    def clamped_log_sigma2(self) -> torch.Tensor:
        return self.log_sigma2.clamp(*LOG_SIGMA2_RANGE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:   # the posterior means ("VNQ, no P&Q" in the paper's tables)
            return self._with_bias(self._conv_or_linear(x, self.weight))
        mean = self._conv_or_linear(x, self.weight)          # local reparameterization: sample the outputs
        var = self._conv_or_linear(x * x, self.clamped_log_sigma2().exp())
        return self._with_bias(mean + (var + 1e-12).sqrt() * torch.randn_like(mean))

    def penalty(self) -> torch.Tensor:
        """Σ F_KL over the layer's weights (Eq. 16, the codebook's rescaled window τ·a/r)."""
        a = self.log_scale.exp()
        return vnq_kl(self.weight, self.clamped_log_sigma2(), self.codebook(), TAU_REF / R_REF * a).sum()

    @torch.no_grad()
    def clip_(self) -> None:
        """The paper's clipping: log σ² into [−10, 1], θ inside the outer funnels ±(a + e^{−3/2} σ)."""
        self.log_sigma2.clamp_(*LOG_SIGMA2_RANGE)
        edge = self.log_scale.exp() + FUNNEL * (0.5 * self.log_sigma2).exp()
        self.weight.copy_(torch.minimum(torch.maximum(self.weight, -edge), edge))

    @torch.no_grad()
    def quantize(self, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(codebook index of every weight, codebook (0, −a, a)): log α ≥ ``threshold`` -> 0, else the
        nearest codebook value (Eq. 15)."""
        theta, cb = self.weight.detach(), self.codebook().detach()
        idx = (theta.unsqueeze(-1) - cb).abs().argmin(-1)
        log_alpha = self.clamped_log_sigma2() - torch.log(theta * theta + EPS)
        return idx.masked_fill(log_alpha >= threshold, 0), cb.clone()

    def quantization_error(self, threshold: float) -> tuple[float, float]:
        """(Σ (θ − q(θ))², Σ θ²) of the layer's weights and their quantized values."""
        idx, cb = self.quantize(threshold)
        theta = self.weight.detach()
        return float(((theta - cb[idx]) ** 2).sum()), float((theta ** 2).sum())


class VNQLinear(VNQMixin, nn.Linear):
    pass


class VNQConv2d(VNQMixin, nn.Conv2d):
    pass


def to_vnq_layer(mod: nn.Module, *, log_sigma2: float = -8.0, scale: float | None = None) -> nn.Module:
    """``mod`` (Linear / Conv2d) as a VNQ layer: θ = its weights, log σ² = ``log_sigma2``, the
    ternary scale ``a`` = ``scale`` (default: :func:`ternary_fit` of the weights)."""
    new = _copy(VNQLinear if isinstance(mod, nn.Linear) else VNQConv2d, mod)
    new._init_vnq(log_sigma2, ternary_fit(mod.weight) if scale is None else scale)
    return new


class VNQObjective:
    """The KL part of the negative ELBO as a ``TrainConfig`` regularizer (``kl_weight`` · β · Σ F_KL /
    ``n_train``, β the linear warm-up over ``warmup_steps``), its :meth:`after_step` the step callback
    (β's clock and the paper's clipping), its :meth:`param_groups` the scales' learning rate."""

    def __init__(self, layers: list[VNQMixin], n_train: int, *, kl_weight: float = 1.0, warmup_steps: int = 0,
                 learn_scale: bool = True, scale_lr: float = 0.01) -> None:
        self.layers, self.n_train, self.kl_weight = list(layers), int(n_train), float(kl_weight)
        self.warmup_steps, self.scale_lr, self.step = int(warmup_steps), float(scale_lr), 0
        for layer in self.layers:
            layer.log_scale.requires_grad_(learn_scale)

    def beta(self) -> float:
        return min(1.0, self.step / self.warmup_steps) if self.warmup_steps else 1.0

    def kl(self) -> torch.Tensor:
        return torch.stack([layer.penalty() for layer in self.layers]).sum()

    def __call__(self, model: nn.Module) -> torch.Tensor:
        return self.kl_weight * self.beta() / self.n_train * self.kl()

    def after_step(self, model: nn.Module, step: int) -> None:
        self.step = step
        for layer in self.layers:
            layer.clip_()

    def param_groups(self, lr: float) -> list[dict]:
        scales = [layer.log_scale for layer in self.layers if layer.log_scale.requires_grad]
        return [{"params": scales, "lr": lr * self.scale_lr, "weight_decay": 0.0}] if scales else []

    def quantization_error(self, threshold: float) -> float:
        """Σ (θ − q(θ))² / Σ θ² over the layers (q: the post-training quantization)."""
        err, norm = map(sum, zip(*(layer.quantization_error(threshold) for layer in self.layers)))
        return err / max(norm, 1e-30)


def check_options(p: Any) -> None:
    """The vnq options of the ``TrainedClustering`` pass ``p`` (an ``OptionError`` naming the option)."""
    p.check_range("log_sigma2", *LOG_SIGMA2_RANGE)
    p.check_range("threshold", None, None)
    p.check_range("kl_weight", 0.0, None)
    p.check_range("warmup", 0, None, integer=True)
    p.check_range("scale_lr", 0.0, None, lo_open=True)
    if not isinstance(p.learn_scale, bool):
        p._fail("learn_scale", p.learn_scale, "true or false")
    if p.method == "vnq" and p.bits not in (2, 4):
        p._fail("bits", p.bits, "2 with method=vnq (ternary: 2-bit indices; leave bits out or give bits=2)")


def run(p: Any, graph: Graph, report: PassReport) -> Graph:
    """``cluster-train:method=vnq`` on ``graph`` (``p``: the ``TrainedClustering`` pass)."""
    chosen = p.targets(graph, report)
    if not chosen:
        return graph
    layers = {}
    for name, mod in chosen.items():
        layers[name] = to_vnq_layer(mod, log_sigma2=p.log_sigma2)
        graph.module.set_submodule(name, layers[name])
    objective = VNQObjective(list(layers.values()), len(p.dataset()), kl_weight=p.kl_weight,
                             warmup_steps=p.warmup * p.steps_per_epoch(), learn_scale=p.learn_scale,
                             scale_lr=p.scale_lr)
    with torch.no_grad():
        kl_before, err_before = float(objective.kl()), objective.quantization_error(p.threshold)
    p.train(graph, report, regularizer=objective, step_callback=objective.after_step)
    with torch.no_grad():
        report.stats["kl"] = f"{kl_before:.4g} -> {float(objective.kl()):.4g}"
    report.stats["quantization_error"] = f"{err_before:.4f} -> {objective.quantization_error(p.threshold):.4f}"
    zeros = total = 0
    scales = {}
    for name, layer in layers.items():
        idx, codebook = layer.quantize(p.threshold)
        share = float((idx == 0).float().mean())
        new = deploy_codebook(layer, idx, codebook, zero_index=0, sparse=share >= p.sparse_above)
        graph.module.set_submodule(name, new)
        zeros, total = zeros + int((idx == 0).sum()), total + idx.numel()
        scales[name] = round(float(codebook[2]), 5)
        report.change(f"{name}: {type(chosen[name]).__name__} -> {type(new).__name__} (ternary ±{scales[name]:.4g}, "
                      f"{share:.1%} of the weights 0)")
    report.stats["sparsity"] = zeros / max(total, 1)
    report.stats["scales"] = scales
    return graph
