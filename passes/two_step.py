"""Two-Step Quantization (Wang, Hu, Zhang, Zhang, Liu & Cheng, "Two-Step Quantization for Low-bit
Neural Networks", CVPR 2018): learn the low-bit activation codes first, then the low-bit weights
that map the codes of one layer to the next.

* Step 1, code learning (``step=codes``): each chosen layer's input is sparse-quantized,
  weights stay full precision, and the network is trained (``compiler.finetune``). The sparse
  quantizer sets the small activations to zero and quantizes the rest uniformly above the
  threshold eps: ``Q(x) = 0`` for ``x < eps``, else ``eps + (c - 1/2) Delta`` with
  ``c = min(floor((x - eps) / Delta) + 1, 2^a_bits - 1)``. eps is the ``sparsity`` quantile of
  the layer's positive inputs on the ``calibration`` batches, Delta the step minimizing the
  quantization error of the inputs above eps (a search over candidate steps). The gradient passes
  straight through on ``[0, eps + (2^a_bits - 1) Delta]``.
* Step 2, transformation learning (``step=weights``): with the codes fixed, each layer's low-bit
  weights (``w_bits``: integer codes in ``[-L, L]``, ``L = 2^(w_bits-1) - 1``; 2 = ternary) and
  per-output scale solve the layer-wise problem ``min_{alpha, w} ||z - alpha X~ w||^2`` on the
  quantized inputs ``X~``, ``z = X~ W^T`` the full-precision layer's outputs (the paper's
  non-linear least squares with its quantizer relaxed to this inner problem), by the paper's
  iteration: the closed-form ``alpha = <z, X~ w> / ||X~ w||^2`` and the codes one element at a
  time, each the best integer in ``[-L, L]`` given the others (:func:`tsq_solve`), from plain
  rounding of the weights. Only ``G = X~^T X~`` is needed. The network is then fine-tuned with
  those weights (straight-through rounding, alpha learned).
* ``step=deploy`` (default; from plain layers it runs both steps on the calibration batches, no
  training): the layer's quantized input ``Delta c + (eps - Delta/2) [x >= eps]`` is linear in the
  codes ``c`` and the mask, so the layer is the sum of two bit-serial layers on the same input
  (compiler/ops/bitserial.py): one with ``a_bits`` unsigned activation planes on ``x / (n Delta) +
  1/(2n) - eps / (n Delta)`` (its codes are c) and one with a 1-bit plane on ``x + 1/2 - eps`` (the
  mask), both with the weight codes as two's-complement bit-planes and alpha folded into their
  per-output scales: AND-popcount kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from compiler import Pass, PassReport, register_pass
from compiler.errors import OptionError, PassError
from compiler.graph import Graph, first_line, inference_mode
from compiler.ops.bitserial import BitConv2d, BitLinear

from .adaround import InputRecorder
from .sketching import _inline_sum

STEPS = ("codes", "weights", "deploy")


# ---- the sparse activation quantizer -------------------------------------------------------------------
def sparse_quantize(x: torch.Tensor, eps: float, delta: float, a_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes c, mask [x >= eps]) as the deployed layers compute them: c from the unsigned a_bits-bit
    quantizer on ``x / (n Delta) + 1/(2n) - eps / (n Delta)``, the mask from the 1-bit one on
    ``x + 1/2 - eps`` (round half up, float32)."""
    n = 2 ** a_bits - 1
    scale, shift = in_transform(eps, delta, a_bits)
    codes = torch.floor((x * scale + shift).clamp(0, 1) * n + 0.5)
    mask = torch.floor((x + (0.5 - eps)).clamp(0, 1) + 0.5)
    return codes, mask


def in_transform(eps: float, delta: float, a_bits: int) -> tuple[float, float]:
    n = 2 ** a_bits - 1
    return 1.0 / (n * delta), 0.5 / n - eps / (n * delta)


def sparse_values(x: torch.Tensor, eps: float, delta: float, a_bits: int) -> torch.Tensor:
    """The sparse-quantized activation ``Delta c + (eps - Delta/2) [x >= eps]``."""
    codes, mask = sparse_quantize(x.detach(), eps, delta, a_bits)
    return delta * codes + (eps - delta / 2) * mask


