"""Low-bit methods of the survey (issue 23): Local Binary CNN as its own pass (``local-binary``) and
ADMM-trained power-of-two weights as a method of ``binarize`` (``binarize:method=admm``, through the
``EXTENSIONS`` hooks of passes/binarization.py). Both deploy onto the bit-plane layers of
compiler/ops/bitserial.py (``squeezer::bitserial_*``), whose compiled kernels run the planes.

* ``local-binary`` — Local Binary Convolution (Juefei-Xu, Boddeti & Savvides, "Local Binary
  Convolutional Neural Networks", CVPR 2017). A Conv2d ``C -> N`` becomes the LBC module:

  - ``m`` anchor filters (``anchors``; 0: as many as the layer's outputs) with fixed sparse
    binary weights in {-1, 0, +1}, generated once and never learned: exactly
    ``floor(sparsity * numel)`` positions are non-zero (the paper's "sparsity level" is this
    fraction of non-zero weights, as its code, ``RandomBinaryConvolution.lua``, draws them), each
    non-zero a fair ±1 (Bernoulli 0.5), from ``seed``;
  - a non-linearity (``activation=relu``, the paper's choice, or ``sigmoid``) on the ``m``
    difference maps, giving the bit maps;
  - a learnable 1x1 convolution ``m -> N`` (with bias) combining them. Only this layer learns:
    the anchors are a buffer, not a parameter, so no optimizer ever sees them.

  ``stage=train`` gives the anchors as :class:`AnchorConv2d` (a Conv2d whose weight is a buffer)
  to train the 1x1 combination; ``stage=deploy`` (default) stores them as a ternary bit-plane
  layer (two planes, ``[b > 0]`` and ``[b < 0]``, coefficients ``[1, -1]``, float activations —
  how ``twn``/``ttq`` deploy), whose kernel adds and subtracts the selected inputs. The 1x1
  combination stays fp32 (the paper learns it in full precision).
* ``admm`` — Leng, Dou, Li, Zhu & Jin, "Extremely Low Bit Neural Network: Squeeze the Last Bit Out
  with ADMM", AAAI 2018. Each layer's weights are constrained to ``C = alpha * {0, ±1, ±2, ...,
  ±2^N}`` (one alpha per layer; ``w_bits=b``: the largest such set that fits b-bit codes,
  ``N = 2^(b-1) - 2``: b=2 ternary, b=3 {0, ±1, ±2, ±4}, b=4 up to ±64; ``w_bits=1``: binary
  {±1}). The problem ``min f(W) + I_C(G) s.t. W = G`` is solved by ADMM with scaled dual U:

  - W-step: a few SGD steps on ``f(W) + (rho/2) ||W - G + U||^2`` (:func:`admm_regularizer`; the
    network runs the full-precision W while training);
  - G-step: ``G = Proj_C(W + U)`` (:func:`admm_project`): alternate the closed-form scale
    ``alpha = <V, Q> / <Q, Q>`` (least squares for fixed codes) and the codes
    ``Q = nearest allowed value of V / alpha``, until the codes stop changing;
  - dual: ``U = U + W - G``. :func:`admm_callback` runs the G and U steps every ``every``
    optimizer steps and records the residual ``||W - G||`` (``layer.admm_residuals``).

  The final weights are the projection ``Proj_C(W)``: alpha times integer codes, deployed as
  two's-complement bit-planes (coefficients 2^j and -2^(bits), alpha the per-output scale), as
  INQ's power-of-two weights are — exactly ``alpha * codes``.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compiler import Pass, PassReport, register_pass
from compiler.errors import OptionError
from compiler.finetune import TrainConfig
from compiler.graph import Graph
from compiler.ops.bitserial import BitConv2d, BitLinear

from .binarization import EXTENSIONS, QuantMixin

LBC_ACTIVATIONS = ("relu", "sigmoid")


# ---- Local Binary CNN ---------------------------------------------------------------------------------------
def lbc_anchor_weights(shape: tuple[int, ...], sparsity: float, seed: int = 0) -> torch.Tensor:
    """The paper's fixed anchor weights: ``floor(sparsity * numel)`` positions drawn at random hold a
    fair ±1 (Bernoulli 0.5), the rest 0."""
    if not 0.0 < sparsity <= 1.0:
        raise OptionError(f"local-binary: option 'sparsity'={sparsity!r} is invalid; allowed: (0, 1]")
    gen = torch.Generator().manual_seed(int(seed))
    numel = math.prod(shape)
    chosen = torch.randperm(numel, generator=gen)[:int(math.floor(sparsity * numel))]
    signs = torch.bernoulli(torch.full((chosen.numel(),), 0.5), generator=gen) * 2 - 1
    w = torch.zeros(numel)
    w[chosen] = signs
    return w.reshape(shape)


class AnchorConv2d(nn.Conv2d):
    """A Conv2d whose weight is a fixed buffer (LBC's anchor weights): never a parameter, never learned."""

    squeezer_leaf = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 anchor: torch.Tensor | None = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=False)
        del self.weight
        self.register_buffer("weight", anchor.clone() if anchor is not None else torch.zeros(
            out_channels, in_channels, *self.kernel_size))

    def pack(self) -> BitConv2d:
        """Two bit-planes (+1 and -1 positions), coefficients [1, -1]: a ternary weight."""
        w = self.weight.detach()
        return BitConv2d(torch.stack([w > 0, w < 0]), [1.0, -1.0], 0.0, torch.ones(w.shape[0]), None,
                         self.stride, self.padding, self.dilation, "float", 1)


