"""Reshapes the coupling analysis follows (``compiler.coupling``): a view/reshape that keeps,
flattens or splits the channel axis, the rest of a channel shuffle on a ``(G, C/G)``-split tensor,
and split/chunk along the channel axis. Each takes the running analysis and returns whether it
understood the node (the analysis freezes what it did not)."""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx

from .channel_spaces import Layout, Segment, compress, positions, slice_layout


def view_dims(node: fx.Node) -> list:
    """The target shape of a view/reshape node, as written (ints, -1 or nodes). A shape built as
    one tuple (GPT-2's ``input_shape + (x.size(-1),)``) is spelled out: the items of a concatenation,
    and a ``size()`` tuple stands for each of its own items."""
    rest = list(node.args[1:]) or [node.kwargs.get("shape", node.kwargs.get("size"))]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
        return list(rest[0])
    if len(rest) == 1 and isinstance(rest[0], fx.Node):
        return _tuple_items(rest[0]) or rest
    return rest


def _tuple_items(node: Any) -> list | None:
    if isinstance(node, (tuple, list)):
        return list(node)
    if not isinstance(node, fx.Node):
        return None
    if node.target is operator.add and len(node.args) == 2:
        left, right = _tuple_items(node.args[0]), _tuple_items(node.args[1])
        return None if left is None or right is None else left + right
    value = node.meta.get("concrete")
    return [node] * len(value) if isinstance(value, (tuple, torch.Size)) else None


def set_view_dim(node: fx.Node, dim: int, value: int) -> None:
    """Rewrite one literal size of a view/reshape node (nodes and -1 are left alone, and so is a
    shape given as one tuple-valued node)."""
    dims = view_dims(node)
    if _one_shape_node(node):
        return
    if not isinstance(dims[dim], int) or dims[dim] == -1:
        return
    dims[dim] = value
    node.args, node.kwargs = (node.args[0], tuple(dims)), {}


def _literal(a: Any, node: fx.Node, dim: int, layout: Layout, divisor: int = 1) -> None:
    """Remember a literal size at ``dim`` of a view that must follow ``layout``'s kept channels
    (inside a shape built as one tuple, ``t.size()[:-1] + (heads, d)``, it cannot be rewritten:
    the channels freeze)."""
    dims = view_dims(node)
    if dim < len(dims) and isinstance(dims[dim], int) and dims[dim] != -1:
        if _one_shape_node(node):
            a.spaces.freeze(layout, f"{node.name}: a literal channel size inside a shape tuple")
        else:
            a.view_sizes[node] = (dim, layout, divisor)


def _one_shape_node(node: fx.Node) -> bool:
    written = list(node.args[1:]) or [node.kwargs.get("shape", node.kwargs.get("size"))]
    return len(written) == 1 and isinstance(written[0], fx.Node)


def _is_reshape(node: fx.Node) -> bool:
    return node.target is torch.reshape or node.op == "call_method" and node.target in ("view", "reshape")


def view(a: Any, node: fx.Node, x: tuple[Layout, int]) -> bool:
    """view/reshape that keeps the channel axis, flattens it with what follows (the classic
    ``x.view(-1, 16*5*5)``), or splits it into (G, C/G) (a channel shuffle's first step)."""
    lay, cdim = x
    src, out = a.shape(node.args[0]), a.shape(node)
    if not src or not out or len(view_dims(node)) != len(out):
        return False
    cdim %= len(src)
    if out == src:
        a.layout[node] = x
        return True
    if len(out) == cdim + 1 and out[:cdim] == src[:cdim] and out[cdim] == math.prod(src[cdim:]) and cdim == 1:
        a.flatten(node, x, 1, -1)
        if node in a.layout:
            _literal(a, node, cdim, a.layout[node][0])
        return True
    if len(out) == len(src) + 1 and out[:cdim] == src[:cdim] and out[cdim + 2:] == src[cdim + 1:] \
            and out[cdim] * out[cdim + 1] == src[cdim]:
        groups, width = out[cdim], out[cdim + 1]
        if positions(lay) is None:
            return False
        # a channel shuffle's first step or attention's split into heads: what follows tells
        # (``shuffle_step``), and decides the ties and which literal size follows the channels
        a.shuffles[node] = (lay, cdim, groups, width, False, node)
        return True
    return _merges_other_axes(a, node, x, src, out)


def _merges_other_axes(a: Any, node: fx.Node, x: tuple[Layout, int], src: tuple, out: tuple) -> bool:
    """A view that keeps the channel axis whole and only merges or splits the axes around it
    (ViT's ``x.reshape(n, hidden, h * w)``): the channels move to their new index."""
    lay, cdim = x
    before, after = math.prod(src[:cdim]), math.prod(src[cdim + 1:])
    for j, size in enumerate(out):
        if size == src[cdim] and math.prod(out[:j]) == before and math.prod(out[j + 1:]) == after:
            a.layout[node] = (lay, j)
            _literal(a, node, j, lay)
            return True
    return False


_SWAPS = ("transpose", "swapaxes", "swapdims")


