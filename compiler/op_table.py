"""The op table: one row per op, as torch.fx sees it — a module type (``call_module``), a function
(``call_function``) or a method name (``call_method``) — saying what the op does to channels and
how many multiply-accumulates it costs.

* ``channels`` — the op's rule in the channel-coupling analysis (``compiler.coupling``), one of
  :class:`Channels`. An op without a row is ``OPAQUE``: it freezes every channel it touches.
* ``axis`` — modules only: the axis whose channels the module consumes (1 for convs and norms
  over ``(N, C, ...)``, -1 for Linear/LayerNorm); the analysis checks the tracked channels are there.
* ``macs`` — the MAC rule of ``compiler.summarize`` (and of low-rank's MAC comparison). A module
  rule is ``macs(module, arg_shapes, out_shape)`` (shapes of ``node.args``); a function or method
  rule is ``macs(input_shapes, out_shape)`` (shapes of ``node.all_input_nodes``).
* ``node_macs`` — a function or method rule that needs more than the inputs' shapes (an einsum's
  equation, a window size): ``node_macs(node)`` (``compiler.argument_macs``).
* ``storage`` — modules only: ``storage(module, tensors, first_use) -> (params, bytes)``, the
  parameters and bytes as stored that ``summarize`` counts for one call (``tensors``: the module's
  parameters and buffers not counted yet; ``first_use``: none was). Default: the tensors as they are.
* ``keeps_sign`` — every value keeps its sign (pooling, dropout, reshapes): a ReLU before the op
  still makes its output non-negative (binarization looks through these for a ReLU).
* ``relu`` — the op is a ReLU (binarization turns it into a HardTanh before sign activations).
* ``note`` — why an ``OPAQUE`` op is frozen, when there is more to say than "not understood".

Adding an op is one row below. Module rows are found along the module's class hierarchy (the
first class with a row), so subclasses inherit their base's rule.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from .argument_macs import addmm_macs, einsum_macs, swin_attention_macs, window_attention_macs
from .ops.attention import HeadwiseAttention
from .ops.relative_attention import HeadwiseRelativeAttention
from .ops.window_attention import HeadwiseWindowAttention
from .ops.library import CompressedLayer


class Channels:
    """What an op does to the channels flowing through it (see ``compiler.coupling``)."""

    CONV = "conv"                # Conv2d: its filters start a channel space (grouped/depthwise: tied blocks)
    LINEAR = "linear"            # Linear over the last axis: its rows start a channel space
    NORM = "norm"                # per-channel parameters on axis 1 (BatchNorm, InstanceNorm); channels pass
    GROUP_NORM = "group-norm"    # per-channel parameters in equal groups; channels pass
    LAYER_NORM = "layer-norm"    # per-feature parameters on the last axis; channels pass
    ELEMENTWISE = "elementwise"  # value by value or over spatial positions: channels pass unchanged
    BINARY = "binary"            # broadcasting arithmetic: the operands' channels are tied together
    FLATTEN = "flatten"          # channels times positions become features
    VIEW = "view"                # view/reshape: keeps, flattens or splits the channel axis
    SPLIT = "split"              # split/chunk: each piece is a slice of the channels
    CAT = "cat"                  # concatenation: on the channel axis the layouts are appended
    REDUCE = "reduce"            # mean/sum/amax: channels survive a reduction over other axes
    PERMUTE = "permute"          # permute/transpose: the channels move with their axis (channels-last blocks)
    INDEX = "index"              # x[..., ::2, :]: slicing other axes; the channel axis taken whole
    EXPAND = "expand"            # expand: broadcast over other (or new leading) axes; channels pass
    ROLL = "roll"                # torch.roll over other axes (Swin's shifted windows): channels pass
    ATTENTION = "attention"      # multi-head attention: reads and writes channels, its heads prune whole
    PATCH_MERGE = "patch-merge"  # 2x2 space-to-depth on channels-last: the channels repeat 4 times
    EMBEDDING = "embedding"      # a table lookup: its columns start a channel space (a transformer's residual stream)
    SHAPE = "shape"              # size()/dim(): no tensor comes out
    OPAQUE = "opaque"            # not followed: everything it touches is frozen


@dataclass(frozen=True)
class OpRule:
    channels: str = Channels.OPAQUE
    axis: int | None = None
    macs: Callable[..., int] | None = None
    node_macs: Callable[[fx.Node], int] | None = None
    storage: Callable[..., tuple[int, int]] | None = None
    keeps_sign: bool = False
    relu: bool = False
    note: str = ""


OPAQUE = OpRule()


# ---- MAC rules --------------------------------------------------------------------------------------
def numel(shape: Any) -> int:
    return math.prod(shape) if shape and all(isinstance(d, int) for d in shape) else 0


def _first(arg_shapes: list) -> Any:
    return arg_shapes[0] if arg_shapes else None


def _tensor_storage(m: nn.Module, tensors: list, first_use: bool) -> tuple[int, int]:
    params = sum(t.numel() for t in tensors if isinstance(t, nn.Parameter))
    return params, sum(t.numel() * t.element_size() for t in tensors)


def _compressed_storage(m: CompressedLayer, tensors: list, first_use: bool) -> tuple[int, int]:
    """The dense layer's parameter count, and the packed storage at its real size (once)."""
    return (m.dense_params(), m.stored_bytes()) if first_use else (0, 0)


