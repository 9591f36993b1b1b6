"""Attention layers rewritten into forms whose heads and widths prune independently, before the
coupling analysis runs: torchvision's Swin attention calls ``shifted_window_attention`` with its
input's width as the head width and output width, so the channel-pruning pass first replaces each
such call by a ``HeadwiseWindowAttention`` module (the same function, exact). The layer keeps its
path and its parameters' names."""

from __future__ import annotations

import inspect
import operator

from torch import fx, nn

from compiler.graph import Graph
from compiler.op_table import qualified_name
from compiler.ops.attention import HeadwiseAttention
from compiler.ops.relative_attention import HeadwiseRelativeAttention
from compiler.ops.window_attention import HeadwiseWindowAttention

_SWIN_FUNCTION = "torchvision.models.swin_transformer.shifted_window_attention"
_MAXVIT_LAYER = "torchvision.models.maxvit.RelativePositionalMultiHeadAttention"
_SWIN_LAYERS = {f"torchvision.models.swin_transformer.{name}" for name in ("ShiftedWindowAttention",
                                                                          "ShiftedWindowAttentionV2")}


def _swin_layer(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The path of the torchvision Swin attention layer whose own weights ``node`` calls with."""
    if node.op != "call_function" or qualified_name(node.target) != _SWIN_FUNCTION:
        return None
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if not stack:
        return None
    path, layer_class = stack[-1]
    qkv = node.args[1] if len(node.args) > 1 else None
    ours = isinstance(qkv, fx.Node) and qkv.op == "get_attr" and qkv.target == f"{path}.qkv.weight"
    known = qualified_name(layer_class) in _SWIN_LAYERS
    return path if ours and known and isinstance(node.args[0], fx.Node) else None


def _window_layer(gm: fx.GraphModule, node: fx.Node, path: str) -> HeadwiseWindowAttention:
    """The layer ``node`` computes, from the tensors the graph keeps at ``path`` and the call's settings."""
    call = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    call.apply_defaults()
    settings = call.arguments
    v2 = list(node.meta["nn_module_stack"].values())[-1][1].__name__.endswith("V2")
    return HeadwiseWindowAttention.from_parts(gm.get_submodule(path), settings["num_heads"], settings["window_size"],
                                              settings["shift_size"], settings["attention_dropout"],
                                              settings["dropout"], v2)


def _maxvit_layers(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """The nodes tracing produced inside each torchvision MaxViT attention layer, by its path."""
    layers: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        for path, layer_class in (node.meta.get("nn_module_stack") or {}).values():
            if qualified_name(layer_class) == _MAXVIT_LAYER:
                layers.setdefault(path, []).append(node)
                break
    return layers


def _attribute(gm: fx.GraphModule, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _collapse_maxvit(gm: fx.GraphModule, path: str, nodes: list[fx.Node]) -> bool:
    """Replace the traced body of MaxViT's attention at ``path`` (one input: what ``to_qkv`` reads;
    one output: ``merge``'s call) by one call of a ``HeadwiseRelativeAttention`` there."""
    inside = set(nodes)
    qkv = [n for n in nodes if n.op == "call_module" and n.target == f"{path}.to_qkv"]
    merge = [n for n in nodes if n.op == "call_module" and n.target == f"{path}.merge"]
    if len(qkv) != 1 or len(merge) != 1 or any(u not in inside for n in nodes if n is not merge[0] for u in n.users):
        return False
    lookups = [n for n in nodes if n.target is operator.getitem and isinstance(n.args[0], fx.Node)
               and n.args[0].op == "get_attr" and n.args[0].target == f"{path}.relative_position_bias_table"]
    index = lookups[0].args[1] if len(lookups) == 1 else None
    if not (isinstance(index, fx.Node) and index.op == "get_attr"):
        return False
    x = qkv[0].args[0]
    layer = HeadwiseRelativeAttention.from_parts(gm.get_submodule(path), _attribute(gm, index.target))
    gm.set_submodule(path, layer)
    with gm.graph.inserting_before(merge[0]):
        call = gm.graph.call_module(path, (x,))
    call.meta = dict(merge[0].meta)
    merge[0].replace_all_uses_with(call)
    return True


def headwise_forms(graph: Graph, multihead: bool = False) -> int:
    """Replace Swin's window-attention calls in ``graph`` (in place) by ``HeadwiseWindowAttention``
    calls, MaxViT's attention layers by ``HeadwiseRelativeAttention`` calls, and with ``multihead`` every ``nn.MultiheadAttention`` by a ``HeadwiseAttention`` (the
    same call; its output projection then runs as a layer, whose input a head-importance score
    reads); returns how many were replaced."""
    gm = graph.module
    replaced = 0
    for node in list(gm.graph.nodes) if multihead else []:
        layer = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(layer, nn.MultiheadAttention) and layer.bias_k is None and not layer.add_zero_attn:
            gm.set_submodule(node.target, HeadwiseAttention.from_torch(layer))
            replaced += 1
    for node in list(gm.graph.nodes):
        path = _swin_layer(gm, node)
        if path is None:
            continue
        gm.set_submodule(path, _window_layer(gm, node, path))
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(path, (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        replaced += 1
    for path, nodes in _maxvit_layers(gm).items():
        replaced += _collapse_maxvit(gm, path, nodes)
    if replaced:
        gm.graph.eliminate_dead_code()   # the weights' get_attr nodes and the bias-table computation
        gm.recompile()
        graph.propagate_shapes()
    return replaced
