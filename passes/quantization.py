"""Integer quantization of Conv2d and Linear layers: int8 (or narrower) weights per output channel,
uint8 activations per tensor, deployed as ``squeezer::int_conv2d`` / ``int_linear`` layers that
codegen runs on the CPU's integer dot-product units (compiler/ops/integer.py).

The arithmetic is Jacob et al.'s ("Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018): ``x ≈ s (q - z)`` with unsigned ``q``, weights
``W ≈ s_w[n] q_w`` symmetric per channel, BatchNorm folded into the preceding layer first. Stages:

* ``calibrate`` — post-training quantization: BatchNorm folded, each chosen layer becomes a
  :class:`FakeQuantConv2d` / :class:`FakeQuantLinear` whose input range comes from an observer
  run over ``calibration`` batches (``observer=minmax|percentile|entropy``, passes/quant_observers.py).
  The result runs the quantized arithmetic in float (what deploy will compute) and can be evaluated.
  ``rounding=adaround`` then rounds each layer's weights by AdaRound on the inputs it saw
  (passes/adaround.py) — the layer-by-layer reconstruction the survey's Quantized CNN began.
* ``train`` — the same layers with learnable step sizes for quantization-aware training: LSQ
  (Esser et al., "Learned Step Size Quantization", ICLR 2020): round with a straight-through
  gradient, the step sizes trained with their gradient scaled by ``1 / sqrt(n Q_p)``. The
  zero point stays where calibration put it. Fine-tune with ``compiler.finetune``.
* ``deploy`` — packs fake-quantized layers (calibrated or trained) into integer layers; plain
  layers are calibrated first. Deployed outputs equal the fake-quantized model's up to float32
  rounding (the integer core is exact).

``group_size=G`` gives one weight scale per group of G input channels (per tap of a conv) instead
of per output channel, the codes (``w_bits <= 4``) packed two to a byte: ``Int4Linear`` /
``Int4Conv2d`` (compiler/ops/int4.py), GPTQ/AWQ's grouping, which 4-bit weights need. Depthwise
and grouped convs are quantized like the others (``IntConv2d(groups=...)``, a scale per channel). Layers
named in ``exclude`` and, with ``keep_first_last``, the first and last stay float. Each integer
layer takes and returns float32, so residual adds and concats need no shared scales; the compiler
makes a layer write the next one's codes where nothing lies between them (codegen/int_epilogue.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from compiler import Pass, PassReport, register_pass
from compiler.errors import PassError
from compiler.graph import Graph, first_line, inference_mode
from compiler.linear_forms import linear_forms
from compiler.ops.int4 import WORD_CODES, Int4Conv2d, Int4Linear, group_index
from compiler.ops.integer import IntConv2d, IntLinear

from .adaround import InputRecorder, adaround

from .quant_observers import OBSERVERS, RangeObserver, scale_and_zero


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def _grad_scaled(s: torch.Tensor, g: float) -> torch.Tensor:
    """LSQ: the value of ``s`` with its gradient multiplied by ``g``."""
    return (s - s * g).detach() + s * g


class FakeQuantMixin:
    """Shared by the fake-quantized layers: step sizes, zero point, observer, forward quantizers."""

    squeezer_leaf = True   # compiler.trace keeps these layers whole
    group_size = 0         # one weight scale per output channel (layers saved before groups existed too)

    def _init_quant(self, w_bits: int, a_bits: int, learn: bool, group_size: int = 0) -> None:
        self.w_bits, self.a_bits, self.learn_scales = int(w_bits), int(a_bits), bool(learn)
        self.group_size = int(group_size)
        top = 2 ** (w_bits - 1) - 1
        w = self.weight.detach().abs().reshape(self.weight.shape[0], -1)
        if self.group_size:   # one scale per output and group of input channels (compiler/ops/int4.py)
            index = group_index(tuple(self.weight.shape), self.group_size).reshape(1, -1).expand_as(w)
            per_out = w.new_zeros(w.shape[0], int(index.max()) + 1).scatter_reduce(1, index, w, "amax")
        else:
            per_out = w.amax(1)
        self.w_step = nn.Parameter((per_out / top).clamp_min(1e-8), requires_grad=learn)
        self.x_step = nn.Parameter(torch.ones(()), requires_grad=learn)
        self.x_zero = 0
        self.observer: RangeObserver | None = None

    def weight_step(self, grad_scale: float | None = None) -> torch.Tensor:
        """Each weight's step, broadcastable to the weight (``grad_scale``: LSQ's on ``w_step``)."""
        step = self.w_step if grad_scale is None else _grad_scaled(self.w_step, grad_scale)
        if self.group_size:
            return step[:, group_index(tuple(self.weight.shape), self.group_size).to(step.device)]
        return step.reshape((-1,) + (1,) * (self.weight.dim() - 1))

    def set_input_range(self, lo: float, hi: float) -> None:
        scale, zero = scale_and_zero(lo, hi, self.a_bits)
        with torch.no_grad():
            self.x_step.fill_(scale)
        self.x_zero = zero

    def quant_weight(self) -> torch.Tensor:
        top = 2 ** (self.w_bits - 1) - 1
        per_step = self.group_size or self.weight[0].numel()
        grad_scale = 1.0 / math.sqrt(per_step * top) if self.training and self.learn_scales else None
        step = self.weight_step(grad_scale)
        return _RoundSTE.apply(self.weight / step).clamp(-top, top) * step

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:   # calibrating: pass through, record
            self.observer.observe(x)
            return x
        top, zero = 2 ** self.a_bits - 1, self.x_zero
        step = _grad_scaled(self.x_step, 1.0 / math.sqrt(x[0].numel() * top)) if self.learn_scales else self.x_step
        return (_RoundSTE.apply(x / step + zero).clamp(0, top) - zero) * step

    def _exact(self) -> bool:
        """Evaluating (not training, not calibrating): run the integer op's reference, so the
        model computes exactly what the deployed layer (and its compiled kernel) computes."""
        return self.observer is None and not (self.training and torch.is_grad_enabled())

    def _int_args(self) -> dict:
        top = 2 ** (self.w_bits - 1) - 1
        step = self.weight_step().detach().float()
        codes = torch.round(self.weight.detach() / step).clamp(-top, top).to(torch.int8)
        bias = self.bias.detach().float() if self.bias is not None else self.weight.new_zeros(self.weight.shape[0])
        grouped = dict(group_size=self.group_size) if self.group_size else {}
        return dict(w_codes=codes, w_scale=self.w_step.detach().float(), bias=bias, x_scale=float(self.x_step.detach()),
                    x_zero=self.x_zero, a_bits=self.a_bits, w_bits=self.w_bits, **grouped)

    def _adopt(self, m: nn.Module, w_bits: int, a_bits: int, learn: bool, group_size: int = 0):
        """This layer with ``m``'s weights, quantizers initialized, on its device and mode."""
        self.load_state_dict(m.state_dict())
        self._init_quant(w_bits, a_bits, learn, group_size)
        return self.to(m.weight.device).train(m.training)