def _compressed_macs(m: CompressedLayer, arg_shapes: list, out_shape: Any) -> int:
    return m.macs(_first(arg_shapes), out_shape)


def _conv_transpose_macs(m: nn.Module, arg_shapes: list, out_shape: Any) -> int:
    return numel(_first(arg_shapes)) * (m.out_channels // m.groups) * math.prod(m.kernel_size)  # input scatters


def _conv_macs(m: nn.Module, arg_shapes: list, out_shape: Any) -> int:
    return numel(out_shape) * (m.in_channels // m.groups) * math.prod(m.kernel_size)


def _linear_macs(m: nn.Linear, arg_shapes: list, out_shape: Any) -> int:
    return numel(out_shape) * m.in_features


def _attention_macs(m: nn.MultiheadAttention, arg_shapes: list, out_shape: Any) -> int:
    if not (arg_shapes and len(arg_shapes) >= 2 and arg_shapes[0] and arg_shapes[1]):
        return 0
    q, k = arg_shapes[0], arg_shapes[1]
    if len(q) != 3 or len(k) != 3:
        return 0
    q_tokens, k_tokens = q[0] * q[1], k[0] * k[1]  # L*N either layout
    src_len = k[1] if m.batch_first else k[0]
    e = m.embed_dim
    # q projection, k and v projections, QK^T and AV, output projection
    return q_tokens * e * e + 2 * k_tokens * e * e + 2 * q_tokens * src_len * e + q_tokens * e * e


def _headwise_macs(m: HeadwiseAttention, arg_shapes: list, out_shape: Any) -> int:
    shapes = [s for s in arg_shapes[:3] if s]
    if len(shapes) < 3 or any(len(s) not in (2, 3) for s in shapes):
        return 0
    q, k, v = shapes
    q_tokens, k_tokens = math.prod(q[:-1]), math.prod(k[:-1])
    src_len = k[0] if len(k) == 2 else k[1] if m.batch_first else k[0]
    inner = m.num_heads * m.head_dim
    return (q_tokens * q[-1] * inner + k_tokens * (k[-1] + v[-1]) * inner + 2 * q_tokens * src_len * inner
            + q_tokens * inner * m.out_proj.out_features)


def _relative_attention_macs(m: HeadwiseRelativeAttention, arg_shapes: list, out_shape: Any) -> int:
    shape = _first(arg_shapes)
    if not shape or len(shape) != 4:
        return 0
    tokens, inner = numel(shape[:3]), m.num_heads * m.head_dim
    return tokens * (shape[3] * 3 * inner + 2 * shape[2] * inner + inner * m.merge.out_features)


def _window_attention_macs(m: HeadwiseWindowAttention, arg_shapes: list, out_shape: Any) -> int:
    shape = _first(arg_shapes)
    if not shape or len(shape) != 4:
        return 0
    return window_attention_macs(tuple(shape), tuple(m.window_size), m.num_heads * m.head_dim, m.proj.out_features)


def _matmul_macs(shapes: list, out_shape: Any) -> int:  # matmul and F.linear: out x the reduced dim
    return numel(out_shape) * shapes[0][-1] if shapes and shapes[0] else 0


def _conv_function_macs(shapes: list, out_shape: Any) -> int:
    return numel(out_shape) * numel(shapes[1][1:]) if len(shapes) > 1 and shapes[1] else 0


def _sdpa_macs(shapes: list, out_shape: Any) -> int:
    if len(shapes) < 3 or not shapes[0] or not shapes[1]:
        return 0
    q, k = shapes[0], shapes[1]
    return numel(q[:-1]) * k[-2] * q[-1] * 2  # QK^T and attn @ V


# ---- the rows -------------------------------------------------------------------------------------------
C = Channels
_PASS = OpRule(C.ELEMENTWISE)
_PASS_SIGN = OpRule(C.ELEMENTWISE, keeps_sign=True)
_RELU = OpRule(C.ELEMENTWISE, relu=True)

MODULES: dict[type, OpRule] = {
    nn.Conv2d: OpRule(C.CONV, axis=1, macs=_conv_macs),
    nn.modules.conv._ConvTransposeNd: OpRule(macs=_conv_transpose_macs),
    nn.modules.conv._ConvNd: OpRule(macs=_conv_macs),
    nn.Linear: OpRule(C.LINEAR, axis=-1, macs=_linear_macs),
    nn.Embedding: OpRule(C.EMBEDDING),
    nn.BatchNorm1d: OpRule(C.NORM, axis=1),
    nn.BatchNorm2d: OpRule(C.NORM, axis=1),
    nn.modules.batchnorm._BatchNorm: OpRule(axis=1),
    nn.InstanceNorm2d: OpRule(C.NORM, axis=1),
    nn.GroupNorm: OpRule(C.GROUP_NORM, axis=1),
    nn.LayerNorm: OpRule(C.LAYER_NORM, axis=-1),
    nn.ReLU: _RELU, nn.ReLU6: _RELU,
    nn.GELU: _PASS, nn.SiLU: _PASS, nn.Sigmoid: _PASS, nn.Tanh: _PASS, nn.Hardswish: _PASS,
    nn.Hardsigmoid: _PASS, nn.LeakyReLU: _PASS, nn.ELU: _PASS, nn.Mish: _PASS, nn.Upsample: _PASS,
    nn.Dropout: _PASS_SIGN, nn.Dropout2d: _PASS_SIGN, nn.Identity: _PASS_SIGN, nn.MaxPool2d: _PASS_SIGN,
    nn.AvgPool2d: _PASS_SIGN, nn.AdaptiveAvgPool2d: _PASS_SIGN, nn.AdaptiveMaxPool2d: _PASS_SIGN,
    nn.Flatten: OpRule(C.FLATTEN, keeps_sign=True),
    nn.MultiheadAttention: OpRule(C.ATTENTION, axis=-1, macs=_attention_macs),
    HeadwiseAttention: OpRule(C.ATTENTION, axis=-1, macs=_headwise_macs),
    HeadwiseWindowAttention: OpRule(C.ATTENTION, axis=-1, macs=_window_attention_macs),
    HeadwiseRelativeAttention: OpRule(C.ATTENTION, axis=-1, macs=_relative_attention_macs),
    CompressedLayer: OpRule(macs=_compressed_macs, storage=_compressed_storage),
}

FUNCTIONS: dict[Any, OpRule] = {
    F.relu: _RELU, torch.relu: _RELU, F.relu6: _RELU,
    F.gelu: _PASS, F.silu: _PASS, F.sigmoid: _PASS, F.tanh: _PASS, F.hardswish: _PASS, F.hardsigmoid: _PASS,
    F.leaky_relu: _PASS, F.elu: _PASS, F.mish: _PASS, F.dropout2d: _PASS, F.adaptive_max_pool2d: _PASS,
    F.interpolate: _PASS, torch.sigmoid: _PASS, torch.tanh: _PASS, torch.max_pool2d: _PASS, torch.dropout: _PASS,
    torch.pow: _PASS, operator.pow: _PASS, torch.erf: _PASS, torch.exp: _PASS, operator.neg: _PASS,
    torch.rsqrt: _PASS, torch.sqrt: _PASS, torch.abs: _PASS, torch.square: _PASS, torch.log: _PASS,
    F.dropout: _PASS_SIGN, F.max_pool2d: _PASS_SIGN, F.avg_pool2d: _PASS_SIGN, F.adaptive_avg_pool2d: _PASS_SIGN,
    **{op: OpRule(C.BINARY) for op in (operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
                                        operator.imul, torch.add, torch.sub, torch.mul, torch.div)},
    torch.flatten: OpRule(C.FLATTEN, keeps_sign=True),
    torch.reshape: OpRule(C.VIEW),
    torch.split: OpRule(C.SPLIT), torch.chunk: OpRule(C.SPLIT),
    torch.cat: OpRule(C.CAT), torch.concat: OpRule(C.CAT),
    torch.mean: OpRule(C.REDUCE), torch.sum: OpRule(C.REDUCE), torch.amax: OpRule(C.REDUCE),
    operator.getitem: OpRule(C.INDEX, keeps_sign=True),   # the walk follows split pieces itself
    torch.permute: OpRule(C.PERMUTE, keeps_sign=True), torch.transpose: OpRule(C.PERMUTE, keeps_sign=True),
    torch.swapaxes: OpRule(C.PERMUTE, keeps_sign=True), torch.swapdims: OpRule(C.PERMUTE, keeps_sign=True),
    F.layer_norm: OpRule(C.LAYER_NORM), torch.roll: OpRule(C.ROLL, keeps_sign=True),
    **{op: OpRule(macs=_matmul_macs) for op in (torch.matmul, torch.bmm, torch.mm, operator.matmul, F.linear)},
    **{op: OpRule(node_macs=addmm_macs) for op in (torch.addmm, torch.baddbmm, torch.addbmm)},
    torch.einsum: OpRule(node_macs=einsum_macs),
    **{op: OpRule(macs=_conv_function_macs) for op in (F.conv1d, F.conv2d, F.conv3d)},
    F.scaled_dot_product_attention: OpRule(macs=_sdpa_macs),
}

METHODS: dict[str, OpRule] = {
    "relu": _PASS, "sigmoid": _PASS, "tanh": _PASS, "clone": _PASS, "float": _PASS, "pow": _PASS,
    "rsqrt": _PASS, "sqrt": _PASS, "abs": _PASS, "exp": _PASS, "square": _PASS,
    "to": _PASS_SIGN, "type_as": _PASS_SIGN,   # dtype/device conversions (Llama's RMSNorm, GPT-2's positions)
    "contiguous": _PASS_SIGN,
    **{name: OpRule(C.BINARY) for name in ("add", "sub", "mul", "div", "add_", "mul_")},
    "flatten": OpRule(C.FLATTEN, keeps_sign=True),
    "view": OpRule(C.VIEW, keeps_sign=True), "reshape": OpRule(C.VIEW, keeps_sign=True),
    "split": OpRule(C.SPLIT), "chunk": OpRule(C.SPLIT),
    "mean": OpRule(C.REDUCE), "sum": OpRule(C.REDUCE), "amax": OpRule(C.REDUCE),
    "size": OpRule(C.SHAPE), "dim": OpRule(C.SHAPE),
    "permute": OpRule(C.PERMUTE, keeps_sign=True), "transpose": OpRule(C.PERMUTE, keeps_sign=True),
    "swapaxes": OpRule(C.PERMUTE, keeps_sign=True), "swapdims": OpRule(C.PERMUTE, keeps_sign=True),
    "expand": OpRule(C.EXPAND, keeps_sign=True), "roll": OpRule(C.ROLL, keeps_sign=True),
    **{name: OpRule(macs=_matmul_macs) for name in ("matmul", "bmm", "mm")},
    **{name: OpRule(node_macs=addmm_macs) for name in ("addmm", "baddbmm", "addbmm")},
}
def _conv1d_macs(m: nn.Module, arg_shapes: list, out_shape: Any) -> int:
    return numel(out_shape) * m.weight.shape[0]


# Layers of optional libraries, by qualified name (``compiler`` imports none of them); tracing
# keeps them whole. Hugging Face's Conv1D (GPT-2) is a Linear with its weight stored (in, out).
NAMED_MODULES: dict[str, OpRule] = {
    "transformers.pytorch_utils.Conv1D": OpRule(C.LINEAR, axis=-1, macs=_conv1d_macs),
}
# Functions of optional libraries, by qualified name (``compiler`` imports neither): per-sample
# stochastic depth / drop path scales whole samples, so channels pass (and eval mode is identity)
NAMED_FUNCTIONS: dict[str, OpRule] = {
    "torchvision.ops.stochastic_depth.stochastic_depth": _PASS_SIGN,
    "timm.layers.drop.drop_path": _PASS_SIGN,
    "timm.models.layers.drop.drop_path": _PASS_SIGN,
    "torchvision.models.swin_transformer._patch_merging_pad": OpRule(C.PATCH_MERGE),
    "torchvision.models.swin_transformer.shifted_window_attention": OpRule(node_macs=swin_attention_macs),
}


# ---- lookups ---------------------------------------------------------------------------------------------
def qualified_name(obj: Any) -> str:
    """``module.qualname`` of a class or function: how rows of optional libraries are named."""
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"


def module_rule(m: Any) -> OpRule:
    """The row of the first class in ``m``'s hierarchy that has one (OPAQUE if none)."""
    for cls in type(m).__mro__:
        rule = MODULES.get(cls) or NAMED_MODULES.get(qualified_name(cls))
        if rule is not None:
            return rule
    return OPAQUE


def is_named_leaf(m: Any) -> bool:
    """A layer of an optional library that tracing keeps whole (its row names it)."""
    return any(qualified_name(cls) in NAMED_MODULES for cls in type(m).__mro__)


def function_rule(target: Any) -> OpRule:
    try:
        rule = FUNCTIONS.get(target)
    except TypeError:  # an unhashable callable has no row
        return OPAQUE
    if rule is None:
        rule = NAMED_FUNCTIONS.get(qualified_name(target), OPAQUE)
    return rule


def node_rule(node: fx.Node, modules: dict[str, nn.Module]) -> OpRule:
    """The row of what ``node`` calls (``modules``: the graph module's ``named_modules()``)."""
    if node.op == "call_module":
        return module_rule(modules.get(node.target))
    if node.op == "call_function":
        return function_rule(node.target)
    if node.op == "call_method":
        return METHODS.get(node.target, OPAQUE)
    return OPAQUE


def module_macs(m: nn.Module, arg_shapes: list, out_shape: Any) -> int:
    rule = module_rule(m)
    return rule.macs(m, arg_shapes, out_shape) if rule.macs else 0


def module_storage(m: nn.Module, tensors: list, first_use: bool) -> tuple[int, int]:
    """(parameters, bytes as stored) of one call of ``m`` (see ``OpRule.storage``)."""
    return (module_rule(m).storage or _tensor_storage)(m, tensors, first_use)


def call_macs(node: fx.Node) -> int:
    """MACs of a ``call_function`` or ``call_method`` node, from its arguments and the shapes its
    inputs and output carry."""
    rule = function_rule(node.target) if node.op == "call_function" else METHODS.get(node.target, OPAQUE)
    if rule.node_macs:
        return rule.node_macs(node)
    if not rule.macs:
        return 0
    return rule.macs([a.meta.get("shape") for a in node.all_input_nodes], node.meta.get("shape"))
