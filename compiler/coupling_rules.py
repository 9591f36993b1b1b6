"""The coupling analysis's rule for each kind of op (``compiler.op_table.Channels``): how a node
of that kind maps the layouts of its inputs to its output's, which parameters it consumes, and
which spaces it ties or freezes. A rule returns whether it understood the node; the analysis
(``compiler.coupling``) freezes what no rule understood."""

from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from . import coupling_views as views
from .channel_spaces import Consumer, Layout, Segment
from .op_table import Channels
from .ops.relative_attention import HeadwiseRelativeAttention
from .ops.window_attention import HeadwiseWindowAttention

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
    elif a.whole_groups(m):   # its groups kept or pruned whole: the per-group widths stay
        a.consumers.append(Consumer(name, "grouped", lay))
        a.output_space(node, name, m.out_channels, lay, cdim=1)
        if a.spaces.tie_whole_blocks(lay, a.layout[node][0], m.groups, f"{name}: grouped conv (groups={m.groups}), "
                                                                        "pruned by whole groups"):
            a.whole_group_convs.add(name)
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
    out_features = m.out_features if isinstance(m, nn.Linear) else m.weight.shape[1]   # Conv1D: (in, out)
    a.output_space(node, node.target, out_features, x[0], cdim=x[1])
    return True


def embedding(a: Analysis, node: fx.Node, m: nn.Embedding, x: tuple[Layout, int] | None) -> bool:
    """Its columns are the output channels, whatever indexes it (an input, a buffer of positions);
    called again, the same channels. ``max_norm`` renormalizes whole rows: not exact pruned."""
    if m.max_norm is not None:
        return False
    cdim = len(a.shape(node) or (0,)) - 1
    if node.target in a.module_io:
        a.layout[node] = (a.module_io[node.target][1], cdim)
    else:
        a.output_space(node, node.target, m.embedding_dim, (), cdim)
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


HEADS = "::heads"   # suffix of the producer name of an attention layer's heads space


def attention(a: Analysis, node: fx.Node, m: nn.Module, x: tuple[Layout, int]) -> bool:
    """Multi-head attention (``nn.MultiheadAttention`` or ``HeadwiseAttention``): its q, k and v
    projections consume the query's, key's and value's channels, its output projection produces
    new ones, and its heads are a space of their own (one channel per head), pruned whole."""
    if isinstance(m, nn.MultiheadAttention) and (m.bias_k is not None or m.add_zero_attn):
        return False
    if isinstance(m, (HeadwiseWindowAttention, HeadwiseRelativeAttention)):
        return _window_attention(a, node, m, x)
    given = dict(zip(("query", "key", "value"), node.args)) | node.kwargs
    q, k, v = (given.get(n) for n in ("query", "key", "value"))
    if not all(isinstance(t, fx.Node) for t in (q, k, v)) or node.target in a.module_io:
        return False
    xk = x if k is q else a._input_on(node, k, -1)
    xv = x if v is q else xk if v is k else a._input_on(node, v, -1)
    name = node.target
    a.consumers += [Consumer(name, "in", x[0]), Consumer(name, "in_k", xk[0]), Consumer(name, "in_v", xv[0])]
    a.spaces.new(m.num_heads, producer=name + HEADS)
    a.output_space(node, name, m.out_proj.out_features, x[0], cdim=x[1])
    a.tuple_outputs[node] = [a.layout.pop(node)]   # (output, weights): the weights are not followed
    return True


