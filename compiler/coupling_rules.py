"""The coupling analysis's rule for each kind of op (``compiler.op_table.Channels``): how a node
of that kind maps the layouts of its inputs to its output's, which parameters it consumes, and
which spaces it ties or freezes. A rule returns whether it understood the node; the analysis
(``compiler.coupling``) freezes what no rule understood."""

from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from . import coupling_views as views
from .channel_spaces import Consumer, Layout
from .op_table import Channels

Analysis = Any  # a compiler.coupling.CouplingAnalysis (which imports this module, so not imported here)


# ---- module rules: (analysis, node, module, input layout) -> handled ---------------------------
def conv(a: Analysis, node: fx.Node, m: nn.Conv2d, x: tuple[Layout, int]) -> bool:
    if x[1] != 1:
        return False
    lay, name = x[0], node.target
    if m.groups == 1:
        a.consumers.append(Consumer(name, "in", lay))
        a.output_space(node, name, m.out_channels, lay, cdim=1)
    elif m.groups == m.in_channels == m.out_channels:  # depthwise: channels pass through
        a.consumers.append(Consumer(name, "param", lay))
        a.reuse(name, lay, lay)
        a.layout[node] = (lay, 1)
    elif a.spaces.tie_blocks(lay, m.groups, f"{name}: grouped conv (groups={m.groups})"):
        a.consumers.append(Consumer(name, "grouped", lay))
        a.output_space(node, name, m.out_channels, lay, cdim=1)
        a.spaces.tie_blocks(a.layout[node][0], m.groups, f"{name}: grouped conv (groups={m.groups})")
    else:
        a.fresh(node, f"{name}: grouped conv input not understood")
    return True


def linear(a: Analysis, node: fx.Node, m: nn.Linear, x: tuple[Layout, int]) -> bool:
    if x[1] != len(a.shape(node.args[0]) or ()) - 1:
        return False
    a.consumers.append(Consumer(node.target, "in", x[0]))
    a.output_space(node, node.target, m.out_features, x[0], cdim=x[1])
    return True


def norm(a: Analysis, node: fx.Node, m: nn.Module, x: tuple[Layout, int]) -> bool:
    if x[1] != 1:
        return False
    if any(True for _ in m.parameters()) or getattr(m, "running_mean", None) is not None:
        a.consumers.append(Consumer(node.target, "param", x[0]))
    a.layout[node] = x
    return True


def group_norm(a: Analysis, node: fx.Node, m: nn.GroupNorm, x: tuple[Layout, int]) -> bool:
    if x[1] != 1:
        return False
    if a.spaces.tie_blocks(x[0], m.num_groups, f"{node.target}: GroupNorm (groups={m.num_groups})"):
        if m.affine:
            a.consumers.append(Consumer(node.target, "param", x[0]))
        a.layout[node] = x
    else:
        a.fresh(node, f"{node.target}: GroupNorm input not understood")
    return True


def layer_norm(a: Analysis, node: fx.Node, m: nn.LayerNorm, x: tuple[Layout, int]) -> bool:
    if len(m.normalized_shape) != 1 or x[1] != len(a.shape(node.args[0]) or ()) - 1:
        return False
    a.consumers.append(Consumer(node.target, "param", x[0]))
    a.layout[node] = x
    return True


def module_passes(a: Analysis, node: fx.Node, m: nn.Module, x: tuple[Layout, int]) -> bool:
    a.layout[node] = x
    return True


def module_flatten(a: Analysis, node: fx.Node, m: nn.Flatten, x: tuple[Layout, int]) -> bool:
    a.flatten(node, x, m.start_dim, m.end_dim)
    return True


# ---- function and method rules: (analysis, node, first input's layout or None) -> handled -------
def passes(a: Analysis, node: fx.Node, first: tuple[Layout, int] | None) -> bool:
    if first is None:
        return False
    out_shape, in_shape = a.shape(node), a.shape(node.args[0])
    if not (out_shape and in_shape and len(out_shape) == len(in_shape) and out_shape[first[1]] == in_shape[first[1]]):
        return False
    a.layout[node] = first
    return True


def view(a: Analysis, node: fx.Node, first: tuple[Layout, int] | None) -> bool:
    return first is not None and views.view(a, node, first)


