"""Hand-written multi-head attention in the coupling analysis (``compiler.coupling``): the
channels of q, k and v split into ``(heads, head_dim)`` by a view, moved by transposes, combined by
``q @ k^T`` and ``scores @ v`` or ``F.scaled_dot_product_attention``, and merged back by a view
for the output projection (BERT, GPT-2, ViT and Llama in Hugging Face, timm's attention).

A head is pruned whole (Michel et al., 2019): channel ``d`` of head ``h`` in q, k and v is one
unit with the rest of head ``h`` (q, k and v are tied channel by channel; each head's channels are
tied together), so the head count changes and the head width does not. A literal head count in
the splitting view follows the kept channels; ``-1`` needs nothing. Anything else the split tensor
meets freezes its channels, as elsewhere in the analysis."""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from . import coupling_views as views
from .channel_spaces import Layout, Segment, compress, positions

Analysis = Any   # compiler.coupling.CouplingAnalysis

_PASSING_METHODS = ("contiguous", "clone", "float", "to", "type_as")


@dataclass(frozen=True)
class Heads:
    """A tensor whose channel layout ``lay`` is split into a head axis and a head-width axis."""

    lay: Layout
    head_axis: int
    dim_axis: int | None   # None: scores (q @ k^T) keep the heads and have no channel width
    n_heads: int
    head_dim: int
    whole: "Heads | None" = None   # a slice of the head width (rotary embeddings): the heads it came from
    new_axis: int | None = None   # grouped-query attention's repeat_kv: an axis inserted after the heads ...
    repeats: int = 1              # ... expanded to this many copies of each head
    repeated: bool = False        # the heads are kv heads repeated (their count is q's, their channels fewer)


def split_into_heads(a: Analysis, node: fx.Node) -> bool:
    """A transpose/permute of a ``(G, C/G)``-split view that is not a channel shuffle: the split
    is into attention heads; the split view's literal head count follows the kept channels."""
    lay, cdim, n_heads, head_dim, swapped, split = a.shuffles[node.args[0]]
    dims = _permutation(a, node)
    if swapped or dims is None:
        return False
    a.heads[node] = Heads(lay, dims.index(cdim), dims.index(cdim + 1), n_heads, head_dim)
    views._literal(a, split, cdim, lay, head_dim)   # a literal head count: kept channels / head width
    return True


def step(a: Analysis, node: fx.Node) -> bool:
    """``node`` uses a head-split tensor (its first argument, or q/k/v of attention): follow it,
    or return False (the analysis freezes)."""
    t, args = node.target, node.args
    if t is F.scaled_dot_product_attention:
        return _sdpa(a, node)
    if t in (torch.matmul, operator.matmul) or node.op == "call_method" and t == "matmul":
        return _matmul(a, node)
    if t in (torch.cat, torch.concat):
        return _width_cat(a, node)
    x = a.heads.get(args[0]) if args and isinstance(args[0], fx.Node) else None
    if x is None:
        return False
    if node.op == "call_method" and t in _PASSING_METHODS or t in (F.dropout, F.softmax, torch.softmax) \
            or node.op == "call_method" and t == "softmax" or node.op == "call_module" and _is_dropout(a, node):
        return _same(a, node, x, softmax_axis=_softmax_axis(node))
    if _within_heads(a, node, x):
        return True
    if t in (operator.mul, operator.truediv, torch.mul, torch.div) or node.op == "call_method" and t in ("mul", "div"):
        return _scaled(a, node, x)
    if t in (operator.add, torch.add) and x.dim_axis is None:
        return _masked(a, node, x)
    if t is operator.getitem and isinstance(args[1], tuple) and None in args[1]:
        return _new_axis(a, node, x)
    if x.new_axis is not None and not (node.op == "call_method" and t == "expand" or views._is_reshape(node)):
        return False   # repeat_kv's steps only, between its new axis and the merging view
    if t is operator.getitem:
        return _width_slice(a, node, x)
    if node.op == "call_method" and t == "expand":
        return _expand(a, node, x)
    dims = _permutation(a, node)
    if dims is not None:
        a.heads[node] = replace(x, head_axis=dims.index(x.head_axis),
                                dim_axis=None if x.dim_axis is None else dims.index(x.dim_axis))
        return True
    return _merge(a, node, x)


def _is_dropout(a: Analysis, node: fx.Node) -> bool:
    return isinstance(a.modules.get(node.target), torch.nn.Dropout)


def _softmax_axis(node: fx.Node) -> int | None:
    if node.target in (F.softmax, torch.softmax) or node.op == "call_method" and node.target == "softmax":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return dim if isinstance(dim, int) else -99
    return None


