"""Binary-network methods of the survey (issue 23) as options of the ``binarize`` pass
(``method=bireal|tang|tbn``), plugged into passes/binarization.py through its ``EXTENSIONS`` hooks:
the STE training layers are its QuantConv2d/QuantLinear, the deployed layers its bit-plane
BitConv2d/BitLinear (compiler/ops/bitserial.py), whose compiled kernels are AND/XNOR-popcounts.

* ``bireal`` — Bi-Real Net (Liu, Wu, Luo, Yang, Liu & Cheng, "Bi-Real Net: Enhancing the Performance
  of 1-bit CNNs with Improved Representational Capability and Advanced Training Algorithm", ECCV 2018):

  - a real-valued identity shortcut around each binary layer and its BatchNorm,
    ``out = BN(conv(sign x)) + x``, added where the block's input and output shapes match
    (``shortcut=true``). Where they differ the report says so and the layer is binarized without
    it — on the demo's LeNet-5 every binarized layer changes shape (conv2 6x14x14 -> 16x10x10, fc1
    400 -> 120, fc2 120 -> 84), so no shortcut applies there;
  - the approximate sign derivative (:func:`approx_sign_grad`), the derivative of the piecewise
    polynomial ApproxSign: ``2 + 2x`` on [-1, 0), ``2 - 2x`` on [0, 1), 0 elsewhere;
  - the magnitude-aware weight ``W_b = (||W_r||_1 / n) sign(W_r)`` per output channel, whose
    gradient to the latent weights is ``dL/dW_b * ||W_r||_1 / n * 1{|W_r| < 1}``.

  It deploys as pure ±1 layers (sign activations, alpha = ||W_r||_1 / n): the popcount kernels.
* ``tang`` — Tang, Hua & Wang, "How to Train a Compact Binary Neural Network with High Accuracy?"
  (AAAI 2017): sign weights with no per-channel scale, because a PReLU after the binary layer
  absorbs it, in the order quantize -> conv -> PReLU -> BatchNorm (``prelu=true``: the ReLU right
  after the layer becomes a PReLU, followed by a BatchNorm where there is none); a learned scale
  factor on the layer's output (the paper's scale layer, which lets a binarized last layer train;
  folded into alpha when packed); the bipolar regularizer :func:`bipolar_regularizer`
  (``lambda * sum(1 - w^2)`` over latent weights kept in [-1, 1] by :func:`clip_latent`) in place of
  L2, which would pull the weights to 0; and a low learning rate that decays
  (:func:`tang_config`). Deployed: pure ±1 layers, alpha = the scale.
* ``tbn`` — TBN (Wan, Shen, Liu, Zhu, Qin, Shao & Shen, "TBN: Convolutional Neural Network with
  Ternary Inputs and Binary Weights", ECCV 2018): binary weights ``alpha sign(W)`` (alpha = mean
  |W| per output) and ternary inputs ``beta * T(x)`` with ``T = [x > Delta] - [x < -Delta]``,
  ``Delta = delta * mean|x|`` (``tbn_delta``, TWN's rule on the activations) and beta the mean |x|
  above the threshold. Delta and beta are batch statistics in training and running averages
  (momentum 0.1, as BatchNorm's) in eval, so the deployed layer has constants: it scales its input by
  ``1 / (2 Delta)`` and runs the ``ternary`` activation mode of the bit-serial op (two planes, sign
  and mask, ``c = [1, -1]``). :func:`tbn_dot` is the paper's accelerated ternary-binary dot product,
  ``popcount(I_m) - 2 popcount((I_s XOR W_s) AND I_m)``.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from compiler.errors import OptionError
from compiler.finetune import TrainConfig
from compiler.ops.bitserial import BitConv2d, BitLinear

from .binarization import DEFAULT_ACTIVATIONS, EXTENSIONS, QuantMixin, _SignSTE

TBN_MOMENTUM = 0.1


# ---- Bi-Real Net ---------------------------------------------------------------------------------------
def approx_sign_grad(x: torch.Tensor) -> torch.Tensor:
    """Bi-Real Net's ApproxSign derivative: 2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 elsewhere."""
    return torch.where(x.abs() < 1, 2 - 2 * x.abs(), torch.zeros_like(x))