class LocalBinaryBlock(nn.Module):
    """Holds an LBC module's anchors (``anchor``) and 1x1 combination (``combine``); the graph calls
    ``anchor -> activation -> combine``."""

    def __init__(self, anchor: nn.Module, combine: nn.Conv2d, activation: str) -> None:
        super().__init__()
        self.anchor, self.combine, self.activation = anchor, combine, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.anchor(x)
        return self.combine(F.relu(h) if self.activation == "relu" else torch.sigmoid(h))


@register_pass
@dataclass(frozen=True)
class LocalBinaryConv(Pass):
    """Local Binary Convolution: fixed sparse ±1/0 anchors, a non-linearity, a learned 1x1 (module docstring)."""

    name = "local-binary"
    verify_tolerance = None
    reported = ("params", "stored_bytes")

    stage: str = "deploy"               # "train": anchors as a fixed fp32 buffer; "deploy": ternary bit-planes
    sparsity: float = 0.5               # fraction of non-zero anchor weights (the paper's sparsity level)
    anchors: int = 0                    # m anchor filters; 0: the layer's output channels
    activation: str = "relu"            # relu | sigmoid
    seed: int = 0
    layers: tuple[str, ...] = ()        # patterns of convs to replace (default: all but the first)
    exclude: tuple[str, ...] = ()
    keep_first_last: bool = True

    def validate(self) -> None:
        self.check_choice("stage", ("train", "deploy"))
        self.check_choice("activation", LBC_ACTIVATIONS)
        self.check_range("sparsity", 0.0, 1.0, lo_open=True)
        self.check_range("anchors", 0, 1 << 16, integer=True)
        self.check_range("seed", 0, None, integer=True)
        self.check_pattern_tuples("layers", "exclude")

    def requires(self, graph: Graph) -> None:
        self.check_patterns(graph, "layers/exclude", (*self.layers, *self.exclude))

    def run(self, graph: Graph, report: PassReport) -> Graph:
        mods = dict(graph.module.named_modules())
        for name, m in list(graph.layers().items()):   # trained blocks: pack their anchors
            parent = mods.get(name.rpartition(".")[0])
            if isinstance(m, AnchorConv2d) and isinstance(parent, LocalBinaryBlock) and self.stage == "deploy":
                graph.module.set_submodule(name, m.pack())
                report.change(f"{name}: fixed anchors -> ternary bit-planes (BitConv2d)")
        convs = {n: m for n, m in graph.layers().items() if type(m) is nn.Conv2d
                 and not isinstance(mods.get(n.rpartition(".")[0]), LocalBinaryBlock)}
        order = list(convs)
        first = {order[0]} if order and self.keep_first_last else set()
        for i, (name, m) in enumerate(convs.items()):
            if not self.selects(name, report):
                continue
            if name in first and not (self.layers and any(fnmatch.fnmatchcase(name, p) for p in self.layers)):
                report.skip(name, "first conv kept in full precision (keep_first_last=false to change)")
                continue
            if m.groups != 1 or isinstance(m.padding, str) or m.padding_mode != "zeros":
                report.skip(name, "grouped conv or non-numeric/non-zero padding is not replaced")
                continue
            self._replace(graph, name, m, i)
            report.change(f"{name}: Conv2d -> local binary conv ({self._m(m)} anchors {m.in_channels}x"
                          f"{'x'.join(map(str, m.kernel_size))}, sparsity {self.sparsity}, {self.activation}, "
                          f"1x1 {self._m(m)} -> {m.out_channels}; anchors {'fixed fp32' if self.stage == 'train' else 'ternary bit-planes'})")
        return graph

    def _m(self, m: nn.Conv2d) -> int:
        return self.anchors or m.out_channels

    def _replace(self, graph: Graph, name: str, m: nn.Conv2d, index: int) -> None:
        count = self._m(m)
        weights = lbc_anchor_weights((count, m.in_channels, *m.kernel_size), self.sparsity, self.seed + index)
        anchor = AnchorConv2d(m.in_channels, count, m.kernel_size, m.stride, m.padding, m.dilation, weights)
        combine = nn.Conv2d(count, m.out_channels, 1)
        block = LocalBinaryBlock(anchor.pack() if self.stage == "deploy" else anchor, combine, self.activation)
        graph.module.set_submodule(name, block.to(m.weight.device).train(m.training))
        fx_graph = graph.module.graph
        act = F.relu if self.activation == "relu" else torch.sigmoid
        for node in [n for n in fx_graph.nodes if n.op == "call_module" and n.target == name]:
            with fx_graph.inserting_before(node):
                h = fx_graph.call_module(f"{name}.anchor", (node.args[0],))
                h = fx_graph.call_function(act, (h,))
                out = fx_graph.call_module(f"{name}.combine", (h,))
            node.replace_all_uses_with(out)
            fx_graph.erase_node(node)


