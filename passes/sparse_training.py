"""Sparsity learned by training stochastic layers (pass ``sparsify-train``), deployed to the CSR layers.

* ``method=l0`` — L0 regularization (Louizos, Welling & Kingma, "Learning Sparse Neural Networks
  through L0 Regularization", ICLR 2018). Each weight θ gets a hard-concrete gate
  ``z = min(1, max(0, s (ζ − γ) + γ))``, ``s = sigmoid((log u − log(1 − u) + log α) / β)``,
  ``u ~ U(0, 1)`` (Eq. 9–10; β = 2/3, γ = −0.1, ζ = 1.1 as in the paper), the layer computes with
  θ ⊙ z, and the loss adds ``λ`` (``l0_lambda``) times the expected L0 norm
  ``Σ_j sigmoid(log α_j − β log(−γ / ζ))`` (Eq. 12). At test time the gate is deterministic,
  ``ẑ = min(1, max(0, sigmoid(log α) (ζ − γ) + γ))`` (Eq. 13): the weights with ẑ = 0 are pruned and
  the others stored as θ ⊙ ẑ.
* ``method=vd`` — sparse variational dropout (Molchanov, Ashukha & Vetrov, "Variational Dropout
  Sparsifies Deep Neural Networks", ICML 2017). Each weight has a mean θ and a log-variance
  log σ² (log α = log σ² − log θ²); training samples the layer's *outputs* with the local
  reparameterization trick (mean x θᵀ, variance x² σ²ᵀ), and the loss adds the KL divergence to the
  log-uniform prior, approximated as ``−KL ≈ k1 sigmoid(k2 + k3 log α) − ½ log(1 + 1/α) − k1``
  (Eq. 14; k1 = 0.63576, k2 = 1.87320, k3 = 1.48695), divided by the training-set size (the ELBO per
  example; ``kl_weight`` scales it). Weights with log α > ``threshold`` (the paper: 3) are pruned;
  the others are stored as θ.

Both train from the model's weights inside the pass; ``stage`` is always deploy: the result is
``SparseLinear`` / ``SparseConv2d`` (``squeezer::sparse_*``). Python: :func:`to_training_layer`,
:func:`penalty` for your own ``compiler.finetune.train`` loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compiler import PassReport, register_pass
from compiler.graph import Graph
from compiler.ops.sparse import SparseConv2d, SparseLinear

from .trained_compression import TrainedCompression

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1     # hard-concrete temperature and stretch (Louizos et al.)
K1, K2, K3 = 0.63576, 1.87320, 1.48695       # Molchanov et al.'s KL approximation


# ---- L0: hard-concrete gates --------------------------------------------------------------------------
def hard_concrete_sample(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw of the hard-concrete gates (Eq. 10)."""
    u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def prob_gate_zero(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z = 0) = Q(s̄ ≤ 0) = sigmoid(β log(−γ/ζ) − log α), the closed form of the hard concrete's mass at 0."""
    return torch.sigmoid(BETA * math.log(-GAMMA / ZETA) - log_alpha)


def expected_l0(log_alpha: torch.Tensor) -> torch.Tensor:
    """Σ P(z ≠ 0) = Σ sigmoid(log α − β log(−γ/ζ)) (Eq. 12)."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA)).sum()


def deterministic_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    """The test-time gate ẑ = min(1, max(0, sigmoid(log α)(ζ − γ) + γ)) (Eq. 13)."""
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


# ---- variational dropout ------------------------------------------------------------------------------
def vd_kl(log_alpha: torch.Tensor) -> torch.Tensor:
    """Molchanov et al.'s approximation of KL(q(w | θ, αθ²) ‖ log-uniform), elementwise."""
    return K1 - K1 * torch.sigmoid(K2 + K3 * log_alpha) + 0.5 * F.softplus(-log_alpha)


