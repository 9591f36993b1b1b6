"""How channel pruning rewrites a graph once the channels to keep are chosen: every layer,
parameter and literal size indexed by a pruned group keeps the chosen positions; attention layers
become ``HeadwiseAttention`` keeping the chosen heads."""

from __future__ import annotations

import copy

import torch
from torch import nn

from compiler import PassError
from compiler.coupling import CouplingAnalysis
from compiler.coupling_rules import HEADS
from compiler.graph import Graph
from compiler.linear_forms import is_transposed_linear
from compiler.ops.attention import HeadwiseAttention, keep_linear
from compiler.ops.relative_attention import HeadwiseRelativeAttention
from compiler.ops.window_attention import HeadwiseWindowAttention


def _layout_indices(analysis: CouplingAnalysis, layout, keep_by_root: dict[int, torch.Tensor]) -> torch.Tensor:
    """Positions (in the consuming tensor's channel/feature axis) that survive pruning."""
    idx, pos = [], 0
    for seg in layout:
        keep = keep_by_root.get(analysis.find(seg.space))
        kept = range(seg.start, seg.start + seg.length) if keep is None else \
            [int(c) for c in keep if seg.start <= c < seg.start + seg.length]
        for c in kept:
            base = pos + (c - seg.start) * seg.repeat
            idx.extend(range(base, base + seg.repeat))
        pos += seg.length * seg.repeat
    return torch.tensor(idx, dtype=torch.long)