def calibrate_sparse(x: torch.Tensor, sparsity: float, a_bits: int, candidates: int = 64) -> tuple[float, float]:
    """(eps, Delta): eps the ``sparsity`` quantile of the positive inputs, Delta the step (among
    ``candidates``) minimizing the squared quantization error of the inputs at or above eps."""
    pos = x.detach().float().reshape(-1)
    pos = pos[pos > 0]
    if pos.numel() == 0:
        raise PassError("two-step-quantization: a layer's calibration inputs have no positive value (the sparse "
                        "quantizer keeps positive activations only)")
    if pos.numel() > 200_000:
        pos = pos[torch.randperm(pos.numel(), generator=torch.Generator().manual_seed(0))[:200_000]]
    eps = float(torch.quantile(pos, sparsity)) if sparsity > 0 else 0.0
    kept = pos[pos >= eps]
    n = 2 ** a_bits - 1
    span = max(float(kept.max()) - eps, 1e-8)
    best = None
    for f in torch.linspace(0.05, 1.2, candidates).tolist():
        delta = span * f / n
        err = float((kept - sparse_values(kept, eps, delta, a_bits)).pow(2).sum())
        if best is None or err < best[0]:
            best = (err, delta)
    return eps, best[1]


# ---- step 2: the layer-wise solution -------------------------------------------------------------------
def output_error(w: torch.Tensor, v: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``||X~ W^T - X~ V^T||^2`` per output from ``G = X~^T X~`` (w, v: (N, K))."""
    d = (w - v).double()
    return ((d @ gram) * d).sum(1)


def round_weights(w: torch.Tensor, w_bits: int, iters: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain rounding: per output the scale and integer codes in [-L, L] closest to the weights
    themselves (alternating ``codes = clamp(round(w / alpha))``, ``alpha = <w, q> / <q, q>``)."""
    top = 2 ** (w_bits - 1) - 1
    w = w.detach().double()
    alpha = w.abs().mean(1).clamp_min(1e-12) * (1.0 if top == 1 else 2.0 / top)
    for _ in range(iters):
        q = torch.round(w / alpha[:, None]).clamp(-top, top)
        den = (q * q).sum(1)
        alpha = torch.where(den > 0, (w * q).sum(1) / den.clamp_min(1e-30), alpha).clamp_min(1e-12)
    return alpha, torch.round(w / alpha[:, None]).clamp(-top, top)


def tsq_solve(w: torch.Tensor, gram: torch.Tensor, w_bits: int, iters: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """TSQ's iterative solution of ``min ||X~ W^T - X~ (alpha q)^T||`` per output (w: (N, K), gram:
    ``X~^T X~`` (K, K)): from plain rounding, ``iters`` rounds of the closed-form alpha and a sweep
    setting each code to the best integer in [-L, L] given the others. Every update lowers the error."""
    top = 2 ** (w_bits - 1) - 1
    g = gram.double()
    w = w.detach().double()
    alpha, q = round_weights(w, w_bits)
    b = w @ g                                      # (N, K): row n is z_n^T X~
    diag = g.diagonal()
    for _ in range(iters):
        den = ((q @ g) * q).sum(1)
        alpha = torch.where(den > 0, (b * q).sum(1) / den.clamp_min(1e-30), alpha)
        alpha = torch.where(alpha.abs() > 1e-12, alpha, torch.full_like(alpha, 1e-12))
        s = q @ g                                  # (N, K): (G q_n)_k, kept current through the sweep
        for k in range(q.shape[1]):
            if diag[k] <= 0:
                continue
            others = s[:, k] - diag[k] * q[:, k]
            new = torch.round((b[:, k] / alpha - others) / diag[k]).clamp(-top, top)
            change = new - q[:, k]
            if bool(change.any()):
                s += change[:, None] * g[k][None, :]
                q[:, k] = new
    den = ((q @ g) * q).sum(1)
    alpha = torch.where(den > 0, (b * q).sum(1) / den.clamp_min(1e-30), alpha)
    return alpha, q


# ---- the layers ----------------------------------------------------------------------------------------
class TSQMixin:
    """Shared by TSQConv2d / TSQLinear: the sparse input quantizer (step 1) and low-bit weights (step 2)."""

    squeezer_leaf = True
    tsq_step = 1

    def _init_tsq(self, eps: float, delta: float, a_bits: int, w_bits: int) -> None:
        self.tsq_eps, self.tsq_delta, self.a_bits, self.w_bits = float(eps), float(delta), int(a_bits), int(w_bits)
        self.tsq_alpha = nn.Parameter(torch.ones(self.weight.shape[0]), requires_grad=False)

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        top = self.tsq_eps + (2 ** self.a_bits - 1) * self.tsq_delta
        xc = x.clamp(0, top)
        return sparse_values(x, self.tsq_eps, self.tsq_delta, self.a_bits).to(x.dtype) + (xc - xc.detach())

    def codes(self) -> torch.Tensor:
        top = 2 ** (self.w_bits - 1) - 1
        alpha = self.tsq_alpha.detach().reshape(-1, *([1] * (self.weight.dim() - 1)))
        return torch.round(self.weight.detach() / alpha).clamp(-top, top)

    def quant_weight(self) -> torch.Tensor:
        if self.tsq_step == 1:
            return self.weight
        alpha = self.tsq_alpha.reshape(-1, *([1] * (self.weight.dim() - 1)))
        return alpha * self.codes() + (self.weight - self.weight.detach())   # STE to W, alpha learned

    def set_solution(self, alpha: torch.Tensor, codes: torch.Tensor) -> None:
        """Step 2's start: latent weights alpha * codes (so rounding gives back the codes), alpha learnable."""
        with torch.no_grad():
            self.tsq_alpha.copy_(alpha.float())
            self.weight.copy_((alpha[:, None] * codes).reshape(self.weight.shape).float())
        self.tsq_alpha.requires_grad_(True)
        self.tsq_step = 2

    def pack(self) -> nn.ModuleList:
        if self.tsq_step != 2:
            raise OptionError("two-step-quantization: step=deploy packs the step-2 weights: run step=weights first "
                              "(or deploy plain layers, which runs both steps)")
        q = self.codes().to(torch.int64)
        bits = max(1, int(q.abs().max()).bit_length())
        u = q & ((1 << (bits + 1)) - 1)
        planes = torch.stack([((u >> j) & 1).bool() for j in range(bits + 1)])
        coef = [2.0 ** j for j in range(bits)] + [-(2.0 ** bits)]
        alpha = self.tsq_alpha.detach().float()
        n, eps, delta = 2 ** self.a_bits - 1, self.tsq_eps, self.tsq_delta
        scale, shift = in_transform(eps, delta, self.a_bits)
        parts = [self._bit_layer(planes, coef, alpha * (n * delta), self.bias, self.a_bits, scale, shift)]
        if eps - delta / 2 != 0:
            parts.append(self._bit_layer(planes, coef, alpha * (eps - delta / 2), None, 1, 1.0, 0.5 - eps))
        return TSQPlanes(parts)


class TSQLinear(nn.Linear, TSQMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quant_input(x), self.quant_weight(), self.bias)

    def _bit_layer(self, planes, coef, alpha, bias, a_bits, scale, shift):
        return ShiftedInputBitLinear(planes, coef, 0.0, alpha, bias, "unsigned", a_bits, False,
                                     in_scale=scale, in_shift=shift)


class TSQConv2d(nn.Conv2d, TSQMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.quant_input(x), self.quant_weight(), self.bias, self.stride, self.padding, self.dilation)

    def _bit_layer(self, planes, coef, alpha, bias, a_bits, scale, shift):
        return ShiftedInputBitConv2d(planes, coef, 0.0, alpha, bias, self.stride, self.padding, self.dilation,
                                     "unsigned", a_bits, False, in_scale=scale, in_shift=shift)


def tsq_layer(m: nn.Module, eps: float, delta: float, a_bits: int, w_bits: int) -> TSQMixin:
    if isinstance(m, nn.Linear):
        q = TSQLinear(m.in_features, m.out_features, m.bias is not None)
    else:
        q = TSQConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, 1,
                      m.bias is not None)
    q.load_state_dict(m.state_dict())
    q._init_tsq(eps, delta, a_bits, w_bits)
    return q.to(m.weight.device).train(m.training)


class _ShiftedInput:
    """The deployed layer's input transform ``x * in_scale + in_shift`` (the codes' thresholds land
    where the bit-serial op's unsigned quantizer puts them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.in_scale + self.in_shift)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, in_scale={self.in_scale:.6g}, in_shift={self.in_shift:.6g}"


class ShiftedInputBitLinear(_ShiftedInput, BitLinear):
    def __init__(self, *args, in_scale: float = 1.0, in_shift: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.in_scale, self.in_shift = float(in_scale), float(in_shift)


class ShiftedInputBitConv2d(_ShiftedInput, BitConv2d):
    def __init__(self, *args, in_scale: float = 1.0, in_shift: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.in_scale, self.in_shift = float(in_scale), float(in_shift)


class TSQPlanes(nn.ModuleList):
    """The deployed TSQ layer: the codes' bit-serial layer and the mask's; the graph sums their outputs."""


def im2col_gram(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``X~^T X~`` of the layer's (already quantized) inputs ``x``, rows = output positions."""
    if isinstance(m, nn.Conv2d):
        cols = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)      # (B, K, L)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
    rows = rows.double()
    return rows.T @ rows