def _permutation(node: fx.Node, ndim: int) -> list[int] | None:
    """The axis order a transpose/permute node produces (None for other ops or unreadable axes)."""
    t, args, kwargs = node.target, node.args, node.kwargs
    if t in (torch.transpose, torch.swapaxes, torch.swapdims) or node.op == "call_method" and t in _SWAPS:
        pair = list(args[1:3]) or [kwargs.get("dim0", kwargs.get("axis0")), kwargs.get("dim1", kwargs.get("axis1"))]
        if len(pair) != 2 or not all(isinstance(d, int) for d in pair):
            return None
        i, j = (d % ndim for d in pair)
        dims = list(range(ndim))
        dims[i], dims[j] = dims[j], dims[i]
        return dims
    if t is torch.permute or node.op == "call_method" and t == "permute":
        order = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:] or kwargs.get("dims")
        if not order or len(order) != ndim or not all(isinstance(d, int) for d in order):
            return None
        dims = [d % ndim for d in order]
        return dims if sorted(dims) == list(range(ndim)) else None
    return None


def permute(a: Any, node: fx.Node, x: tuple[Layout, int]) -> bool:
    """permute/transpose: the channels move with their axis (ConvNeXt's and Swin's channels-last
    blocks: NCHW -> NHWC for LayerNorm and Linear, and back)."""
    src = a.shape(node.args[0])
    dims = _permutation(node, len(src)) if src else None
    if dims is None:
        return False
    a.layout[node] = (x[0], dims.index(x[1] % len(src)))
    return True


def index(a: Any, node: fx.Node, x: tuple[Layout, int]) -> bool:
    """``x[..., ::2, 1::2, :]`` and the like: basic indexing (ints, slices, ``None``, ``...``) of
    other axes, the channel axis taken whole (Swin's patch merging)."""
    src, out = a.shape(node.args[0]), a.shape(node)
    items = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if not src or not out or not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items) \
            or any(isinstance(v, fx.Node) for i in items if isinstance(i, slice) for v in (i.start, i.stop, i.step)):
        return False
    consuming = sum(1 for i in items if i is not None and i is not Ellipsis)
    if sum(1 for i in items if i is Ellipsis) > 1 or consuming > len(src):
        return False
    expanded: list = []
    for i in items:
        expanded += [slice(None)] * (len(src) - consuming) if i is Ellipsis else [i]
    expanded += [slice(None)] * (len(src) - sum(1 for i in expanded if i is not None))
    cdim, in_axis, out_axis, new_cdim = x[1] % len(src), 0, 0, None
    for i in expanded:
        if i is None:
            out_axis += 1
            continue
        if in_axis == cdim:
            if i != slice(None):
                return False
            new_cdim = out_axis
        in_axis += 1
        out_axis += 0 if isinstance(i, int) else 1
    if new_cdim is None or new_cdim >= len(out) or out[new_cdim] != src[cdim]:
        return False
    a.layout[node] = (x[0], new_cdim)
    return True


def shuffle_step(a: Any, node: fx.Node) -> bool:
    """The rest of a channel shuffle on a (G, C/G)-split tensor: transpose/permute of the two
    axes, contiguous, and the view that merges them back (a permuted layout)."""
    lay, cdim, groups, width, swapped, split = a.shuffles[node.args[0]]
    src, out = a.shape(node.args[0]), a.shape(node)
    if not src or not out:
        return False
    if node.op == "call_method" and node.target in ("contiguous", "clone"):
        a.shuffles[node] = a.shuffles[node.args[0]]
        return True
    dims = _permutation(node, len(src))
    if dims is not None:
        swap = list(range(len(src)))
        swap[cdim], swap[cdim + 1] = cdim + 1, cdim
        if dims == swap:
            a.shuffles[node] = (lay, cdim, groups, width, not swapped, split)
            return True
        return False   # not a shuffle's transpose: maybe a split into attention heads (compiler.coupling_heads)
    if _is_reshape(node) and len(out) == len(src) - 1 and out[cdim] == groups * width \
            and len(view_dims(node)) == len(out):
        if not a.spaces.tie_blocks(lay, groups, f"{split.name}: view splitting {groups * width} channels into "
                                                f"({groups}, {width})"):
            return False
        _literal(a, split, cdim + 1, lay, groups)
        if swapped:  # position r*G + g holds block g's channel r
            pos = positions(lay)
            merged = tuple(Segment(s, c, 1) for r in range(width) for g in range(groups)
                           for s, c in [pos[g * width + r]])
            lay = compress(merged)
        a.layout[node] = (lay, cdim)
        _literal(a, node, cdim, lay)
        return True
    return False


def split(a: Any, node: fx.Node, x: tuple[Layout, int]) -> bool:
    """split/chunk along the channel axis: each piece is a slice of the input layout. The
    pruning pass rewrites the sizes (a chunk becomes a split with explicit sizes)."""
    lay, cdim = x
    in_shape = a.shape(node.args[0])
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    shapes = node.meta.get("shape")
    if not in_shape or dim % len(in_shape) != cdim % len(in_shape) or not shapes \
            or any(seg.repeat != 1 for seg in lay):
        return False
    pieces, pos = [], 0
    for shape in shapes:
        size = shape[cdim]
        pieces.append(slice_layout(lay, pos, size))
        pos += size
    a.pieces[node] = (pieces, cdim)
    return True