def _window_attention(a: Analysis, node: fx.Node, m: nn.Module, x: tuple[Layout, int]) -> bool:
    """Swin's window attention or MaxViT's, over channels-last input: the input projection (``qkv``)
    consumes the channels, the output projection produces new ones, the heads are a space of their own."""
    if node.target in a.module_io or len(node.args) != 1:
        return False
    a.consumers.append(Consumer(node.target, "in", x[0]))
    a.spaces.new(m.num_heads, producer=node.target + HEADS)
    a.output_space(node, node.target, m.output_projection.out_features, x[0], cdim=x[1])
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
    """Reduced over other axes (spatial, tokens): the channel axis survives, moved left by the
    axes removed before it unless ``keepdim``."""
    args, in_shape, out_shape = node.args, a.shape(node.args[0]), a.shape(node)
    dims = args[1] if len(args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis"))
    dims = [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, (tuple, list)) else None
    if first is None or not in_shape or not out_shape or dims is None or not all(isinstance(d, int) for d in dims):
        return False
    reduced, cdim = {d % len(in_shape) for d in dims}, first[1] % len(in_shape)
    if cdim in reduced and len(out_shape) == len(in_shape) and out_shape[cdim] == 1:
        # a statistic over the channels, kept as a size-1 axis (RMSNorm's mean of x²): it only
        # broadcasts back over them, so it is no channel of anyone; computed over the kept channels
        # once pruned, as LayerNorm's statistics are
        a.layout[node] = ((Segment(a.spaces.new(1, frozen="a statistic over channels"), 0, 1),), cdim)
        return True
    if cdim in reduced:
        return False
    out_cdim = cdim if len(out_shape) == len(in_shape) else cdim - sum(1 for d in reduced if d < cdim)
    if out_cdim >= len(out_shape) or out_shape[out_cdim] != in_shape[cdim]:
        return False
    a.layout[node] = (first[0], out_cdim)
    return True


def binary(a: Analysis, node: fx.Node, first: tuple[Layout, int] | None = None) -> bool:
    out_shape = a.shape(node)
    tensors = [arg for arg in node.args if isinstance(arg, fx.Node) and arg in a.layout]
    if not out_shape or not tensors:
        a.freeze_node(node, f"{node.name}: binary op on untracked operands")
        return True
    # broadcasting aligns axes from the right: compare channel axes counted from the end
    from_end = {a.layout[arg][1] % len(a.shape(arg) or (0,)) - len(a.shape(arg) or (0,)) for arg in tensors}
    if len(from_end) != 1:
        a.freeze_node(node, f"{node.name}: operands disagree on the channel axis")
        return True
    cdim = len(out_shape) + from_end.pop()
    full = [arg for arg in tensors if a.layout[arg][1] % len(a.shape(arg) or (0,)) - len(a.shape(arg) or (0,))
            + len(out_shape) == cdim and (a.shape(arg) or ())[a.layout[arg][1]] == out_shape[cdim]]

    def along_channels(arg: fx.Node) -> int:  # the operand's size on the output's channel axis
        shape = a.shape(arg)
        if shape is None:
            return -1
        d = cdim % len(out_shape) - (len(out_shape) - len(shape))   # broadcasting aligns from the right
        return shape[d] if d >= 0 else 1

    untracked = [arg for arg in node.args if isinstance(arg, fx.Node) and arg not in a.layout
                 and along_channels(arg) != 1]
    # a parameter with the channels' size on their axis (a layer scale, a position embedding) is
    # indexed with them; any other untracked operand that varies along the channels is not understood
    params = [arg for arg in untracked if arg.op == "get_attr" and along_channels(arg) == out_shape[cdim]]
    if not full or len(params) != len(untracked):
        a.freeze_node(node, f"{node.name}: broadcast along the channel axis not understood")
        return True
    base = a.layout[full[0]][0]
    for param in params:
        a.consume_attr(node, param, base, cdim % len(out_shape) - (len(out_shape) - len(a.shape(param))))
    for other in full[1:]:
        a.spaces.tie(base, a.layout[other][0], f"{node.name} ({getattr(node.target, '__name__', node.target)})")
    a.layout[node] = (base, cdim)
    return True


def cat(a: Analysis, node: fx.Node, first: tuple[Layout, int] | None = None) -> bool:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    tracked = [a.layout[t] for t in tensors if t in a.layout]
    ndim = len(a.shape(node) or ())
    if tracked and dim % max(ndim, 1) != tracked[0][1] % max(ndim, 1):
        # on another axis than the channels, a parameter (ViT's class token, expanded over the
        # batch) is concatenated with the channels it must follow
        for t in tensors:
            if t not in a.layout and _parameter_along(a, t, tracked[0], node):
                a.layout[t] = tracked[0]
    lays = [a.layout.get(t) for t in tensors]
    if any(lay is None for lay in lays) or len({lay[1] for lay in lays}) != 1:
        a.freeze_node(node, f"{node.name}: cat of untracked tensors")
        return True
    cdim = lays[0][1]
    if dim % max(ndim, 1) == cdim % max(ndim, 1):
        a.layout[node] = (tuple(seg for lay in lays for seg in lay[0]), cdim)
    else:  # concatenated along another axis: every input has the same channels
        for lay in lays[1:]:
            a.spaces.tie(lays[0][0], lay[0], f"{node.name} (cat on dim {dim})")
        a.layout[node] = lays[0]
    return True


def _parameter_along(a: Analysis, t: Any, x: tuple[Layout, int], user: fx.Node) -> bool:
    """If ``t`` is a parameter, or a parameter's ``expand`` used only here, with ``x``'s channel
    count on ``x``'s channel axis: it follows those channels (a consumer); True then."""
    if not isinstance(t, fx.Node):
        return False
    shape, cdim, chain = a.shape(t), x[1], [t]
    while chain[-1].op == "call_method" and chain[-1].target == "expand" and len(chain[-1].users) == 1:
        chain.append(chain[-1].args[0])
    param = chain[-1]
    if param.op != "get_attr" or not shape or len(chain[-1].users) != 1:
        return False
    offset = len(shape) - len(a.shape(param) or ())   # expand may add leading axes
    if shape[cdim % len(shape)] != sum(s.length * s.repeat for s in x[0]) or cdim % len(shape) < offset:
        return False
    a.consume_attr(chain[-2] if len(chain) > 1 else user, param, x[0], cdim % len(shape) - offset)
    return True


def layer_norm_call(a: Analysis, node: fx.Node, first: tuple[Layout, int] | None) -> bool:
    """``F.layer_norm`` over the channel axis, last (a channels-last block's LayerNorm written
    functionally, as ConvNeXt's LayerNorm2d is): its weight and bias follow the channels, and
    ``normalized_shape`` is rewritten to the kept count."""
    shape = a.shape(node.args[0])
    names = ("input", "normalized_shape", "weight", "bias")
    given = dict(zip(names, node.args)) | {k: v for k, v in node.kwargs.items() if k in names}
    normalized = given.get("normalized_shape")
    affine = [given.get(k) for k in ("weight", "bias") if given.get(k) is not None]
    if first is None or not shape or first[1] % len(shape) != len(shape) - 1 \
            or not isinstance(normalized, (tuple, list)) or len(normalized) != 1 \
            or not all(isinstance(t, fx.Node) and t.op == "get_attr" for t in affine):
        return False
    for t in affine:
        a.consume_attr(node, t, first[0], 0)
    a.norm_shapes[node] = first[0]
    a.layout[node] = first
    return True


def expand(a: Analysis, node: fx.Node, first: tuple[Layout, int] | None) -> bool:
    """Channels pass (moved right by new leading axes); an expanded parameter is left to the op
    using it (a class token concatenated with the channels it must follow)."""
    src, out = a.shape(node.args[0]), a.shape(node)
    if first is None:
        return isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"
    cdim = first[1] % len(src) + len(out) - len(src)
    if out[cdim] != src[first[1] % len(src)]:
        return False
    a.layout[node] = (first[0], cdim)
    return True


def roll(a: Analysis, node: fx.Node, first: tuple[Layout, int] | None) -> bool:
    """torch.roll over axes other than the channels' (a roll over all axes flattens: not followed)."""
    shape = a.shape(node.args[0])
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims")
    dims = [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, (tuple, list)) else None
    if first is None or not shape or not dims or not all(isinstance(d, int) for d in dims) \
            or first[1] % len(shape) in {d % len(shape) for d in dims}:
        return False
    a.layout[node] = first
    return True


def patch_merge(a: Analysis, node: fx.Node, first: tuple[Layout, int] | None) -> bool:
    """Swin's patch merging (``_patch_merging_pad``): the four 2x2 neighbours concatenated on the
    channels-last axis, so the layout repeats four times."""
    src, out = a.shape(node.args[0]), a.shape(node)
    if first is None or not src or not out or first[1] % len(src) != len(src) - 1 or out[-1] != 4 * src[-1]:
        return False
    a.layout[node] = (tuple(first[0]) * 4, len(out) - 1)
    return True


def permute(a: Analysis, node: fx.Node, first: tuple[Layout, int] | None) -> bool:
    return first is not None and views.permute(a, node, first)


def index(a: Analysis, node: fx.Node, first: tuple[Layout, int] | None) -> bool:
    return first is not None and len(node.args) > 1 and views.index(a, node, first)


MODULE_RULES: dict[str, Callable[..., bool]] = {
    Channels.CONV: conv,
    Channels.LINEAR: linear,
    Channels.EMBEDDING: embedding,
    Channels.NORM: norm,
    Channels.GROUP_NORM: group_norm,
    Channels.LAYER_NORM: layer_norm,
    Channels.ELEMENTWISE: module_passes,
    Channels.FLATTEN: module_flatten,
    Channels.ATTENTION: attention,
}
FUNCTION_RULES: dict[str, Callable[..., bool]] = {
    Channels.ELEMENTWISE: passes,
    Channels.VIEW: view,
    Channels.SPLIT: split,
    Channels.FLATTEN: flatten_call,
    Channels.REDUCE: reduce,
    Channels.BINARY: binary,
    Channels.CAT: cat,
    Channels.LAYER_NORM: layer_norm_call,
    Channels.PERMUTE: permute,
    Channels.INDEX: index,
    Channels.EXPAND: expand,
    Channels.ROLL: roll,
    Channels.PATCH_MERGE: patch_merge,
}