def _same(a: Analysis, node: fx.Node, x: Heads, softmax_axis: int | None) -> bool:
    """Element-wise or along the keys (softmax over the last axis of scores)."""
    shape = a.shape(node)
    if softmax_axis is not None and (x.dim_axis is not None or not shape or softmax_axis % len(shape) != len(shape) - 1):
        return False
    a.heads[node] = x
    return True


def _scaled(a: Analysis, node: fx.Node, x: Heads) -> bool:
    """Scaling by a number (the 1/sqrt(d) of attention)."""
    other = [v for v in node.args[1:] if isinstance(v, fx.Node)]
    if other or node.args[0] not in a.heads:
        return False
    a.heads[node] = x
    return True


def _masked(a: Analysis, node: fx.Node, x: Heads) -> bool:
    """Scores plus a mask that is the same for every head (size 1 on the head axis)."""
    shape = a.shape(node)
    for other in node.args[1:]:
        if isinstance(other, fx.Node):
            s = a.shape(other)
            lead = len(shape) - len(s) if s else 0
            if s is None or other in a.heads or x.head_axis - lead >= 0 and s[x.head_axis - lead] != 1:
                return False
    a.heads[node] = x
    return True


_ELEMENTWISE = {operator.add, operator.sub, operator.mul, operator.neg, torch.add, torch.sub, torch.mul, torch.neg}
_ELEMENTWISE_METHODS = {"add", "sub", "mul", "neg"}


def _within_heads(a: Analysis, node: fx.Node, x: Heads) -> bool:
    """Element-wise arithmetic that keeps every head to itself (rotary embeddings: q * cos +
    rotate(q) * sin): the head-split operands come from the same heads, the others are the same
    for every head (size 1 on the head axis)."""
    if node.target not in _ELEMENTWISE and not (node.op == "call_method" and node.target in _ELEMENTWISE_METHODS):
        return False
    shape = a.shape(node)
    if not shape or a.shape(node.args[0]) != shape:
        return False
    for arg in node.args:
        if not isinstance(arg, fx.Node):
            continue
        if arg in a.heads:
            if a.heads[arg] != x:
                return False
            continue
        s = a.shape(arg)
        lead = len(shape) - len(s) if s else 0
        if s is None or x.head_axis - lead >= 0 and s[x.head_axis - lead] != 1:
            return False
    a.heads[node] = x
    return True


def _width_slice(a: Analysis, node: fx.Node, x: Heads) -> bool:
    """``q[..., :d // 2]``: a slice of the head width only."""
    src, out = a.shape(node.args[0]), a.shape(node)
    if x.dim_axis is None or x.whole is not None or not src or not out or len(src) != len(out) \
            or x.dim_axis % len(src) != len(src) - 1 or out[:-1] != src[:-1]:
        return False
    a.heads[node] = replace(x, head_dim=out[-1], whole=x)
    return True


def _new_axis(a: Analysis, node: fx.Node, x: Heads) -> bool:
    """``k[:, :, None, :, :]``, repeat_kv's first step (grouped-query attention): a new axis right
    after the heads."""
    index, src, out = node.args[1], a.shape(node.args[0]), a.shape(node)
    if index.count(None) != 1 or any(i is not None and i != slice(None) for i in index) or not src or not out \
            or len(out) != len(src) + 1 or x.new_axis is not None or x.dim_axis is None:
        return False
    new = index.index(None)
    if new != x.head_axis + 1 or x.dim_axis <= x.head_axis:
        return False
    a.heads[node] = replace(x, dim_axis=x.dim_axis + (x.dim_axis >= new), new_axis=new)
    return True


def _expand(a: Analysis, node: fx.Node, x: Heads) -> bool:
    """The new axis expanded, nothing else: each kv head ``repeats`` times."""
    src, out = a.shape(node.args[0]), a.shape(node)
    if x.new_axis is None or not src or not out or len(src) != len(out) \
            or any(s != o for i, (s, o) in enumerate(zip(src, out)) if i != x.new_axis):
        return False
    a.heads[node] = replace(x, repeats=out[x.new_axis])
    views._literal(a, node, x.head_axis, x.lay, x.head_dim)   # a literal kv-head count follows the kept heads
    return True


def _repeat_heads(a: Analysis, node: fx.Node, x: Heads, src: tuple, out: tuple) -> bool:
    """The view merging the heads with their copies: kv head ``j`` becomes heads ``j*r .. j*r+r-1``,
    a layout holding each kv head's channels ``r`` times (q head ``h`` then ties to kv head ``h // r``)."""
    h = x.head_axis
    if x.new_axis != h + 1 or len(out) != len(src) - 1 or out[:h] != src[:h] or out[h + 1:] != src[h + 2:] \
            or out[h] != x.n_heads * x.repeats:
        return False
    pos, d = positions(x.lay), x.head_dim
    if pos is None:
        return False
    lay = compress(tuple(Segment(s, c, 1) for j in range(x.n_heads) for _ in range(x.repeats)
                         for s, c in pos[j * d:(j + 1) * d]))
    a.heads[node] = Heads(lay, h, x.dim_axis - 1, x.n_heads * x.repeats, d, repeated=True)
    views._literal(a, node, h, lay, d)   # a literal n_kv * r follows the kept kv heads
    return True