# ---- ADMM: alpha * {0, ±1, ±2, ..., ±2^N} ------------------------------------------------------------------
def admm_magnitudes(w_bits: int) -> list[float]:
    """The allowed code magnitudes for ``w_bits``: [1] (binary, no 0) or [0, 1, 2, ..., 2^N]."""
    if w_bits == 1:
        return [1.0]
    if not 2 <= w_bits <= 4:
        raise OptionError(f"binarize: method=admm takes w_bits 1..4 (alpha * {{0, ±1, ..., ±2^N}}, "
                          f"N = 2^(w_bits-1) - 2), got w_bits={w_bits}")
    return [0.0] + [2.0 ** j for j in range(2 ** (w_bits - 1) - 1)]


def admm_nearest(t: torch.Tensor, magnitudes: list[float]) -> torch.Tensor:
    """The nearest allowed code to each entry of ``t`` (ties to the smaller magnitude)."""
    if magnitudes == [1.0]:
        return torch.where(t >= 0, 1.0, -1.0).to(t.dtype)
    mags = torch.tensor(magnitudes, dtype=t.dtype)
    nearest = mags[(t.abs().unsqueeze(-1) - mags).abs().argmin(-1)]
    return torch.sign(t) * nearest


def admm_project(v: torch.Tensor, w_bits: int, max_iters: int = 100) -> tuple[float, torch.Tensor]:
    """``argmin_{alpha, Q} ||v - alpha Q||`` over codes Q in the allowed set: from several starting
    scales, alternate ``Q = nearest(v / alpha)`` and ``alpha = <v, Q> / <Q, Q>`` until the codes stop
    changing; the best fixed point (float64 alpha, codes) is returned."""
    mags = admm_magnitudes(w_bits)
    v = v.detach().double().reshape(-1)
    mean, top = float(v.abs().mean()), float(v.abs().max())
    if top == 0.0:
        return 1.0, admm_nearest(v, mags)
    starts = [mean * c for c in (0.5, 0.75, 1.0, 1.5, 2.0)] + [top / max(mags)]
    best = None
    for alpha in starts:
        q = admm_nearest(v / alpha, mags)
        for _ in range(max_iters):
            qq = float(q @ q)
            if qq == 0.0:
                break
            alpha = float(v @ q) / qq
            if alpha <= 0:
                break
            q_next = admm_nearest(v / alpha, mags)
            if torch.equal(q_next, q):
                break
            q = q_next
        err = float((v - alpha * q).norm())
        if alpha > 0 and (best is None or err < best[0]):
            best = (err, alpha, q)
    if best is None:
        return 1.0, torch.zeros_like(v)
    return best[1], best[2]


