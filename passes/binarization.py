"""Binarization and low-bit quantization of Conv2d/Linear layers, with straight-through-estimator
training layers and bit-plane storage whose kernels are popcounts (compiler/ops/bitserial.py).

Methods (``method=``), each as its paper defines it:

* ``binaryconnect`` — W_b = sign(W), float activations; the latent weights are trained through
  an STE that passes the gradient where |W| <= 1 (Courbariaux, Bengio & David, "BinaryConnect",
  NIPS 2015).
* ``bnn`` — binary weights *and* activations, sign with the hardtanh STE (Hubara et al.,
  "Binarized Neural Networks", NIPS 2016).
* ``xnor`` — sign weights scaled per output channel by alpha = mean|W|, sign activations scaled by
  K (mean |x| over the inputs of each output; for convs the channel-mean of |x| box-filtered over
  the window) (Rastegari et al., "XNOR-Net", ECCV 2016).
* ``dorefa`` — k-bit weights ``2 q_k(tanh W / (2 max|tanh W|) + 1/2) - 1`` (1 bit: sign(W) E|W|)
  and k-bit activations ``q_k(clip(x, 0, 1))`` (Zhou et al., "DoReFa-Net", 2016).
* ``twn`` — ternary {-a, 0, +a} with threshold 0.7 mean|W| and a = mean of |W| above it (Li, Zhang
  & Liu, "Ternary Weight Networks", 2016).
* ``ttq`` — ternary with *learned* positive and negative scales W_p, W_n and threshold
  t max|W| (Zhu, Han, Mao & Dally, "Trained Ternary Quantization", ICLR 2017).
* ``inq`` — incremental power-of-two quantization: the largest weights are quantized to
  {0, ±2^n} first and frozen, the rest retrained, growing the quantized fraction to 100 %
  (Zhou et al., "Incremental Network Quantization", ICLR 2017).
* ``bitnet`` — BitLinear of BitNet (Wang et al., "BitNet: Scaling 1-bit Transformers for Large
  Language Models", 2023): W_b = sign(W - mean W) scaled by beta = mean|W|, activations 8-bit
  absmax per token (``activations=absmax``, ``a_bits`` bits); identity straight-through gradients.
* ``bitnet158`` — BitNet b1.58 (Ma et al., "The Era of 1-bit LLMs", 2024): absmean ternary
  weights W_t = clip(round(W / gamma), -1, 1) scaled by gamma = mean|W|, absmax 8-bit activations.
  Both quantize Linear layers only (convs are skipped: per-token scales do not fit a conv
  window); the papers quantize every projection of the blocks, so pass ``keep_first_last=false``
  to include the first and last Linear. The LayerNorm the papers put before each BitLinear is the
  model's own.
* ``abc`` — M binary bases: W ≈ sum_m a_m sign(W - mean W + u_m std W) with least-squares a_m,
  then learned (Lin, Zhao & Pan, "Towards Accurate Binary Convolutional Neural Network",
  NIPS 2017; LQ-Nets' learned bases, Zhang et al., ECCV 2018, are the same storage).
* ``bireal``, ``tang``, ``tbn`` — Bi-Real Net (Liu et al., ECCV 2018), Tang, Hua & Wang (AAAI 2017) and
  TBN (Wan et al., ECCV 2018): defined in ``passes/binary_survey.py``.

``stage="train"`` swaps the selected layers for :class:`QuantConv2d`/:class:`QuantLinear` (latent
float weights, fake-quantized forward, STE backward) to fine-tune with ``compiler.finetune``;
``stage="deploy"`` (default) packs them — or plain layers directly — into :class:`BitConv2d` /
:class:`BitLinear`, whose forward is the same arithmetic on packed bits. First and last layers
stay in full precision by default, as in the papers. Binary activations take the sign of the
previous layer's BatchNorm output: a ReLU between them (whose output sign is always +1) is
replaced by a HardTanh, the BNN/XNOR-Net block order BN → HardTanh → sign → binary conv.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from compiler import Pass, PassReport, register_pass
from compiler.graph import Graph
from compiler.linear_forms import linear_forms
from compiler.op_table import node_rule
from compiler.ops.bitserial import BitConv2d, BitLinear, absmax_quantize

METHODS = ("binaryconnect", "bnn", "xnor", "dorefa", "twn", "ttq", "inq", "abc", "bitnet", "bitnet158")
DEFAULT_ACTIVATIONS = {"bnn": "sign", "xnor": "sign", "dorefa": "unsigned", "bitnet": "absmax", "bitnet158": "absmax"}
DEFAULT_A_BITS = {"unsigned": 2, "absmax": 8}
# methods of other modules (passes/binary_survey.py: Bi-Real Net, Tang et al., TBN) register here: name ->
# an object with init(layer, **opts), weight(layer), input(layer, x), pack(layer), rewrite(graph, name, report, pass)
EXTENSIONS: dict = {}


# ---- straight-through estimators ------------------------------------------------------------------
class _SignSTE(torch.autograd.Function):
    """sign (>= 0 -> +1) forward; gradient passed where |x| <= 1 (hardtanh's derivative)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


class _RoundSTE(torch.autograd.Function):
    """Round-half-up forward (as the kernel does), identity gradient."""

    @staticmethod
    def forward(ctx, x):
        return torch.floor(x + 0.5)

    @staticmethod
    def backward(ctx, g):
        return g


def quantize_absmax(x: torch.Tensor, bits: int) -> torch.Tensor:
    """BitNet's per-token absmax quantizer (compiler.ops.bitserial), identity gradient."""
    return x + (absmax_quantize(x, bits).to(x.dtype) - x).detach()


def quantize_unsigned(x: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa's activation quantizer q_k(clip(x, 0, 1)), gradient passed inside [0, 1]."""
    levels = 2 ** bits - 1
    return _RoundSTE.apply(x.clamp(0, 1) * levels) / levels


# ---- weight quantizers: latent W -> (planes, coef, offset, alpha), and the fake-quant weight ------------
def _per_out(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _view_alpha(alpha: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return alpha.reshape(-1, *([1] * (w.dim() - 1)))


class QuantMixin:
    """Shared by QuantLinear and QuantConv2d: the method's weight and activation quantizers."""

    method: str
    a_mode: str
    a_bits: int
    w_bits: int
    squeezer_leaf = True   # compiler.trace keeps these layers whole

    def _init_method(self, method: str, a_mode: str, a_bits: int, w_bits: int, abc_bases: int, ttq_threshold: float,
                     inq_fraction: float, **extra) -> None:
        self.method, self.a_mode, self.a_bits, self.w_bits = method, a_mode, a_bits, w_bits
        self.xnor_scale = method == "xnor" and a_mode != "float"   # float activations: BWN (weights only)
        w = self.weight.detach()
        if method == "ttq":
            self.ttq_threshold = ttq_threshold
            delta = ttq_threshold * w.abs().max()
            self.w_p = nn.Parameter(w[w > delta].abs().mean().reshape(()).clone() if (w > delta).any() else torch.ones(()))
            self.w_n = nn.Parameter(w[w < -delta].abs().mean().reshape(()).clone() if (w < -delta).any() else torch.ones(()))
        if method == "abc":
            mean, std = w.mean(), w.std()
            us = torch.linspace(-1, 1, abc_bases) if abc_bases > 1 else torch.zeros(1)
            self.register_buffer("abc_shift", (us * std - mean).clone())
            bases = torch.stack([torch.where(w + s >= 0, 1.0, -1.0) for s in self.abc_shift]).reshape(abc_bases, -1)
            coef = torch.linalg.lstsq(bases.T.double(), w.reshape(-1, 1).double()).solution.reshape(-1)
            self.abc_alpha = nn.Parameter(coef.float())
        if method == "inq":
            self.register_buffer("inq_mask", torch.zeros_like(w, dtype=torch.bool))
            self.register_buffer("inq_values", torch.zeros_like(w))
            self.inq_levels = _inq_levels(w, w_bits)
            self.inq_step(inq_fraction)
        if method in EXTENSIONS:
            EXTENSIONS[method].init(self, **extra)

    # -- INQ: quantize the largest remaining weights and freeze them --
    def inq_step(self, fraction: float) -> None:
        """Quantize (and freeze) the largest-magnitude weights until ``fraction`` of all are quantized."""
        with torch.no_grad():
            w = self.weight
            target = int(round(fraction * w.numel()))
            todo = target - int(self.inq_mask.sum())
            if todo <= 0:
                return
            mags = w.abs().masked_fill(self.inq_mask, -1).reshape(-1)
            idx = torch.topk(mags, todo).indices
            flat_mask, flat_vals = self.inq_mask.reshape(-1), self.inq_values.reshape(-1)
            flat_mask[idx] = True
            flat_vals[idx] = _to_power_of_two(w.reshape(-1)[idx], self.inq_levels)

    # -- the fake-quantized weight (same values the packed layer computes) --
    def quant_weight(self) -> torch.Tensor:
        w, m = self.weight, self.method
        if m in EXTENSIONS:
            return EXTENSIONS[m].weight(self)
        if m in ("binaryconnect", "bnn"):
            return _SignSTE.apply(w)
        if m == "xnor":
            alpha = _per_out(w).abs().mean(1).detach()
            return _SignSTE.apply(w) * _view_alpha(alpha, w)
        if m == "dorefa":
            if self.w_bits == 1:
                return _SignSTE.apply(w) * w.abs().mean().detach()
            t = torch.tanh(w)
            levels = 2 ** self.w_bits - 1
            q = _RoundSTE.apply((t / (2 * t.abs().max().detach().clamp_min(1e-12)) + 0.5) * levels)
            return (2 * q - levels) / levels
        if m == "twn":
            delta = 0.7 * w.abs().mean().detach()
            pos, neg = (w > delta), (w < -delta)
            big = w.detach().abs()[pos | neg]
            a = big.mean() if big.numel() else w.new_ones(())
            return w - w.detach() + a * (pos.to(w.dtype) - neg.to(w.dtype))   # STE to the latent weights
        if m == "ttq":
            delta = self.ttq_threshold * w.abs().max().detach()
            pos, neg = (w > delta).to(w.dtype), (w < -delta).to(w.dtype)
            ternary = self.w_p * pos - self.w_n * neg
            # TTQ's latent gradient: scaled by W_p / W_n on the quantized sets, identity on zeros
            scale = (self.w_p.detach() * pos + self.w_n.detach() * neg + (1 - pos - neg))
            return ternary + (w * scale - (w * scale).detach())
        if m == "inq":
            return torch.where(self.inq_mask, self.inq_values, w)
        if m in ("bitnet", "bitnet158"):
            return w + (_bitnet_weight(w.detach(), m) - w).detach()   # identity STE, as the papers train
        if m == "abc":
            bases = torch.stack([_SignSTE.apply(w + s) for s in self.abc_shift])
            return (self.abc_alpha.reshape(-1, *([1] * w.dim())) * bases).sum(0)
        raise ValueError(m)

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.method in EXTENSIONS:
            return EXTENSIONS[self.method].input(self, x)
        if self.a_mode == "sign":
            return _SignSTE.apply(x)
        if self.a_mode == "unsigned":
            return quantize_unsigned(x, self.a_bits)
        if self.a_mode == "absmax":
            return quantize_absmax(x, self.a_bits)
        return x

    # -- the packed form --
    def planes(self):
        """(planes (P, out, ...) bool, coef, offset, alpha (out,)) of the current quantized weight."""
        with torch.no_grad():
            w, m = self.weight.detach(), self.method
            n = w.shape[0]
            ones = torch.ones(n)
            if m in ("binaryconnect", "bnn"):
                return (w >= 0)[None], [2.0], -1.0, ones
            if m == "xnor":
                return (w >= 0)[None], [2.0], -1.0, _per_out(w).abs().mean(1)
            if m == "dorefa":
                if self.w_bits == 1:
                    return (w >= 0)[None], [2.0], -1.0, ones * w.abs().mean()
                t = torch.tanh(w)
                levels = 2 ** self.w_bits - 1
                q = torch.floor((t / (2 * t.abs().max().clamp_min(1e-12)) + 0.5) * levels + 0.5).to(torch.int64)
                planes = torch.stack([((q >> j) & 1).bool() for j in range(self.w_bits)])
                return planes, [float(2 ** (j + 1)) for j in range(self.w_bits)], -float(levels), ones / levels
            if m == "bitnet":
                return (w - w.mean() >= 0)[None], [2.0], -1.0, ones * w.abs().mean()
            if m == "bitnet158":
                gamma = _absmean(w)
                q = torch.round(w / gamma).clamp(-1, 1)
                return torch.stack([q > 0, q < 0]), [1.0, -1.0], 0.0, ones * gamma
            if m in ("twn", "ttq", "inq", "abc"):
                q = self.quant_weight().detach()
                if m == "abc":
                    bases = torch.stack([w + s >= 0 for s in self.abc_shift])
                    a = self.abc_alpha.detach().float()
                    return bases, (2 * a).tolist(), -float(a.sum()), ones
                if m == "twn":
                    a = q.abs().max()
                    return torch.stack([q > 0, q < 0]), [1.0, -1.0], 0.0, ones * a
                if m == "ttq":   # the threshold masks (not the sign of q: a learned scale may turn negative)
                    delta = self.ttq_threshold * w.abs().max()
                    return torch.stack([w > delta, w < -delta]), [float(self.w_p), -float(self.w_n)], 0.0, ones
                # powers of two as two's-complement integers in units of the smallest level:
                # L magnitude planes 2^j and a sign plane -2^L (exact: every coefficient a power of two)
                unit = min(self.inq_levels)
                qi = torch.round(q / unit).to(torch.int64)
                mag_bits = max(1, int(qi.abs().max()).bit_length())
                u = qi & ((1 << (mag_bits + 1)) - 1)
                planes = torch.stack([((u >> j) & 1).bool() for j in range(mag_bits + 1)])
                coef = [unit * 2.0 ** j for j in range(mag_bits)] + [-unit * 2.0 ** mag_bits]
                return planes, coef, 0.0, ones
            raise ValueError(m)


def _absmean(w: torch.Tensor) -> torch.Tensor:
    return w.abs().mean().clamp_min(1e-5)


def _bitnet_weight(w: torch.Tensor, method: str) -> torch.Tensor:
    """BitNet's binary weight (sign(W - mean W) mean|W|) or b1.58's absmean ternary one."""
    if method == "bitnet":
        return torch.where(w - w.mean() >= 0, 1.0, -1.0).to(w.dtype) * w.abs().mean()
    gamma = _absmean(w)
    return torch.round(w / gamma).clamp(-1, 1) * gamma


def _inq_levels(w: torch.Tensor, bits: int) -> list[float]:
    """INQ's power-of-two set: n1 = floor(log2(4 max|W| / 3)), 2^(bits-1)/2 exponents down from n1."""
    s = float(w.abs().max()) or 1.0
    n1 = math.floor(math.log2(4 * s / 3))
    count = max(1, 2 ** (bits - 1) // 2)
    return [2.0 ** (n1 - i) for i in range(count)]


def _to_power_of_two(w: torch.Tensor, levels: list[float]) -> torch.Tensor:
    """Nearest of {0, ±levels} per INQ's rule: |w| below half the smallest level -> 0."""
    lv = torch.tensor(levels, dtype=w.dtype)
    mag = w.abs()
    nearest = lv[(mag.unsqueeze(-1) - lv).abs().argmin(-1)]
    out = torch.sign(w) * nearest
    return torch.where(mag < lv.min() / 2, torch.zeros_like(w), out)


class QuantLinear(nn.Linear, QuantMixin):
    """Linear with fake-quantized weights/activations (latent float weights, STE gradients)."""

    @classmethod
    def from_linear(cls, m: nn.Linear, method: str, a_mode: str, a_bits: int, w_bits: int, **opts) -> "QuantLinear":
        q = cls(m.in_features, m.out_features, m.bias is not None)
        q.load_state_dict(m.state_dict())
        q._init_method(method, a_mode, a_bits, w_bits, **opts)
        return q.to(m.weight.device).train(m.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.quant_input(x), self.quant_weight())
        if self.xnor_scale:
            y = y * x.abs().mean(-1, keepdim=True)
        return y + self.bias if self.bias is not None else y

    def pack(self) -> BitLinear:
        if self.method in EXTENSIONS:
            return EXTENSIONS[self.method].pack(self)
        planes, coef, offset, alpha = self.planes()
        return BitLinear(planes.reshape(planes.shape[0], self.out_features, self.in_features), coef, offset, alpha,
                         self.bias, self.a_mode, self.a_bits, self.xnor_scale)


class QuantConv2d(nn.Conv2d, QuantMixin):
    """Conv2d with fake-quantized weights/activations. Sign activations are padded with +1 (a real
    ±1 value, as the packed kernel does)."""

    @classmethod
    def from_conv(cls, m: nn.Conv2d, method: str, a_mode: str, a_bits: int, w_bits: int, **opts) -> "QuantConv2d":
        q = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, 1, m.bias is not None)
        q.load_state_dict(m.state_dict())
        q._init_method(method, a_mode, a_bits, w_bits, **opts)
        return q.to(m.weight.device).train(m.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = self.quant_input(x)
        ph, pw = self.padding
        if self.a_mode == "sign":
            xq = F.pad(xq, (pw, pw, ph, ph), value=1.0)
            pad = (0, 0)
        else:
            pad = self.padding
        y = F.conv2d(xq, self.quant_weight(), None, self.stride, pad, self.dilation)
        if self.xnor_scale:
            kh, kw = self.kernel_size
            box = x.new_full((1, 1, kh, kw), 1.0 / (kh * kw))
            y = y * F.conv2d(x.abs().mean(1, keepdim=True), box, None, self.stride, self.padding, self.dilation)
        return y + self.bias[None, :, None, None] if self.bias is not None else y

    def pack(self) -> BitConv2d:
        if self.method in EXTENSIONS:
            return EXTENSIONS[self.method].pack(self)
        planes, coef, offset, alpha = self.planes()
        return BitConv2d(planes, coef, offset, alpha, self.bias, self.stride, self.padding, self.dilation,
                         self.a_mode, self.a_bits, self.xnor_scale)


# ---- the pass ------------------------------------------------------------------------------------------
@register_pass
@dataclass(frozen=True)
class Binarize(Pass):
    """Binarize / ternarize / few-bit-quantize Conv2d and Linear layers (see the module docstring)."""

    name = "binarize"
    verify_tolerance = None
    reported = ("params", "stored_bytes")

    method: str = "xnor"
    stage: str = "deploy"               # "train": STE layers to fine-tune; "deploy": packed bit-plane layers
    activations: str = "auto"           # auto (the method's), float, sign, unsigned
    a_bits: int | None = None           # activation bits: DoReFa's unsigned (default 2), BitNet's absmax (8)
    w_bits: int = 2                     # DoReFa weight bits; INQ: 2^(w_bits-1)/2 power-of-two levels
    abc_bases: int = 3
    ttq_threshold: float = 0.05
    inq_fraction: float = 1.0           # INQ: fraction of weights quantized by this step
    layers: tuple[str, ...] = ()        # patterns of layers to quantize (default: all but first/last)
    exclude: tuple[str, ...] = ()
    keep_first_last: bool = True
    fix_relu: bool = True               # ReLU before a sign-activation layer -> HardTanh
    shortcut: bool = True               # Bi-Real Net: real-valued identity shortcut where shapes match
    prelu: bool = True                  # Tang et al.: the ReLU after the layer -> PReLU (+ BatchNorm)
    tbn_delta: float = 0.4              # TBN: ternary activation threshold delta * mean|x|

    def validate(self) -> None:
        self.check_choice("method", METHODS + tuple(EXTENSIONS))
        self.check_choice("stage", ("train", "deploy"))
        self.check_choice("activations", ("auto", "float", "sign", "unsigned", "absmax", "ternary"))
        if self.a_bits is not None:
            self.check_range("a_bits", 2 if self.a_mode == "absmax" else 1, 8, integer=True)
        self.check_range("w_bits", 1, 8, integer=True)
        self.check_range("abc_bases", 1, 8, integer=True)
        self.check_range("ttq_threshold", 0.0, 1.0, lo_open=True, hi_open=True)
        self.check_range("inq_fraction", 0.0, 1.0, lo_open=True)
        self.check_range("tbn_delta", 0.0, 4.0, lo_open=True)
        self.check_pattern_tuples("layers", "exclude")
        if self.a_mode == "ternary" and self.method != "tbn":
            self._fail("activations", self.activations, "ternary only with method=tbn (its threshold and scale)")
        if self.method == "inq" and self.stage == "deploy" and self.inq_fraction < 1.0:
            self._fail("inq_fraction", self.inq_fraction, "1.0 at stage=deploy (every weight a power of two)")

    @property
    def a_mode(self) -> str:
        return DEFAULT_ACTIVATIONS.get(self.method, "float") if self.activations == "auto" else self.activations

    @property
    def act_bits(self) -> int:
        return self.a_bits if self.a_bits is not None else DEFAULT_A_BITS.get(self.a_mode, 2)

    def requires(self, graph: Graph) -> None:
        self.check_patterns(graph, "layers/exclude", (*self.layers, *self.exclude))

    def run(self, graph: Graph, report: PassReport) -> Graph:
        linear_forms(graph)   # GPT-2's Conv1D: an nn.Linear first
        chosen = {n: m for n, m in graph.layers().items() if isinstance(m, (nn.Conv2d, nn.Linear))}
        order = list(chosen)
        first_last = {order[0], order[-1]} if order and self.keep_first_last else set()
        for name, m in chosen.items():
            if not self.selects(name, report):
                continue
            if name in first_last and not isinstance(m, QuantMixin) and not (
                    self.layers and any(fnmatch.fnmatchcase(name, p) for p in self.layers)):
                report.skip(name, "first/last layer kept in full precision (as the papers do; keep_first_last=false to change)")
                continue
            if isinstance(m, nn.Conv2d) and self.a_mode == "absmax" and not isinstance(m, QuantMixin):
                report.skip(name, "absmax activations are per token: Linear layers only (BitNet's BitLinear)")
                continue
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                report.skip(name, f"grouped conv (groups={m.groups}) is not binarized")
                continue
            if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
                report.skip(name, f"padding {m.padding!r}/{m.padding_mode} not supported (numeric zero padding only)")
                continue
            new = self._convert(m)
            if self.a_mode in ("sign", "ternary") and self.fix_relu and not isinstance(m, QuantMixin):
                self._relu_to_hardtanh(graph, name, report)
            graph.module.set_submodule(name, new)
            if self.method in EXTENSIONS and not isinstance(m, QuantMixin):   # Bi-Real shortcut, Tang's PReLU
                EXTENSIONS[self.method].rewrite(graph, name, report, self)
            kind = type(new).__name__
            report.change(f"{name}: {type(m).__name__} -> {kind} ({new.method if hasattr(new, 'method') else self.method}, "
                          f"activations {new.a_mode}{'' if new.a_mode in ('float', 'sign') else f' {new.a_bits}-bit'})")
        return graph

    def _convert(self, m: nn.Module) -> nn.Module:
        opts = dict(abc_bases=self.abc_bases, ttq_threshold=self.ttq_threshold, inq_fraction=self.inq_fraction,
                    tbn_delta=self.tbn_delta)
        if isinstance(m, QuantMixin):  # trained with stage=train
            if m.method == "inq":
                m.inq_step(self.inq_fraction)
            return m.pack() if self.stage == "deploy" else m
        if isinstance(m, nn.Linear):
            q = QuantLinear.from_linear(m, self.method, self.a_mode, self.act_bits, self.w_bits, **opts)
        else:
            q = QuantConv2d.from_conv(m, self.method, self.a_mode, self.act_bits, self.w_bits, **opts)
        return q.pack() if self.stage == "deploy" else q

    @staticmethod
    def _relu_to_hardtanh(graph: Graph, name: str, report: PassReport) -> None:
        """Walk back from ``name``'s input through pooling/dropout/reshapes; a ReLU found there
        becomes a HardTanh for this consumer (its output's sign would always be +1). A ReLU that
        others use too (a shared module, a residual stream) keeps its ReLU for them: a HardTanh
        of its input is inserted on this consumer's path only."""
        mods = dict(graph.module.named_modules())
        fx_graph = graph.module.graph
        node = next(n for n in fx_graph.nodes if n.op == "call_module" and n.target == name)
        below, cur = node, node.args[0] if node.args else None
        while isinstance(cur, fx.Node):
            rule = node_rule(cur, mods)
            if rule.relu:
                shared_module = cur.op == "call_module" and sum(
                    1 for n in fx_graph.nodes if n.op == "call_module" and n.target == cur.target) > 1
                if len(cur.users) == 1 and not shared_module:
                    if cur.op == "call_module":
                        graph.module.set_submodule(cur.target, nn.Hardtanh())
                    else:
                        cur.target, cur.kwargs, cur.args = F.hardtanh, {}, cur.args[:1]
                    report.change(f"{cur.name}: relu -> hardtanh before sign activations of {name}")
                else:
                    with fx_graph.inserting_after(cur):
                        ht = fx_graph.call_function(F.hardtanh, (cur.args[0],))
                    below.replace_input_with(cur, ht)
                    report.change(f"{cur.name}: shared relu kept; hardtanh inserted before sign activations of {name}")
                return
            if not rule.keeps_sign:
                return
            below, cur = cur, cur.args[0] if cur.args else None


def inq_schedule(graph: Graph, fractions=(0.5, 0.75, 0.875, 1.0), train_fn=None) -> Graph:
    """INQ's incremental schedule on a graph of stage=train INQ layers: quantize a growing fraction
    of the weights (largest first), retraining the rest with ``train_fn(module)`` between steps."""
    for fraction in fractions:
        for m in graph.module.modules():
            if isinstance(m, QuantMixin) and m.method == "inq":
                m.inq_step(fraction)
        if train_fn is not None and fraction < 1.0:
            train_fn(graph.module)
    return graph