def _width_cat(a: Analysis, node: fx.Node) -> bool:
    """Slices of the same heads' width concatenated back to their full width (rotate_half)."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    parts = [a.heads.get(t) for t in tensors]
    out = a.shape(node)
    if not out or any(p is None or p.whole is None for p in parts) or len({p.whole for p in parts}) != 1 \
            or dim % len(out) != len(out) - 1 or out[-1] != parts[0].whole.head_dim:
        return False
    a.heads[node] = parts[0].whole
    return True


def _permutation(a: Analysis, node: fx.Node) -> list[int] | None:
    shape = a.shape(node.args[0])
    return views._permutation(node, len(shape)) if shape else None


def _merge(a: Analysis, node: fx.Node, x: Heads) -> bool:
    """The view that merges adjacent (heads, head width) axes back into channels."""
    src, out = a.shape(node.args[0]), a.shape(node)
    if views._is_reshape(node) and src and src == out:   # a view to the shape it has
        a.heads[node] = x
        return True
    if views._is_reshape(node) and x.new_axis is not None and src and out:
        return _repeat_heads(a, node, x, src, out)
    if not views._is_reshape(node) or not src or not out or x.dim_axis != x.head_axis + 1 or len(out) != len(src) - 1 \
            or out[x.head_axis] != x.n_heads * x.head_dim or out[:x.head_axis] != src[:x.head_axis]:
        return False
    a.layout[node] = (x.lay, x.head_axis)
    views._literal(a, node, x.head_axis, x.lay)
    return True


def _tie_heads(a: Analysis, x: Heads, y: Heads, why: str) -> bool:
    """q/k (or scores/v) belong together: same head count and width, head axes aligned; their
    channels are tied one to one and each head's channels together."""
    if (x.n_heads, x.head_dim, x.head_axis) != (y.n_heads, y.head_dim, y.head_axis):
        return False
    px, py = positions(x.lay), positions(y.lay)
    if px is None or py is None:
        return False
    if x.lay != y.lay:
        a.spaces.tie_channels(x.lay, y.lay, why)
    a.spaces.tie_within_blocks(x.lay, x.head_dim, f"{why}: heads of {x.head_dim} channels")
    return True


def _matmul(a: Analysis, node: fx.Node) -> bool:
    left, right = (a.heads.get(arg) for arg in node.args[:2])
    if left is None or right is None:
        return False
    rank = len(a.shape(node) or ())
    if left.dim_axis is not None and right.dim_axis is not None:   # q @ k^T: scores
        if left.dim_axis % rank != rank - 1 or right.dim_axis % rank != rank - 2 \
                or not _tie_heads(a, left, replace(right, dim_axis=left.dim_axis), f"{node.name} (q @ k^T)"):
            return False
        a.heads[node] = replace(left, dim_axis=None)
        return True
    if left.dim_axis is None and right.dim_axis is not None and right.dim_axis % rank == rank - 1:   # scores @ v
        if not _tie_heads(a, replace(left, dim_axis=right.dim_axis), right, f"{node.name} (scores @ v)"):
            return False
        a.heads[node] = replace(right, lay=left.lay, repeated=False) if right.repeated else right
        return True
    return False


def _sdpa(a: Analysis, node: fx.Node) -> bool:
    names = ("query", "key", "value", "attn_mask")
    given = dict(zip(names, node.args)) | {k: v for k, v in node.kwargs.items() if k in names}
    q, k, v = (a.heads.get(given.get(n)) for n in names[:3])
    mask = given.get("attn_mask")
    if q is None or k is None or v is None or mask in a.heads:
        return False
    if isinstance(mask, fx.Node):
        shape = a.shape(mask)
        lead = len(a.shape(node) or ()) - len(shape or ())
        if shape is None or q.head_axis - lead >= 0 and shape[q.head_axis - lead] != 1:
            return False   # a per-head mask would have to lose the pruned heads' rows
    if not (_tie_heads(a, q, k, f"{node.name} (q, k)") and _tie_heads(a, q, v, f"{node.name} (q, v)")):
        return False
    a.heads[node] = replace(v, lay=q.lay, repeated=False) if v.repeated else v   # grouped: the output is q's heads
    return True