class ApproxSign(_SignSTE):
    """The sign STE's forward (>= 0 -> +1); the piecewise polynomial's derivative backward."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * approx_sign_grad(x)


def _per_out_abs_mean(w: torch.Tensor) -> torch.Tensor:
    return w.abs().reshape(w.shape[0], -1).mean(1).reshape(-1, *([1] * (w.dim() - 1)))


class MagnitudeAwareSign(torch.autograd.Function):
    """``W_b = ||W_r||_1 / n * sign(W_r)`` per output; gradient ``g * ||W_r||_1 / n * 1{|W_r| < 1}``."""

    @staticmethod
    def forward(ctx, w):
        alpha = _per_out_abs_mean(w)
        ctx.save_for_backward(w, alpha)
        return torch.where(w >= 0, alpha, -alpha)

    @staticmethod
    def backward(ctx, g):
        w, alpha = ctx.saved_tensors
        return g * alpha * (w.abs() < 1).to(g.dtype)


# ---- TBN -----------------------------------------------------------------------------------------------
class _TernarySTE(torch.autograd.Function):
    """T(x) = [x > delta] - [x < -delta]; gradient passed where |x| <= 1 (the hardtanh STE)."""

    @staticmethod
    def forward(ctx, x, delta):
        ctx.save_for_backward(x)
        return (x > delta).to(x.dtype) - (x < -delta).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype), None


def tbn_dot(a: np.ndarray, w: np.ndarray) -> int:
    """TBN's accelerated ternary-binary dot product of ternary ``a`` (in {-1, 0, 1}) and binary ``w``
    (±1), on packed bits: ``popcount(I_m) - 2 popcount((I_s XOR W_s) AND I_m)``, with I_m the mask
    of nonzero inputs, I_s and W_s the sign bits."""
    pack = lambda bits: np.packbits(np.asarray(bits, bool))  # noqa: E731
    mask, sign, wsign = pack(a != 0), pack(a < 0), pack(w < 0)
    popcount = lambda v: int(np.unpackbits(v).sum())  # noqa: E731
    return popcount(mask) - 2 * popcount((sign ^ wsign) & mask)


class _TernaryInput:
    """The deployed TBN layer's input scaling: the threshold Delta lands at the op's 1/2."""

    in_scale: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.in_scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, in_scale={self.in_scale:.6g}"


class TernaryInputBitLinear(_TernaryInput, BitLinear):
    """BitLinear with TBN's ternary activations (``a_mode="ternary"`` on ``x * in_scale``)."""

    def __init__(self, *args, in_scale: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.in_scale = float(in_scale)


class TernaryInputBitConv2d(_TernaryInput, BitConv2d):
    """BitConv2d with TBN's ternary activations (``a_mode="ternary"`` on ``x * in_scale``)."""

    def __init__(self, *args, in_scale: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.in_scale = float(in_scale)


# ---- packing: sign planes, alpha per output -------------------------------------------------------------
def _pack_binary(layer: QuantMixin, alpha: torch.Tensor, in_scale: float | None = None) -> nn.Module:
    w = layer.weight.detach()
    planes, bias = (w >= 0)[None], layer.bias
    alpha = alpha.detach().reshape(-1).expand(w.shape[0]).clone()
    ternary = dict(in_scale=in_scale) if in_scale is not None else {}
    if isinstance(layer, nn.Linear):
        cls = TernaryInputBitLinear if ternary else BitLinear
        return cls(planes, [2.0], -1.0, alpha, bias, layer.a_mode, layer.a_bits, False, **ternary)
    cls = TernaryInputBitConv2d if ternary else BitConv2d
    return cls(planes, [2.0], -1.0, alpha, bias, layer.stride, layer.padding, layer.dilation, layer.a_mode,
               layer.a_bits, False, **ternary)


def _check_activations(layer: QuantMixin, allowed: tuple[str, ...]) -> None:
    if layer.a_mode not in allowed:
        raise OptionError(f"binarize: method={layer.method} takes activations {' or '.join(allowed)}, "
                          f"got activations={layer.a_mode}")


class BiReal:
    def init(self, layer: QuantMixin, **_) -> None:
        _check_activations(layer, ("sign", "float"))

    def weight(self, layer: QuantMixin) -> torch.Tensor:
        return MagnitudeAwareSign.apply(layer.weight)

    def input(self, layer: QuantMixin, x: torch.Tensor) -> torch.Tensor:
        return ApproxSign.apply(x) if layer.a_mode == "sign" else x

    def pack(self, layer: QuantMixin) -> nn.Module:
        return _pack_binary(layer, _per_out_abs_mean(layer.weight.detach()))

    def rewrite(self, graph, name: str, report, p) -> None:
        if p.shortcut:
            add_real_shortcut(graph, name, report)


class Tang:
    def init(self, layer: QuantMixin, **_) -> None:
        _check_activations(layer, ("sign", "float"))
        with torch.no_grad():   # the scale layer starts at the weights' mean magnitude
            layer.weight.clamp_(-1, 1)
            layer.tang_scale = nn.Parameter(layer.weight.abs().mean().reshape(()).clone())

    def weight(self, layer: QuantMixin) -> torch.Tensor:
        return _SignSTE.apply(layer.weight) * layer.tang_scale

    def input(self, layer: QuantMixin, x: torch.Tensor) -> torch.Tensor:
        return _SignSTE.apply(x) if layer.a_mode == "sign" else x

    def pack(self, layer: QuantMixin) -> nn.Module:
        return _pack_binary(layer, layer.tang_scale.detach())

    def rewrite(self, graph, name: str, report, p) -> None:
        if p.prelu:
            relu_to_prelu_bn(graph, name, report)


class TBN:
    def init(self, layer: QuantMixin, tbn_delta: float = 0.4, **_) -> None:
        _check_activations(layer, ("ternary",))
        layer.tbn_delta = float(tbn_delta)
        layer.register_buffer("tbn_threshold", torch.full((), -1.0))   # Delta; < 0: not yet seen
        layer.register_buffer("tbn_beta", torch.ones(()))

    def weight(self, layer: QuantMixin) -> torch.Tensor:
        return _SignSTE.apply(layer.weight) * _per_out_abs_mean(layer.weight.detach())

    def input(self, layer: QuantMixin, x: torch.Tensor) -> torch.Tensor:
        if layer.training or layer.tbn_threshold < 0:
            with torch.no_grad():
                delta = layer.tbn_delta * x.abs().mean()
                big = x.abs()[x.abs() > delta]
                beta = big.mean() if big.numel() else x.new_ones(())
                first = bool(layer.tbn_threshold < 0)
                m = 1.0 if first else TBN_MOMENTUM
                layer.tbn_threshold.mul_(1 - m).add_(m * delta)
                layer.tbn_beta.mul_(1 - m).add_(m * beta)
            if layer.training:
                return _TernarySTE.apply(x, delta) * beta
        return _TernarySTE.apply(x, layer.tbn_threshold) * layer.tbn_beta

    def pack(self, layer: QuantMixin) -> nn.Module:
        if float(layer.tbn_threshold) <= 0:
            raise OptionError("binarize: method=tbn packs its activation threshold and scale, measured on data: "
                              "run stage=train and fine-tune (or run a batch through the model) before stage=deploy")
        w = layer.weight.detach()
        delta = float(layer.tbn_threshold)
        return _pack_binary(layer, _per_out_abs_mean(w) * layer.tbn_beta, in_scale=0.5 / delta)

    def rewrite(self, graph, name: str, report, p) -> None:
        pass


EXTENSIONS.update(bireal=BiReal(), tang=Tang(), tbn=TBN())
DEFAULT_ACTIVATIONS.update(bireal="sign", tang="sign", tbn="ternary")


# ---- graph rewrites --------------------------------------------------------------------------------------
def _node_of(graph, name: str) -> fx.Node:
    return next(n for n in graph.module.graph.nodes if n.op == "call_module" and n.target == name)


def _is_module(graph, node, kinds) -> bool:
    return node.op == "call_module" and isinstance(graph.module.get_submodule(node.target), kinds)


def add_real_shortcut(graph, name: str, report) -> bool:
    """Bi-Real Net's shortcut: ``out = block(x) + x`` where the block is the layer ``name`` and the
    BatchNorm right after it (if any), when the block's input and output shapes match."""
    node = _node_of(graph, name)
    x_in, out = node.args[0], node
    users = list(node.users)
    if len(users) == 1 and _is_module(graph, users[0], (nn.BatchNorm1d, nn.BatchNorm2d)):
        out = users[0]
    shape_in, shape_out = x_in.meta.get("shape"), out.meta.get("shape")
    if shape_in is None or shape_in != shape_out:
        report.change(f"{name}: no Bi-Real shortcut (input {shape_in} and output {shape_out} differ)")
        return False
    fx_graph = graph.module.graph
    with fx_graph.inserting_after(out):
        added = fx_graph.call_function(operator.add, (out, x_in))
    added.meta.update({k: out.meta[k] for k in ("shape", "dtype") if k in out.meta})
    out.replace_all_uses_with(added, delete_user_cb=lambda user: user is not added)
    report.change(f"{name}: Bi-Real real-valued shortcut around {out.name} (shape {shape_in})")
    return True


def _is_relu(graph, node) -> bool:
    return (node.op == "call_function" and node.target in (F.relu, torch.relu)) or \
        (node.op == "call_method" and node.target == "relu") or _is_module(graph, node, nn.ReLU)


def relu_to_prelu_bn(graph, name: str, report) -> bool:
    """Tang et al.'s order quantize -> conv -> PReLU -> BN: the ReLU right after ``name`` becomes a
    PReLU (one slope per channel, 0.25), followed by a BatchNorm unless one is already there."""
    node = _node_of(graph, name)
    users = list(node.users)
    if len(users) != 1 or not _is_relu(graph, users[0]):
        report.change(f"{name}: no ReLU right after it (Tang's PReLU not added)")
        return False
    relu, layer = users[0], graph.module.get_submodule(name)
    shape = node.meta["shape"]   # (the layer there may be packed already: read the output's shape)
    channels, device = shape[1], next(iter(layer.buffers()), next(layer.parameters())).device
    base = name.replace(".", "_")
    graph.module.add_submodule(f"{base}_prelu", nn.PReLU(channels).to(device))
    fx_graph = graph.module.graph
    with fx_graph.inserting_after(relu):
        new = fx_graph.call_module(f"{base}_prelu", (node,))
    last = new
    nxt = list(relu.users)
    if not (len(nxt) == 1 and _is_module(graph, nxt[0], (nn.BatchNorm1d, nn.BatchNorm2d))):
        bn = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(channels)
        graph.module.add_submodule(f"{base}_bn", bn.to(device).train(layer.training))
        with fx_graph.inserting_after(new):
            last = fx_graph.call_module(f"{base}_bn", (new,))
    relu.replace_all_uses_with(last)
    fx_graph.erase_node(relu)
    report.change(f"{name}: relu -> PReLU{' + BatchNorm' if last is not new else ''} (Tang et al.)")
    return True


# ---- Tang et al.'s training ------------------------------------------------------------------------------
def _tang_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, QuantMixin) and m.method == "tang"]