# ---- the pass ------------------------------------------------------------------------------------------
@register_pass
@dataclass(frozen=True)
class TwoStepQuantization(Pass):
    """Two-Step Quantization: sparse low-bit activation codes, then layer-wise low-bit weights (module docstring)."""

    name = "two-step-quantization"
    verify_tolerance = None
    reported = ("params", "stored_bytes")

    step: str = "deploy"               # codes (step 1) | weights (step 2) | deploy
    a_bits: int = 2
    w_bits: int = 2                    # 2: ternary weights
    sparsity: float = 0.5              # fraction of the positive inputs below the threshold eps
    iters: int = 3                     # rounds of (alpha, code sweep) in step 2
    layers: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    keep_first_last: bool = True
    # batches to calibrate eps/Delta and to build step 2's X~ (inputs, or (inputs, labels)); the example
    # inputs when empty. Not in the spec.
    calibration: tuple = field(default=(), repr=False, compare=False, metadata={"spec": False})

    def validate(self) -> None:
        self.check_choice("step", STEPS)
        self.check_range("a_bits", 1, 8, integer=True)
        self.check_range("w_bits", 2, 4, integer=True)
        self.check_range("sparsity", 0.0, 1.0, hi_open=True)
        self.check_range("iters", 1, 100, integer=True)
        self.check_pattern_tuples("layers", "exclude")

    def requires(self, graph: Graph) -> None:
        self.check_patterns(graph, "layers/exclude", (*self.layers, *self.exclude))

    def run(self, graph: Graph, report: PassReport) -> Graph:
        chosen = self._choose(graph, report)
        plain = {n: m for n, m in chosen.items() if not isinstance(m, TSQMixin)}
        if plain:   # step 1: sparse-quantized inputs, calibrated on the float model's inputs
            inputs = self._record(graph, plain)
            for name, m in plain.items():
                eps, delta = calibrate_sparse(inputs[name], self.sparsity, self.a_bits)
                graph.module.set_submodule(name, tsq_layer(m, eps, delta, self.a_bits, self.w_bits))
                report.change(f"{name}: {type(m).__name__} -> {self.a_bits}-bit sparse-quantized input "
                              f"(eps {eps:.4g}, Delta {delta:.4g}; weights fp32)")
        if self.step == "codes":
            return graph
        first = {n: graph.module.get_submodule(n) for n in chosen}
        todo = {n: m for n, m in first.items() if m.tsq_step == 1}
        if todo:    # step 2: the layer-wise solution on the quantized inputs
            inputs = self._record(graph, todo)
            for name, m in todo.items():
                with torch.no_grad():
                    gram = im2col_gram(m, m.quant_input(inputs[name].to(m.weight.device)))
                w = m.weight.detach().reshape(m.weight.shape[0], -1)
                a0, q0 = round_weights(w, m.w_bits)
                alpha, q = tsq_solve(w, gram, m.w_bits, self.iters)
                before = float(output_error(w, a0[:, None] * q0, gram).sum())
                after = float(output_error(w, alpha[:, None] * q, gram).sum())
                m.set_solution(alpha, q)
                report.change(f"{name}: {m.w_bits}-bit weights by the layer-wise solution, output error "
                              f"{before:.4g} (rounding) -> {after:.4g}")
        if self.step == "deploy":
            for name in chosen:
                m = graph.module.get_submodule(name)
                _inline_sum(graph, name, m.pack().train(m.training))
                report.change(f"{name}: -> bit-serial layers ({m.a_bits}-bit sparse codes + mask) x {m.w_bits}-bit "
                              "weights")
        return graph

    def _choose(self, graph: Graph, report: PassReport) -> dict[str, nn.Module]:
        layers = {n: m for n, m in graph.layers().items() if type(m) in (nn.Conv2d, nn.Linear)
                  or isinstance(m, TSQMixin)}
        order = list(layers)
        first_last = {order[0], order[-1]} if order and self.keep_first_last else set()
        chosen = {}
        for name, m in layers.items():
            if not self.selects(name, report):
                continue
            if name in first_last and not isinstance(m, TSQMixin):
                report.skip(name, "first/last layer kept in full precision (keep_first_last=false to change)")
            elif isinstance(m, nn.Conv2d) and (m.groups != 1 or isinstance(m.padding, str) or m.padding_mode != "zeros"):
                report.skip(name, "grouped conv or non-numeric/non-zero padding is not quantized")
            else:
                chosen[name] = m
        return chosen

    def _record(self, graph: Graph, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """Each layer's inputs on the calibration batches (the example inputs when there are none)."""
        recorder = InputRecorder(layers)
        try:
            with inference_mode(graph.module):
                for i, batch in enumerate(self.calibration or ((graph.example_inputs, None),)):
                    inputs = batch if isinstance(batch, torch.Tensor) else batch[0]
                    try:
                        graph.module(*(inputs if isinstance(inputs, (tuple, list)) else (inputs,)))
                    except Exception as exc:  # noqa: BLE001 - named after the option that fed it
                        raise PassError(f"two-step-quantization: calibration batch {i} did not run through the "
                                        f"model: {type(exc).__name__}: {first_line(exc)}") from exc
            return {name: recorder.batch(name) for name in layers}
        finally:
            recorder.close()