def _admm_layers(model: nn.Module) -> list[QuantMixin]:
    return [m for m in model.modules() if isinstance(m, QuantMixin) and m.method == "admm"]


class ADMM:
    def init(self, layer: QuantMixin, **_) -> None:
        if layer.a_mode != "float":
            raise OptionError(f"binarize: method=admm quantizes weights only: activations=float, got "
                              f"activations={layer.a_mode}")
        admm_magnitudes(layer.w_bits)   # checks w_bits
        w = layer.weight.detach()
        alpha, q = admm_project(w, layer.w_bits)
        layer.register_buffer("admm_G", (alpha * q).reshape(w.shape).to(w.dtype))
        layer.register_buffer("admm_U", torch.zeros_like(w))
        layer.admm_residuals = [float((w - layer.admm_G).norm())]

    def weight(self, layer: QuantMixin) -> torch.Tensor:
        return layer.weight          # the W-step trains the full-precision weights

    def input(self, layer: QuantMixin, x: torch.Tensor) -> torch.Tensor:
        return x

    def pack(self, layer: QuantMixin) -> nn.Module:
        w = layer.weight.detach()
        alpha, q = admm_project(w, layer.w_bits)
        alpha32 = torch.tensor(alpha, dtype=torch.float32).expand(w.shape[0]).clone()
        qi = q.reshape(w.shape).to(torch.int64)
        if layer.w_bits == 1:
            planes, coef = (qi > 0)[None], [2.0]
            offset = -1.0
        else:   # two's complement: magnitude planes 2^j and a sign plane -2^bits
            bits = max(1, int(qi.abs().max()).bit_length())
            u = qi & ((1 << (bits + 1)) - 1)
            planes = torch.stack([((u >> j) & 1).bool() for j in range(bits + 1)])
            coef, offset = [2.0 ** j for j in range(bits)] + [-(2.0 ** bits)], 0.0
        if isinstance(layer, nn.Linear):
            return BitLinear(planes, coef, offset, alpha32, layer.bias, "float", 1, False)
        return BitConv2d(planes, coef, offset, alpha32, layer.bias, layer.stride, layer.padding, layer.dilation,
                         "float", 1, False)

    def rewrite(self, graph, name: str, report, p) -> None:
        pass


EXTENSIONS.update(admm=ADMM())


def admm_regularizer(rho: float = 10.0):
    """ADMM's augmented-Lagrangian term ``(rho / 2) sum ||W - G + U||^2`` over the ``admm`` layers."""
    if not (isinstance(rho, (int, float)) and rho > 0):
        raise OptionError(f"admm_regularizer: rho must be > 0, got {rho!r}")

    def regularizer(model: nn.Module) -> torch.Tensor:
        terms = [(m.weight - m.admm_G + m.admm_U).pow(2).sum() for m in _admm_layers(model)]
        return 0.5 * rho * torch.stack(terms).sum() if terms else torch.zeros(())
    return regularizer


def admm_update(model: nn.Module) -> None:
    """The G-step ``G = Proj_C(W + U)`` and the dual step ``U = U + W - G`` on every ``admm`` layer;
    the residual ``||W - G||`` is appended to ``layer.admm_residuals``."""
    with torch.no_grad():
        for m in _admm_layers(model):
            v = m.weight + m.admm_U
            alpha, q = admm_project(v, m.w_bits)
            m.admm_G.copy_((alpha * q).reshape(v.shape))
            m.admm_U.add_(m.weight - m.admm_G)
            m.admm_residuals.append(float((m.weight - m.admm_G).norm()))


def admm_callback(every: int = 15):
    """A TrainConfig.step_callback running :func:`admm_update` every ``every`` optimizer steps."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise OptionError(f"admm_callback: every must be an integer >= 1, got {every!r}")

    def callback(model: nn.Module, step: int) -> None:
        if step % every == 0:   # steps count from 1
            admm_update(model)
    return callback


def admm_config(epochs: int = 10, lr: float = 1e-3, rho: float = 10.0, every: int = 15, **kwargs) -> TrainConfig:
    """Leng et al.'s training: the W-step on the loss plus the augmented-Lagrangian term, the G and
    dual steps every ``every`` optimizer steps."""
    return TrainConfig(epochs=epochs, lr=lr, regularizer=admm_regularizer(rho), step_callback=admm_callback(every),
                       **kwargs)