class _Stochastic:
    """What the L0 / VD training layers share: the weight they deploy and its keep-mask."""

    squeezer_leaf = True

    def _conv_or_linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if isinstance(self, nn.Conv2d):
            return self._conv_forward(x, w, None)
        return F.linear(x, w)

    def _with_bias(self, y: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return y
        return y + (self.bias.view(1, -1, 1, 1) if isinstance(self, nn.Conv2d) else self.bias)


class L0Mixin(_Stochastic):
    def _init_gates(self, droprate: float) -> None:
        init = math.log(1 - droprate) - math.log(droprate)   # the paper's code: log α ~ N(log((1-p)/p), 0.01²)
        self.log_alpha = nn.Parameter(init + 0.01 * torch.randn_like(self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = hard_concrete_sample(self.log_alpha) if self.training else deterministic_gate(self.log_alpha)
        return self._with_bias(self._conv_or_linear(x, self.weight * z))

    def penalty(self) -> torch.Tensor:
        return expected_l0(self.log_alpha)

    def deployed(self) -> tuple[torch.Tensor, torch.Tensor]:
        z = deterministic_gate(self.log_alpha.detach())
        return self.weight.detach() * z, z > 0


class VDMixin(_Stochastic):
    def _init_variance(self, log_sigma2: float) -> None:
        self.log_sigma2 = nn.Parameter(torch.full_like(self.weight, log_sigma2))

    @property
    def log_alpha(self) -> torch.Tensor:
        return (self.log_sigma2 - torch.log(self.weight ** 2 + 1e-8)).clamp(-10.0, 10.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            w, keep = self.deployed()
            return self._with_bias(self._conv_or_linear(x, w * keep))
        mean = self._conv_or_linear(x, self.weight)          # local reparameterization: sample the outputs
        var = self._conv_or_linear(x * x, self.log_sigma2.exp())
        return self._with_bias(mean + (var + 1e-8).sqrt() * torch.randn_like(mean))

    def penalty(self) -> torch.Tensor:
        return vd_kl(self.log_alpha).sum()

    def deployed(self) -> tuple[torch.Tensor, torch.Tensor]:
        keep = self.log_alpha.detach() <= self.threshold
        return self.weight.detach() * keep, keep


def _copy(cls, mod: nn.Module) -> nn.Module:
    if isinstance(mod, nn.Linear):
        new = cls(mod.in_features, mod.out_features, bias=mod.bias is not None)
    else:
        new = cls(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                  mod.groups, mod.bias is not None, mod.padding_mode)
    new.load_state_dict(mod.state_dict())
    return new


class L0Linear(L0Mixin, nn.Linear):
    pass


class L0Conv2d(L0Mixin, nn.Conv2d):
    pass


class VDLinear(VDMixin, nn.Linear):
    pass


class VDConv2d(VDMixin, nn.Conv2d):
    pass


def to_training_layer(mod: nn.Module, method: str, *, droprate: float = 0.1, log_sigma2: float = -10.0,
                      threshold: float = 3.0) -> nn.Module:
    """``mod`` (Linear / Conv2d) as an L0-gated or variational-dropout layer with its weights."""
    linear = isinstance(mod, nn.Linear)
    if method == "l0":
        new = _copy(L0Linear if linear else L0Conv2d, mod)
        new._init_gates(droprate)
    else:
        new = _copy(VDLinear if linear else VDConv2d, mod)
        new._init_variance(log_sigma2)
        new.threshold = threshold
    return new


def penalty(model: nn.Module, scale: float) -> torch.Tensor:
    """``scale`` × the sum of the model's L0 / KL penalties (a ``TrainConfig`` regularizer)."""
    terms = [m.penalty() for m in model.modules() if isinstance(m, _Stochastic)]
    return scale * torch.stack(terms).sum() if terms else torch.zeros(())


class Penalty:
    """``penalty`` with its scale, as a ``TrainConfig(regularizer=...)``; the gates' log α (L0) or
    the log σ² (VD) of ``model`` train at ``lr_scale`` × the learning rate (its ``param_groups``)."""

    def __init__(self, scale: float, model: nn.Module | None = None, lr_scale: float = 1.0) -> None:
        self.scale, self.model, self.lr_scale = scale, model, lr_scale

    def __call__(self, model: nn.Module) -> torch.Tensor:
        return penalty(model, self.scale)

    def param_groups(self, lr: float) -> list[dict]:
        if self.model is None or self.lr_scale == 1.0:
            return []
        own = [p for m in self.model.modules() if isinstance(m, _Stochastic)
               for p in (m.log_alpha if isinstance(m, L0Mixin) else m.log_sigma2,)]
        return [{"params": own, "lr": lr * self.lr_scale, "weight_decay": 0.0}]


def deploy(mod: nn.Module) -> nn.Module:
    """A trained L0 / VD layer as a CSR layer of its deployed weights (pruned ones not stored)."""
    w, keep = mod.deployed()
    if isinstance(mod, nn.Linear):
        return SparseLinear.from_dense(w, mod.bias, mask=keep)
    return SparseConv2d.from_dense(mod, mask=keep, weight=w)


@register_pass
@dataclass(frozen=True)
class TrainedSparsity(TrainedCompression):
    """Trained sparsity: L0 gates (Louizos et al. 2018) or variational dropout (Molchanov et al. 2017).

    Deployed to CSR layers."""

    name = "sparsify-train"
    reported = ("params", "stored_bytes", "macs")

    method: str = "l0"
    l0_lambda: float = 1e-4     # l0: λ, per expected non-zero gate, against the mean task loss
    droprate: float = 0.1       # l0: initial drop rate of the gates (log α = log((1 - p) / p))
    kl_weight: float = 1.0      # vd: scale of the KL term (1: the ELBO, KL / training-set size)
    log_sigma2: float = -10.0   # vd: initial log σ²
    threshold: float = 3.0      # vd: weights with log α above this are pruned
    gate_lr: float = 30.0       # learning rate of log α (l0) / log σ² (vd) as a multiple of lr (short runs)

    def validate(self) -> None:
        super().validate()
        self.check_choice("method", ("l0", "vd"))
        self.check_range("l0_lambda", 0.0, None)
        self.check_range("droprate", 0.0, 1.0, lo_open=True, hi_open=True)
        self.check_range("kl_weight", 0.0, None)
        self.check_range("log_sigma2", None, 0.0)
        self.check_range("threshold", None, None)
        self.check_range("gate_lr", 0.0, None, lo_open=True)

    def regularizer(self, model: nn.Module | None = None) -> Penalty:
        scale = self.l0_lambda if self.method == "l0" else self.kl_weight / len(self.dataset())
        return Penalty(scale, model, self.gate_lr)

    def run(self, graph: Graph, report: PassReport) -> Graph:
        chosen = self.targets(graph, report)
        if not chosen:
            return graph
        for name, mod in chosen.items():
            graph.module.set_submodule(name, to_training_layer(mod, self.method, droprate=self.droprate,
                                                               log_sigma2=self.log_sigma2, threshold=self.threshold))
        self.train(graph, report, regularizer=self.regularizer(graph.module))
        kept = total = 0
        for name in chosen:
            layer = graph.module.get_submodule(name)
            new = deploy(layer)
            graph.module.set_submodule(name, new)
            kept, total = kept + new.nnz, total + layer.weight.numel()
            report.change(f"{name}: {type(chosen[name]).__name__} -> {type(new).__name__} "
                          f"({1 - new.density:.1%} pruned by {self.method})")
        report.stats["sparsity"] = 1 - kept / max(total, 1)
        return graph