def rewrite(graph: Graph, analysis: CouplingAnalysis, keep_by_root: dict[int, torch.Tensor]) -> None:
    if not keep_by_root:
        return
    out_keep: dict[str, torch.Tensor] = {}
    head_keep: dict[str, torch.Tensor] = {}
    for sid, name in analysis.producer.items():
        keep = keep_by_root.get(analysis.find(sid))
        if keep is not None and name.endswith(HEADS):
            head_keep[name[:-len(HEADS)]] = keep
        elif keep is not None:
            out_keep[name] = keep
    shared = _shared_parameters(graph.module)
    in_keep: dict[str, torch.Tensor] = {}
    param_keep: dict[str, torch.Tensor] = {}
    tensor_keep: dict[str, tuple[int, torch.Tensor]] = {}
    kv_keep: dict[tuple[str, str], torch.Tensor] = {}   # (attention layer, "in_k"/"in_v") -> kept inputs
    for c in analysis.consumers:
        if c.role == "tensor":
            tensor_keep.setdefault(c.module, (c.dim, _layout_indices(analysis, c.layout, keep_by_root)))
            continue
        if c.role in ("in_k", "in_v"):
            kv_keep[(c.module, c.role)] = _layout_indices(analysis, c.layout, keep_by_root)
            continue
        target = in_keep if c.role in ("in", "grouped") else param_keep
        if c.module not in target:
            target[c.module] = _layout_indices(analysis, c.layout, keep_by_root)
    for name in sorted(set(out_keep) | set(in_keep) | set(param_keep) | set(head_keep)):
        old = graph.module.get_submodule(name)
        if isinstance(old, (HeadwiseWindowAttention, HeadwiseRelativeAttention)):
            new = _pruned_window_attention(old, out_keep.get(name), in_keep.get(name), head_keep.get(name))
        elif isinstance(old, (nn.MultiheadAttention, HeadwiseAttention)):
            new = _pruned_attention(old, out_keep.get(name), in_keep.get(name), kv_keep.get((name, "in_k")),
                                    kv_keep.get((name, "in_v")), head_keep.get(name))
        else:
            new = _pruned(old, out_keep.get(name), in_keep.get(name), param_keep.get(name))
        if new is not old:
            graph.module.set_submodule(name, new)
    for name, (dim, idx) in tensor_keep.items():
        _prune_tensor(graph.module, name, dim, idx)
    _tie_again(graph.module, shared)
    # the analysis may belong to another copy of this graph: find its nodes here by name
    nodes = {n.name: n for n in graph.module.graph.nodes}
    for node, layout in analysis.norm_shapes.items():   # F.layer_norm's normalized_shape
        node = nodes[node.name]
        kept = (len(_layout_indices(analysis, layout, keep_by_root)),)
        node.args = (node.args[0], kept, *node.args[2:]) if len(node.args) > 1 else node.args
        if "normalized_shape" in node.kwargs:
            node.kwargs = {**node.kwargs, "normalized_shape": kept}
    for node, (pieces, cdim) in analysis.pieces.items():  # split/chunk sizes follow the kept channels
        sizes = [len(_layout_indices(analysis, piece, keep_by_root)) for piece in pieces]
        node = nodes[node.name]
        node.op, node.target = "call_function", torch.split
        node.args, node.kwargs = (node.args[0], sizes, cdim), {}
    for node, (dim, layout, divisor) in analysis.view_sizes.items():  # literal view/reshape sizes
        CouplingAnalysis.set_view_dim(nodes[node.name], dim,
                                      len(_layout_indices(analysis, layout, keep_by_root)) // divisor)


def _shared_parameters(root: nn.Module) -> list[list[tuple[str, str]]]:
    """(module, attribute) places of each parameter held by several modules (GPT-2's language-model
    head shares the token embedding's weight)."""
    places: dict[int, list[tuple[str, str]]] = {}
    for mod_name, m in root.named_modules(remove_duplicate=False):
        for p_name, p in m.named_parameters(recurse=False):
            places.setdefault(id(p), []).append((mod_name, p_name))
    return [sorted(set(v)) for v in places.values() if len(set(v)) > 1]


def _tie_again(root: nn.Module, shared: list[list[tuple[str, str]]]) -> None:
    """Pruned with the same channels, a shared weight's copies are equal: one parameter again
    (copies pruned differently stay apart, each correct for its layer)."""
    for places in shared:
        params = [getattr(root.get_submodule(m), p) for m, p in places]
        if all(q is params[0] for q in params):
            continue
        if all(q.shape == params[0].shape and torch.equal(q, params[0]) for q in params[1:]):
            for m, p in places[1:]:
                setattr(root.get_submodule(m), p, params[0])


def producer_rows(root: nn.Module, name: str) -> torch.Tensor:
    """One row per output channel of producer ``name``: a layer's filters, or an attention
    layer's output projection, or one row per head (its q, k, v rows and output columns)."""
    if name.endswith(HEADS):
        m = root.get_submodule(name[:-len(HEADS)])
        return (HeadwiseAttention.from_torch(m) if isinstance(m, nn.MultiheadAttention) else m).head_rows()
    m = root.get_submodule(name)
    if isinstance(m, (nn.MultiheadAttention, HeadwiseAttention)):
        return m.out_proj.weight.detach()
    if isinstance(m, (HeadwiseWindowAttention, HeadwiseRelativeAttention)):
        return m.output_projection.weight.detach()
    if is_transposed_linear(m) or isinstance(m, nn.Embedding):   # (in, out) / (vocabulary, channels)
        return m.weight.detach().t()
    return m.weight.detach()


def _pruned_attention(m: nn.Module, out_idx, q_idx, k_idx, v_idx, heads) -> nn.Module:
    """``m`` as a ``HeadwiseAttention`` keeping ``heads`` and the given inputs and outputs (``m``
    itself where nothing changes). Exact for what is kept: the heads are independent."""
    full = [_full(out_idx, m.out_proj.out_features), _full(heads, m.num_heads), _full(q_idx, _in_features(m, "q"))]
    full += [k_idx is None or len(k_idx) == 0 or _full(k_idx, _in_features(m, "k")),
             v_idx is None or len(v_idx) == 0 or _full(v_idx, _in_features(m, "v"))]
    if all(full):
        return m
    new = HeadwiseAttention.from_torch(m) if isinstance(m, nn.MultiheadAttention) else copy.deepcopy(m)
    if heads is not None:
        new.keep_heads(heads)
    keep_linear(new.q_proj, None, q_idx)
    keep_linear(new.k_proj, None, k_idx)
    keep_linear(new.v_proj, None, v_idx)
    keep_linear(new.out_proj, out_idx, None)
    return new


def _pruned_window_attention(m: nn.Module, out_idx, in_idx, heads) -> nn.Module:
    """A copy of window attention ``m`` (Swin's, MaxViT's) keeping ``heads``, the given input
    channels and output channels."""
    if _full(out_idx, m.output_projection.out_features) and _full(in_idx, m.input_projection.in_features) \
            and _full(heads, m.num_heads):
        return m
    new = copy.deepcopy(m)
    if heads is not None:
        new.keep_heads(heads)
    keep_linear(new.input_projection, None, in_idx)
    keep_linear(new.output_projection, out_idx, None)
    return new


def _in_features(m: nn.Module, which: str) -> int:
    if isinstance(m, nn.MultiheadAttention):
        return {"q": m.embed_dim, "k": m.kdim, "v": m.vdim}[which]
    return getattr(m, f"{which}_proj").in_features


def _prune_tensor(root: nn.Module, name: str, dim: int, idx: torch.Tensor) -> None:
    """Keep ``idx`` on ``dim`` of the parameter or buffer ``name`` (used functionally: a layer
    scale, a position embedding, a functional LayerNorm's weight)."""
    owner_name, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_name)
    old = getattr(owner, attr)
    if _full(idx, old.shape[dim]):
        return
    new = _take(old, dim, idx)
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    elif attr in owner._buffers:
        owner.register_buffer(attr, new, persistent=attr not in owner._non_persistent_buffers_set)
    else:
        setattr(owner, attr, new)