def bipolar_regularizer(strength: float = 1e-4):
    """Tang et al.'s regularizer ``strength * sum(1 - w^2)`` over the latent weights of the ``tang``
    layers: with the weights in [-1, 1] (:func:`clip_latent`) it is >= 0 and zero at ±1 only."""
    if not strength >= 0:
        raise OptionError(f"bipolar_regularizer: strength must be >= 0, got {strength!r}")

    def regularizer(model: nn.Module) -> torch.Tensor:
        terms = [(1 - m.weight.pow(2)).sum() for m in _tang_layers(model)]
        return strength * torch.stack(terms).sum() if terms else torch.zeros(())
    return regularizer


def clip_latent(model: nn.Module, step: int = 0) -> None:
    """Keep the latent weights of the ``tang`` layers in [-1, 1] (a TrainConfig.step_callback)."""
    with torch.no_grad():
        for m in _tang_layers(model):
            m.weight.clamp_(-1, 1)


def tang_config(epochs: int = 10, lr: float = 1e-3, strength: float = 1e-4, **kwargs) -> TrainConfig:
    """Tang et al.'s training: a low learning rate annealed to 0 (cosine), the bipolar regularizer
    instead of weight decay, latent weights clipped to [-1, 1] after each step."""
    return TrainConfig(epochs=epochs, lr=lr, weight_decay=0.0, lr_schedule="cosine",
                       regularizer=bipolar_regularizer(strength), step_callback=clip_latent, **kwargs)