def split(a: Analysis, node: fx.Node, first: tuple[Layout, int] | None) -> bool:
    return first is not None and views.split(a, node, first)


def flatten_call(a: Analysis, node: fx.Node, first: tuple[Layout, int] | None) -> bool:
    if first is None:
        return False
    args = node.args
    start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
    end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
    a.flatten(node, first, start, end)
    return True


def reduce(a: Analysis, node: fx.Node, first: tuple[Layout, int] | None) -> bool:
    """Reduced over spatial dims only: channel dim 1 survives."""
    args, in_shape, out_shape = node.args, a.shape(node.args[0]), a.shape(node)
    dims = args[1] if len(args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis"))
    dims = [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, (tuple, list)) else None
    reduced = None if dims is None or not in_shape else {d % len(in_shape) for d in dims}
    if first is not None and in_shape and out_shape and first[1] == 1 and len(out_shape) >= 2 \
            and reduced is not None and not reduced & {0, 1} and out_shape[1] == in_shape[1]:
        a.layout[node] = first
        return True
    return False


def binary(a: Analysis, node: fx.Node, first: tuple[Layout, int] | None = None) -> bool:
    out_shape = a.shape(node)
    tensors = [arg for arg in node.args if isinstance(arg, fx.Node) and arg in a.layout]
    if not out_shape or not tensors:
        a.freeze_node(node, f"{node.name}: binary op on untracked operands")
        return True
    cdims = {a.layout[arg][1] for arg in tensors}
    if len(cdims) != 1:
        a.freeze_node(node, f"{node.name}: operands disagree on the channel axis")
        return True
    cdim = cdims.pop()
    full = [arg for arg in tensors if (a.shape(arg) or ())[cdim:cdim + 1] == (out_shape[cdim],)]

    def along_channels(arg: fx.Node) -> int:  # the operand's size on the output's channel axis
        shape = a.shape(arg)
        if shape is None:
            return -1
        d = cdim % len(out_shape) - (len(out_shape) - len(shape))   # broadcasting aligns from the right
        return shape[d] if d >= 0 else 1

    untracked = [arg for arg in node.args if isinstance(arg, fx.Node) and arg not in a.layout
                 and along_channels(arg) != 1]
    if not full or untracked:
        a.freeze_node(node, f"{node.name}: broadcast along the channel axis not understood")
        return True
    base = a.layout[full[0]][0]
    for other in full[1:]:
        a.spaces.tie(base, a.layout[other][0], f"{node.name} ({getattr(node.target, '__name__', node.target)})")
    a.layout[node] = (base, cdim)
    return True


def cat(a: Analysis, node: fx.Node, first: tuple[Layout, int] | None = None) -> bool:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    lays = [a.layout.get(t) for t in tensors]
    if any(lay is None for lay in lays) or len({lay[1] for lay in lays}) != 1:
        a.freeze_node(node, f"{node.name}: cat of untracked tensors")
        return True
    cdim = lays[0][1]
    ndim = len(a.shape(node) or ())
    if dim % max(ndim, 1) == cdim % max(ndim, 1):
        a.layout[node] = (tuple(seg for lay in lays for seg in lay[0]), cdim)
    else:  # concatenated along another axis: every input has the same channels
        for lay in lays[1:]:
            a.spaces.tie(lays[0][0], lay[0], f"{node.name} (cat on dim {dim})")
        a.layout[node] = lays[0]
    return True


MODULE_RULES: dict[str, Callable[..., bool]] = {
    Channels.CONV: conv,
    Channels.LINEAR: linear,
    Channels.NORM: norm,
    Channels.GROUP_NORM: group_norm,
    Channels.LAYER_NORM: layer_norm,
    Channels.ELEMENTWISE: module_passes,
    Channels.FLATTEN: module_flatten,
}
FUNCTION_RULES: dict[str, Callable[..., bool]] = {
    Channels.ELEMENTWISE: passes,
    Channels.VIEW: view,
    Channels.SPLIT: split,
    Channels.FLATTEN: flatten_call,
    Channels.REDUCE: reduce,
    Channels.BINARY: binary,
    Channels.CAT: cat,
}