def _take(t: torch.Tensor | None, dim: int, idx: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or idx is None:
        return t
    return t.detach().index_select(dim, idx.to(t.device)).clone()


def _full(idx: torch.Tensor | None, n: int) -> bool:
    return idx is None or (len(idx) == n and bool((idx == torch.arange(n)).all()))


def _pruned_grouped_conv(m: nn.Conv2d, out_idx, in_idx) -> nn.Conv2d:
    """A grouped conv keeping some of its groups (pruned by whole groups) and in each kept group
    the same local inputs and as many outputs (pruned by channels): what the coupling ties plan."""
    n_out, n_in, groups = m.out_channels, m.in_channels, m.groups
    if _full(out_idx, n_out) and _full(in_idx, n_in):
        return m
    out_idx = torch.arange(n_out) if out_idx is None else out_idx
    in_idx = torch.arange(n_in) if in_idx is None else in_idx
    width_in, width_out = n_in // groups, n_out // groups
    kept = sorted({int(q) for q in out_idx // width_out})
    local = in_idx[in_idx // width_in == kept[0]] - kept[0] * width_in
    if sorted({int(q) for q in in_idx // width_in}) != kept or len(in_idx) != len(kept) * len(local) \
            or len(out_idx) % len(kept):
        raise PassError(f"channel pruning: unbalanced groups planned for grouped conv ({len(in_idx)} inputs, "
                        f"{len(out_idx)} outputs, groups={groups})")
    w = _take(_take(m.weight, 0, out_idx), 1, local)
    new = nn.Conv2d(len(in_idx), len(out_idx), m.kernel_size, m.stride, m.padding, m.dilation, len(kept),
                    m.bias is not None, m.padding_mode)
    new.weight = nn.Parameter(w, requires_grad=m.weight.requires_grad)
    if m.bias is not None:
        new.bias = nn.Parameter(_take(m.bias, 0, out_idx), requires_grad=m.bias.requires_grad)
    return new.to(m.weight.device).train(m.training)


def _pruned(m: nn.Module, out_idx, in_idx, param_idx) -> nn.Module:
    """A copy of ``m`` with the given output/input/parameter indices kept (or ``m`` if unchanged)."""
    if isinstance(m, nn.Conv2d) and m.groups > 1 and param_idx is None:  # grouped
        return _pruned_grouped_conv(m, out_idx, in_idx)
    if isinstance(m, nn.Conv2d) and m.groups > 1:  # depthwise: every tensor follows its input layout
        if _full(param_idx, m.out_channels):
            return m
        n = len(param_idx)
        new = nn.Conv2d(n, n, m.kernel_size, m.stride, m.padding, m.dilation, n, m.bias is not None, m.padding_mode)
        new.weight = nn.Parameter(_take(m.weight, 0, param_idx), requires_grad=m.weight.requires_grad)
        if m.bias is not None:
            new.bias = nn.Parameter(_take(m.bias, 0, param_idx), requires_grad=m.bias.requires_grad)
        return new.to(m.weight.device).train(m.training)
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        n_out, n_in = m.weight.shape[0], m.weight.shape[1]
        if _full(out_idx, n_out) and _full(in_idx, n_in):
            return m
        w = _take(_take(m.weight, 0, out_idx), 1, in_idx)
        if isinstance(m, nn.Conv2d):
            new = nn.Conv2d(w.shape[1], w.shape[0], m.kernel_size, m.stride, m.padding, m.dilation, 1,
                            m.bias is not None, m.padding_mode)
        else:
            new = nn.Linear(w.shape[1], w.shape[0], m.bias is not None)
        new.weight = nn.Parameter(w, requires_grad=m.weight.requires_grad)
        if m.bias is not None:
            new.bias = nn.Parameter(_take(m.bias, 0, out_idx), requires_grad=m.bias.requires_grad)
        return new.to(m.weight.device).train(m.training)
    if isinstance(m, nn.Embedding):
        if _full(out_idx, m.embedding_dim):
            return m
        new = copy.deepcopy(m)
        new.weight = nn.Parameter(_take(m.weight, 1, out_idx), requires_grad=m.weight.requires_grad)
        new.embedding_dim = new.weight.shape[1]
        return new
    if isinstance(m, nn.GroupNorm):
        if _full(param_idx, m.num_channels):
            return m
        new = nn.GroupNorm(m.num_groups, len(param_idx), m.eps, m.affine)
        if m.affine:
            new.weight = nn.Parameter(_take(m.weight, 0, param_idx), requires_grad=m.weight.requires_grad)
            new.bias = nn.Parameter(_take(m.bias, 0, param_idx), requires_grad=m.bias.requires_grad)
        return new.to(m.weight.device if m.affine else 'cpu').train(m.training)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d, nn.LayerNorm)):
        size = m.normalized_shape[0] if isinstance(m, nn.LayerNorm) else m.num_features
        if _full(param_idx, size):
            return m
        new = copy.deepcopy(m)
        n = len(param_idx)
        if isinstance(m, nn.LayerNorm):
            new.normalized_shape = (n,)
        else:
            new.num_features = n
        for pname, p in list(m.named_parameters(recurse=False)):
            setattr(new, pname, nn.Parameter(_take(p, 0, param_idx), requires_grad=p.requires_grad))
        for bname, b in list(m.named_buffers(recurse=False)):
            if b is not None and b.dim() > 0:
                setattr(new, bname, _take(b, 0, param_idx))
        return new
    if is_transposed_linear(m):
        return _pruned_transposed_linear(m, out_idx, in_idx)
    raise TypeError(f"channel pruning cannot rewrite {type(m).__name__}")


def _pruned_transposed_linear(m: nn.Module, out_idx, in_idx) -> nn.Module:
    n_in, n_out = m.weight.shape
    if _full(out_idx, n_out) and _full(in_idx, n_in):
        return m
    new = copy.deepcopy(m)
    new.weight = nn.Parameter(_take(_take(m.weight, 1, out_idx), 0, in_idx), requires_grad=m.weight.requires_grad)
    if getattr(m, "bias", None) is not None:
        new.bias = nn.Parameter(_take(m.bias, 0, out_idx), requires_grad=m.bias.requires_grad)
    new.nx, new.nf = new.weight.shape   # Conv1D's sizes
    return new
