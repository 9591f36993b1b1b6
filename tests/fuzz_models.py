"""Random models for the differential fuzzer (tests/test_fuzz.py): hypothesis strategies that draw
small graphs of the layers Squeezer compiles — convs of every kind (groups, stride, dilation,
padding, 1×1 and k×k, 1-channel and 1-pixel inputs), linears (1-wide, odd widths), 53 outputs
and 13 rows (padded to whole vectors and register tiles, then sliced), pooling, norms, activations,
add/cat/split, squeeze-excite gates and attention — with degenerate shapes included, and the
compression passes to apply to them.

A drawn model has several independent *branches*, each its own input and output, so that one TVM
build checks several cases (builds dominate the time); each branch is one fuzz case.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "hardtanh": nn.Hardtanh, "leaky": lambda: nn.LeakyReLU(0.1),
    "gelu": nn.GELU, "gelu-tanh": lambda: nn.GELU("tanh"), "silu": nn.SiLU, "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh, "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid, "elu": nn.ELU,
    "selu": nn.SELU, "mish": nn.Mish, "softplus": nn.Softplus, "identity": nn.Identity,
}


class Lambda(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x):
        if self.name == "softmax":
            return F.softmax(x, dim=1)
        if self.name == "log-softmax":
            return F.log_softmax(x, dim=-1)
        if self.name == "split-swap":
            a, b = torch.split(x, [x.shape[1] // 2, x.shape[1] - x.shape[1] // 2], dim=1)
            return torch.cat([b, a], dim=1)
        if self.name == "amax":
            return x.amax(dim=1, keepdim=True) + x
        raise AssertionError(self.name)

    def extra_repr(self) -> str:
        return self.name


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Concat(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        return torch.cat([x, self.body(x)], dim=1)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))


class Attention(nn.Module):
    """Self-attention over the tokens of a (batch, tokens, width) input."""

    def __init__(self, width: int, heads: int, kind: str) -> None:
        super().__init__()
        self.kind, self.heads = kind, heads
        if kind == "mha":
            self.mha = nn.MultiheadAttention(width, heads, batch_first=True)
        else:
            self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        if self.kind == "mha":
            return self.mha(x, x, x, need_weights=False)[0]
        b, t, w = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v) if self.kind == "sdpa" else \
            torch.softmax(q @ k.transpose(-1, -2) / (w // self.heads) ** 0.5, dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, t, w))


class Branches(nn.Module):
    """Independent branches, one input and one output each (``forward(x0, x1, ...)``: torch.fx
    traces named arguments, not ``*args``)."""

    def __init__(self, branches: list[nn.Module]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    @staticmethod
    def of(branches: list[nn.Module]) -> "Branches":
        names = [f"x{i}" for i in range(len(branches))]
        source = (f"def forward(self, {', '.join(names)}):\n"
                  f"    return ({''.join(f'self.branches[{i}]({n}), ' for i, n in enumerate(names))})\n")
        namespace: dict = {}
        exec(source, namespace)  # noqa: S102 - a fixed template
        cls = type(f"Branches{len(branches)}", (Branches,), {"forward": namespace["forward"]})
        return cls(branches)


@dataclass
class Case:
    model: Branches
    shapes: list[tuple[int, ...]]
    passes: list[str]
    default_schedules: bool
    variant_seed: int = 0   # where the NaN/inf go: part of the case, so a replay is the same run

    def inputs(self, seed: int = 0) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(*s, generator=g) for s in self.shapes)


def _conv(draw, c: int, h: int, w: int) -> tuple[nn.Module, tuple[int, int, int]]:
    k = draw(st.sampled_from([1, 1, 2, 3, 3, 5]))
    stride, dilation = draw(st.sampled_from([1, 1, 2, 3])), draw(st.sampled_from([1, 1, 2]))
    pad = draw(st.integers(0, (k // 2) * dilation))
    span = dilation * (k - 1) + 1
    if span > h + 2 * pad or span > w + 2 * pad:
        k, dilation, pad, span = 1, 1, 0, 1
    groups = draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
    out = groups * draw(st.integers(1, max(1, 8 // groups)))
    if groups == 1 and draw(st.integers(0, 9)) == 0:
        out = 53  # padded to whole vectors and sliced (pad_columns.py)
    conv = nn.Conv2d(c, out, k, stride, pad, dilation, groups, bias=draw(st.booleans()))
    return conv, (out, (h + 2 * pad - span) // stride + 1, (w + 2 * pad - span) // stride + 1)


def _pool(draw, c: int, h: int, w: int) -> tuple[nn.Module, tuple[int, int, int]]:
    kind = draw(st.sampled_from(["max", "avg", "adaptive"]))
    if kind == "adaptive":
        side = draw(st.integers(1, 2))
        return nn.AdaptiveAvgPool2d(side), (c, side, side)
    k = draw(st.integers(1, min(3, h, w)))
    stride, pad = draw(st.integers(1, 2)), draw(st.integers(0, k // 2))
    ceil = draw(st.booleans())
    pool = nn.MaxPool2d(k, stride, pad, ceil_mode=ceil) if kind == "max" else \
        nn.AvgPool2d(k, stride, pad, ceil_mode=ceil, count_include_pad=draw(st.booleans()))
    out = pool(torch.zeros(1, c, h, w)).shape
    return pool, (c, out[2], out[3])


def _norm(draw, c: int, h: int, w: int) -> tuple[nn.Module, tuple[int, int, int]]:
    kind = draw(st.sampled_from(["batch", "group", "layer"]))
    if kind == "batch":
        bn = nn.BatchNorm2d(c)
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        return bn, (c, h, w)
    if kind == "group":   # torch refuses a group of one value (no variance)
        groups = [g for g in range(1, c + 1) if c % g == 0 and (c // g) * h * w > 1]
        if groups:
            return nn.GroupNorm(draw(st.sampled_from(groups)), c), (c, h, w)
    if kind == "layer":
        return nn.LayerNorm([h, w]), (c, h, w)
    return nn.Identity(), (c, h, w)


def _image_layer(draw, shape: tuple[int, int, int]) -> tuple[nn.Module, tuple[int, int, int]]:
    c, h, w = shape
    kind = draw(st.sampled_from(["conv", "conv", "conv", "pool", "norm", "act", "residual", "concat",
                                 "split", "se", "softmax", "amax"]))
    if kind == "conv":
        return _conv(draw, c, h, w)
    if kind == "pool":
        return _pool(draw, c, h, w)
    if kind == "norm":
        return _norm(draw, c, h, w)
    if kind == "act":
        return ACTIVATIONS[draw(st.sampled_from(sorted(ACTIVATIONS)))](), shape
    if kind == "residual":
        return Residual(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=draw(st.sampled_from([1, c]))),
                                      nn.ReLU())), shape
    if kind == "concat" and c <= 8:
        return Concat(nn.Conv2d(c, c, 1)), (2 * c, h, w)
    if kind == "split" and c >= 2:
        return Lambda("split-swap"), shape
    if kind == "se":
        return SqueezeExcite(c, draw(st.integers(1, 4))), shape
    if kind in ("softmax", "amax"):
        return Lambda(kind), shape
    return nn.Identity(), shape


@st.composite
def image_branch(draw, max_layers: int = 4) -> tuple[nn.Module, tuple[int, ...]]:
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 6))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    layers, shape = [], (c, h, w)
    for _ in range(draw(st.integers(1, max_layers))):
        layer, shape = _image_layer(draw, shape)
        layers.append(layer)
    if draw(st.booleans()):
        layers += [nn.Flatten(), nn.Linear(shape[0] * shape[1] * shape[2], draw(st.integers(1, 7)))]
    return nn.Sequential(*layers), (n, c, h, w)


@st.composite
def vector_branch(draw, max_layers: int = 4) -> tuple[nn.Module, tuple[int, ...]]:
    n, f = draw(st.sampled_from([1, 2, 3, 3, 13])), draw(st.integers(1, 17))   # 13 rows: padded row tiles
    layers, width = [], f
    for _ in range(draw(st.integers(1, max_layers))):
        kind = draw(st.sampled_from(["linear", "linear", "act", "layernorm", "residual", "log-softmax"]))
        if kind == "linear":
            out = draw(st.sampled_from([*range(1, 18), 53]))
            layers.append(nn.Linear(width, out, bias=draw(st.booleans())))
            width = out
        elif kind == "act":
            layers.append(ACTIVATIONS[draw(st.sampled_from(sorted(ACTIVATIONS)))]())
        elif kind == "layernorm":
            layers.append(nn.LayerNorm(width))
        elif kind == "residual":
            layers.append(Residual(nn.Sequential(nn.Linear(width, width), nn.Tanh())))
        else:
            layers.append(Lambda("log-softmax"))
    return nn.Sequential(*layers), (n, f)


@st.composite
def sequence_branch(draw) -> tuple[nn.Module, tuple[int, ...]]:
    heads = draw(st.integers(1, 4))
    width = heads * draw(st.sampled_from([1, 2, 4, 8]))
    n, t = draw(st.integers(1, 2)), draw(st.integers(1, 9))
    attention = Attention(width, heads, draw(st.sampled_from(["mha", "sdpa", "explicit"])))
    layers = [Residual(attention), nn.LayerNorm(width)]
    if draw(st.booleans()):
        layers += [Residual(nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)))]
    return nn.Sequential(*layers), (n, t, width)


PASSES = st.one_of(
    st.just([]),
    st.builds(lambda s, p: [f"sparsify:sparsity={s},pattern={p}"], st.sampled_from([0.3, 0.5, 0.9]),
              st.sampled_from(["unstructured", "unstructured", "n:m"])),
    st.builds(lambda b, pc: [f"cluster:bits={b},per_channel={pc}"], st.sampled_from([1, 2, 4]), st.booleans()),
    st.builds(lambda r: [f"low-rank:rank={r},only_if_fewer_macs=false"], st.integers(1, 3)),
    st.builds(lambda r, c: [f"channel-pruning:ratio={r},criterion={c}"], st.sampled_from([0.25, 0.5]),
              st.sampled_from(["l1", "l2", "fpgm"])),
    st.builds(lambda m: [f"binarize:method={m},keep_first_last=false"],
              st.sampled_from(["xnor", "bnn", "binaryconnect", "dorefa", "twn", "abc"])),
    st.builds(lambda s: [f"sparsify:sparsity={s}", "cluster:bits=4"], st.sampled_from([0.5, 0.9])),
)


@st.composite
def cases(draw, max_branches: int = 6, max_layers: int = 4, min_branches: int = 1) -> Case:
    torch.manual_seed(draw(st.integers(0, 2 ** 16)))   # weights: replayed with the example
    kinds = draw(st.lists(st.sampled_from(["image", "image", "vector", "sequence"]), min_size=min_branches,
                          max_size=max_branches))
    strategies = {"image": image_branch(max_layers), "vector": vector_branch(max_layers), "sequence": sequence_branch()}
    drawn = [draw(strategies[k]) for k in kinds]
    model = Branches.of([m for m, _ in drawn])
    for m in model.modules():   # non-zero biases, so a bias added twice or dropped shows
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return Case(model.eval(), [s for _, s in drawn], draw(PASSES), draw(st.booleans()), draw(st.integers(0, 2 ** 16)))