class FakeQuantLinear(nn.Linear, FakeQuantMixin):
    """Linear computing the integer layer's arithmetic in float (calibration, QAT)."""

    @classmethod
    def from_linear(cls, m: nn.Linear, w_bits: int, a_bits: int, learn: bool,
                    group_size: int = 0) -> "FakeQuantLinear":
        return cls(m.in_features, m.out_features, m.bias is not None)._adopt(m, w_bits, a_bits, learn, group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._exact():
            return self.pack().to(self.weight.device)(x)
        return F.linear(self.quant_input(x), self.quant_weight(), self.bias)

    def pack(self) -> IntLinear | Int4Linear:
        return (Int4Linear if self.group_size else IntLinear)(**self._int_args())


class FakeQuantConv2d(nn.Conv2d, FakeQuantMixin):
    """Conv2d (any groups, zero padding) computing the integer layer's arithmetic in float."""

    @classmethod
    def from_conv(cls, m: nn.Conv2d, w_bits: int, a_bits: int, learn: bool, group_size: int = 0) -> "FakeQuantConv2d":
        q = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                m.bias is not None)
        return q._adopt(m, w_bits, a_bits, learn, group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._exact():
            return self.pack().to(self.weight.device)(x)
        return F.conv2d(self.quant_input(x), self.quant_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def pack(self) -> IntConv2d | Int4Conv2d:
        geometry = dict(stride=self.stride, padding=self.padding, dilation=self.dilation)
        if self.group_size:
            return Int4Conv2d(**self._int_args(), **geometry)
        return IntConv2d(**self._int_args(), **geometry, groups=self.groups)


def fold_batchnorm(graph: Graph, report: PassReport) -> None:
    """Fold each BatchNorm that is the only consumer of a Conv2d/Linear into it (eval statistics,
    torch.nn.utils.fusion), as integer inference requires; the BatchNorm node is removed."""
    fx_graph = graph.module.graph
    for node in list(fx_graph.nodes):
        if node.op != "call_module" or not isinstance(bn := graph.module.get_submodule(node.target),
                                                        (nn.BatchNorm1d, nn.BatchNorm2d)):
            continue
        src = node.args[0]
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        layer = graph.module.get_submodule(src.target)
        shared = sum(1 for n in fx_graph.nodes if n.op == "call_module" and n.target == src.target) > 1
        if shared or not bn.track_running_stats or type(layer) not in (nn.Conv2d, nn.Linear):
            continue
        fuse = fuse_conv_bn_eval if isinstance(layer, nn.Conv2d) else fuse_linear_bn_eval
        fused = fuse(layer.eval(), bn.eval()).train(layer.training)
        graph.module.set_submodule(src.target, fused)
        node.replace_all_uses_with(src)
        fx_graph.erase_node(node)
        report.change(f"{node.target}: BatchNorm folded into {src.target}")
    graph.module.recompile()
    graph.module.delete_all_unused_submodules()


@register_pass
@dataclass(frozen=True)
class Quantize(Pass):
    """Integer quantization (see the module docstring)."""

    name = "quantize"
    verify_tolerance = None
    reported = ("params", "stored_bytes")

    stage: str = "deploy"           # calibrate | train | deploy
    w_bits: int = 8
    a_bits: int = 8
    observer: str = "minmax"        # minmax | percentile | entropy
    percentile: float = 99.99
    layers: tuple[str, ...] = ()    # patterns of layers to quantize (default: every Conv2d/Linear that can be)
    exclude: tuple[str, ...] = ()
    keep_first_last: bool = False
    fold_bn: bool = True
    rounding: str = "nearest"       # nearest | adaround (Nagel et al. 2020, on the calibration batches)
    group_size: int = 0             # 0: a scale per output channel; else per group of input channels, packed 4-bit
    adaround_iters: int = 500
    # calibration batches: (inputs, labels or None) as ChannelPruning's, or bare input tensors; the
    # example inputs when empty. Not in the spec.
    calibration: tuple = field(default=(), repr=False, compare=False, metadata={"spec": False})

    def validate(self) -> None:
        self.check_choice("stage", ("calibrate", "train", "deploy"))
        self.check_choice("observer", OBSERVERS)
        self.check_choice("rounding", ("nearest", "adaround"))
        self.check_range("adaround_iters", 1, 100_000, integer=True)
        self.check_range("w_bits", 2, 8, integer=True)
        self.check_range("a_bits", 2, 8, integer=True)
        self.check_range("percentile", 50.0, 100.0, lo_open=True)
        self.check_range("group_size", 0, 1 << 20, integer=True)
        if self.group_size % WORD_CODES:
            self._fail("group_size", self.group_size, f"0 or a multiple of {WORD_CODES} (codes per packed word)")
        if self.group_size and self.w_bits > 4:
            self._fail("group_size", self.group_size, f"0 with w_bits={self.w_bits} (grouped weights are packed 4-bit "
                       "codes: w_bits <= 4)")
        self.check_pattern_tuples("layers", "exclude")

    def requires(self, graph: Graph) -> None:
        self.check_patterns(graph, "layers/exclude", (*self.layers, *self.exclude))

    def run(self, graph: Graph, report: PassReport) -> Graph:
        linear_forms(graph)   # GPT-2's Conv1D: an nn.Linear first
        if self.fold_bn:
            fold_batchnorm(graph, report)
        chosen = self._choose(graph, report)
        fresh = {name: self._fake(m) for name, m in chosen.items() if not isinstance(m, FakeQuantMixin)}
        for name, m in fresh.items():
            graph.module.set_submodule(name, m)
        if fresh:
            self._calibrate(graph, fresh, report)
        for name in chosen:
            m = graph.module.get_submodule(name)
            m.learn_scales = self.stage == "train"
            for p in (m.w_step, m.x_step):
                p.requires_grad_(self.stage == "train")
            new = m.pack() if self.stage == "deploy" else m
            graph.module.set_submodule(name, new)
            scales = f"groups of {m.group_size}" if m.group_size else "per channel"
            report.change(f"{name}: {type(chosen[name]).__name__} -> {type(new).__name__} (w{self.w_bits}/a{self.a_bits}, "
                          f"weight scales {scales}, input scale {float(m.x_step.detach()):.4g}, zero point {m.x_zero})")
        return graph

    def _choose(self, graph: Graph, report: PassReport) -> dict[str, nn.Module]:
        layers = {n: m for n, m in graph.layers().items() if isinstance(m, (nn.Conv2d, nn.Linear))}
        order = list(layers)
        first_last = {order[0], order[-1]} if order and self.keep_first_last else set()
        chosen = {}
        for name, m in layers.items():
            if not self.selects(name, report):
                continue
            if name in first_last:
                report.skip(name, "first/last layer kept in float (keep_first_last=true)")
            elif isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)
                                               or len(m.kernel_size) != 2):
                report.skip(name, f"padding {m.padding!r}/{m.padding_mode} not supported (numeric zero padding only)")
            elif not m.weight.dtype.is_floating_point:
                report.skip(name, f"weight dtype {m.weight.dtype} is not float")
            else:
                chosen[name] = m
        return chosen

    def _fake(self, m: nn.Module) -> nn.Module:
        """The fake-quantized layer: grouped (packed 4-bit), except convs whose taps have fewer
        input channels than a group or that are grouped themselves (one scale per channel: a
        scale per tap of a 1-channel conv would outweigh its codes)."""
        if isinstance(m, nn.Linear):
            return FakeQuantLinear.from_linear(m, self.w_bits, self.a_bits, False, self.group_size)
        grouped = m.groups == 1 and m.in_channels >= self.group_size
        return FakeQuantConv2d.from_conv(m, self.w_bits, self.a_bits, False, self.group_size if grouped else 0)

    def _calibrate(self, graph: Graph, layers: dict[str, nn.Module], report: PassReport) -> None:
        """Run the calibration batches with observers on the new layers' inputs (float forward),
        then set each layer's activation scale and zero point; with ``rounding=adaround``, round
        each layer's weights by AdaRound on the inputs it saw."""
        for m in layers.values():
            m.observer = RangeObserver(self.observer, self.percentile)
        recorder = InputRecorder(layers) if self.rounding == "adaround" else None
        try:
            with inference_mode(graph.module):
                for i, batch in enumerate(self.calibration or ((graph.example_inputs, None),)):
                    inputs = batch if isinstance(batch, torch.Tensor) else batch[0]   # a tensor or (inputs, labels)
                    try:
                        graph.module(*(inputs if isinstance(inputs, (tuple, list)) else (inputs,)))
                    except Exception as exc:  # noqa: BLE001 - named after the option that fed it
                        raise PassError(f"quantize: calibration batch {i} did not run through the model: "
                                        f"{type(exc).__name__}: {first_line(exc)}") from exc
            for name, m in layers.items():
                try:
                    m.set_input_range(*m.observer.range(2 ** self.a_bits))
                except ValueError as exc:
                    raise ValueError(f"quantize: layer {name}: {exc}") from None
        finally:
            for m in layers.values():
                m.observer = None
            if recorder is not None:
                recorder.close()
        if recorder is not None:
            for name, m in layers.items():
                before, after = adaround(m, recorder.batch(name).to(m.weight.device), iters=self.adaround_iters)
                report.change(f"{name}: AdaRound output error {before:.4g} -> {after:.4g} (nearest -> learned)")
