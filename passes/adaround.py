"""AdaRound: each weight rounded up or down as the layer's output needs, not to nearest.

Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization" (ICML 2020):
rounding every weight to its nearest grid point minimizes the weight error, not the layer's
output error, which is what the network feels. AdaRound keeps, per weight, a continuous variable
``V`` whose rectified sigmoid ``h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1)`` picks between ``floor`` and
``floor + 1``, and minimizes, on calibration inputs,

    ‖W x − W̃ x̃‖² + λ Σ (1 − |2 h(V) − 1|^β),   W̃ = s · clip(floor(W / s) + h(V))

(``x̃`` the layer's quantized input: the asymmetric form of the paper's §4, which also absorbs the
activation quantization), with β annealed from 20 to 2 after a warm-up so that every ``h`` ends at
0 or 1. The chosen weights are written back on the grid (``s · (floor + h)``), so the layer's own
nearest rounding then reproduces them: deploy, QAT and the compiled kernels need nothing new."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ZETA, GAMMA = 1.1, -0.1
WARMUP = 0.2            # the first fifth: reconstruction only
BETA = (20.0, 2.0)
SAMPLE_ELEMENTS = 1 << 22   # inputs kept per layer (elements): whole samples, at least one


def _soft(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _forward(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, layer.bias)
    return F.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def _rows(y: torch.Tensor) -> torch.Tensor:
    """Outputs as (samples, features): the squared error summed per sample."""
    return y.reshape(y.shape[0], -1)


def reconstruction_error(layer: nn.Module, inputs: torch.Tensor, weight: torch.Tensor) -> float:
    """Mean over samples of ‖W x − W̃ x̃‖² for the grid weights ``weight``."""
    with torch.no_grad():
        return _error(layer, layer.quant_input(inputs), _forward(layer, inputs, layer.weight), weight)


def _error(layer: nn.Module, x_q: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> float:
    return float((_rows(_forward(layer, x_q, weight) - target) ** 2).sum(1).mean())


def nearest_weight(layer: nn.Module) -> torch.Tensor:
    top = 2 ** (layer.w_bits - 1) - 1
    step = layer.weight_step().detach()
    return torch.round(layer.weight.detach() / step).clamp(-top, top) * step


def adaround(layer: nn.Module, inputs: torch.Tensor, iters: int = 500, lam: float = 0.01, lr: float = 1e-2,
             batch: int = 32, seed: int = 0) -> tuple[float, float]:
    """Round ``layer``'s weights (a calibrated fake-quantized Conv2d/Linear) by AdaRound on
    ``inputs`` (its float inputs, samples first); its weight is set to the chosen grid points.
    Returns the reconstruction error of nearest rounding and of AdaRound's, on ``inputs``."""
    top = 2 ** (layer.w_bits - 1) - 1
    step = layer.weight_step().detach()
    scaled = layer.weight.detach() / step
    floor = torch.floor(scaled)
    rest = (scaled - floor).clamp(1e-4, 1 - 1e-4)
    v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))   # h(v) = rest: start at W
    with torch.no_grad():
        target = _forward(layer, inputs, layer.weight)
        x_q = layer.quant_input(inputs)
        before = _error(layer, x_q, target, nearest_weight(layer))
    with torch.enable_grad():
        _optimize(layer, v, floor, step, top, x_q, target, iters, lam, lr, batch, seed)
    with torch.no_grad():
        chosen = (floor + (v >= 0).to(floor.dtype)).clamp(-top, top) * step
        after = _error(layer, x_q, target, chosen)
        if after <= before:   # the paper's objective met; else nearest (a layer AdaRound did not help)
            layer.weight.copy_(chosen)
        else:
            layer.weight.copy_(nearest_weight(layer))
            after = before
    return before, after


def _optimize(layer, v, floor, step, top, x_q, target, iters, lam, lr, batch, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([v], lr=lr)
    warm = int(iters * WARMUP)
    for t in range(iters):
        pick = torch.randperm(x_q.shape[0], generator=gen)[:batch]
        h = _soft(v)
        w = (floor + h).clamp(-top, top) * step
        loss = (_rows(_forward(layer, x_q[pick], w) - target[pick]) ** 2).sum(1).mean()
        if t >= warm:
            beta = BETA[1] + (BETA[0] - BETA[1]) * (1 - (t - warm) / max(1, iters - warm))
            loss = loss + lam * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


class InputRecorder:
    """Forward pre-hooks keeping each layer's inputs (whole samples, up to ``SAMPLE_ELEMENTS``)."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.inputs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in layers.items()]

    def _hook(self, name: str):
        def hook(_module, args):
            x = args[0].detach()
            kept = sum(t.numel() for t in self.inputs[name])
            per_sample = max(1, x[0].numel())
            room = max(0, SAMPLE_ELEMENTS - kept) // per_sample
            if room or not self.inputs[name]:
                self.inputs[name].append(x[:max(1, room)].clone())
        return hook

    def batch(self, name: str) -> torch.Tensor:
        return torch.cat(self.inputs[name])

    def close(self) -> None:
        for h in self.handles:
            h.remove()
