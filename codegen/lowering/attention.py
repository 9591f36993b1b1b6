"""``aten.scaled_dot_product_attention`` on CPU as one fused kernel (kernels/attention_cpu.py).

torch's decomposition (matmuls around a safe softmax) is kept for what the kernel does not take:
dropout, tensors that are not 4-D float32 with static shapes, sequences whose score tile would
not fit the stack. :func:`keeps_attention` decides before the exported program is decomposed, so
a graph either keeps every attention call whole or none (the decomposition table is per program)."""

from __future__ import annotations

import hashlib
import math

import torch
from tvm import relax

from ..kernels.attention_cpu import attention_kernel, padded_keys, supported
from ..schedules.cpu import vector_lanes
from .context import LoweringContext

SDPA = torch.ops.aten.scaled_dot_product_attention.default
NEG_INF = float("-inf")


def _args(node) -> dict:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    found = dict(zip(names, node.args))
    found.update(node.kwargs)
    return {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False, **found}


def _static_shape(value) -> tuple[int, ...] | None:
    try:
        return tuple(int(d) for d in value.shape)
    except (TypeError, ValueError):
        return None


def _fits(node, lanes: int) -> bool:
    a = _args(node)
    vals = [n.meta.get("val") for n in (a["query"], a["key"], a["value"])]
    if any(v is None or v.dtype != torch.float32 or v.dim() != 4 for v in vals):
        return False
    shapes = [_static_shape(v) for v in vals]
    if None in shapes or a["dropout_p"] != 0.0:
        return False
    (b, h, _, d), (bk, hk, s, dk), (bv, hv, sv, _) = shapes
    if b != bk or b != bv or hk != hv or s != sv or d != dk or h % hk or (hk != h and not a["enable_gqa"]):
        return False
    mask = a["attn_mask"]
    if mask is not None:
        m = mask.meta.get("val")
        if m is None or m.dtype not in (torch.float32, torch.bool) or m.dim() > 4 or _static_shape(m) is None:
            return False
    return supported(s, lanes)


def keeps_attention(ep: torch.export.ExportedProgram, options) -> bool:
    """Whether every attention call of ``ep`` can run as the fused CPU kernel."""
    if not options.cpu:
        return False
    lanes = vector_lanes(options.target)
    calls = [n for n in ep.graph.nodes if n.op == "call_function" and n.target is SDPA]
    return bool(calls) and all(_fits(n, lanes) for n in calls)


def decompose(ep: torch.export.ExportedProgram, options) -> torch.export.ExportedProgram:
    """torch's default decompositions (TVM's importer takes the core aten set), attention kept
    whole where the fused kernel runs it."""
    table = torch.export.default_decompositions()
    if keeps_attention(ep, options):
        del table[SDPA]
    return ep.run_decompositions(table)


def _mask(bb, mask, keys: int, sp: int):
    """The mask as an additive float32 4-D tensor, its key axis padded with -inf to ``sp``."""
    if mask is None:
        return relax.const(torch.zeros(1, 1, 1, 1).numpy())
    shape = [int(d) for d in mask.ty.shape]
    if mask.ty.dtype == "bool":
        mask = bb.emit(relax.op.where(mask, relax.const(0.0, "float32"), relax.const(NEG_INF, "float32")))
    if len(shape) < 4:
        shape = [1] * (4 - len(shape)) + shape
        mask = bb.emit(relax.op.reshape(mask, shape))
    if shape[-1] > 1 and sp != keys:
        mask = bb.emit(relax.op.nn.pad(mask, [0, 0, 0, 0, 0, 0, 0, sp - keys], pad_value=NEG_INF))
    return mask


def _kernel(bb, geometry: tuple):
    """One PrimFunc per attention geometry (``attention_kernel``'s arguments), built by the first
    layer that has it and shared by the rest (ViT's 12 layers: one)."""
    name = "fused_attention_" + hashlib.sha1(repr(geometry).encode()).hexdigest()[:10]
    mod = bb.get()
    if any(gv.name_hint == name for gv in mod.get_global_vars()):
        return mod.get_global_var(name)
    func = attention_kernel(*geometry)
    return bb.add_func(func.with_attr("global_symbol", name).with_attr("op_pattern", 8), name)


def lower_attention(node, importer, ctx: LoweringContext) -> relax.Expr:
    """``softmax(q kᵀ · scale + mask) v`` as one call of the fused kernel (keys transposed and
    padded to whole vectors by the ops emitted before it)."""
    a = _args(node)
    bb = importer.block_builder
    q, k, v = (importer.env[a[n]] for n in ("query", "key", "value"))
    b, h, rows, depth = (int(d) for d in q.ty.shape)
    kv_heads, keys = int(k.ty.shape[1]), int(k.ty.shape[2])
    value_depth = int(v.ty.shape[3])
    lanes = vector_lanes(ctx.options.target)
    sp = padded_keys(keys, lanes)
    kt = bb.emit(relax.op.permute_dims(k, [0, 1, 3, 2]))
    if sp != keys:
        kt = bb.emit(relax.op.nn.pad(kt, [0, 0, 0, 0, 0, 0, 0, sp - keys]))
        v = bb.emit(relax.op.nn.pad(v, [0, 0, 0, 0, 0, sp - keys, 0, 0]))
    mask = _mask(bb, importer.env[a["attn_mask"]] if a["attn_mask"] is not None else None, keys, sp)
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(depth)
    gv = _kernel(bb, (b, h, kv_heads, rows, keys, depth, value_depth, scale, bool(a["is_causal"]),
                      tuple(int(d) for d in mask.ty.shape), lanes))
    return bb.emit(relax.call_tir(gv, [q, kt, v, mask], relax.TensorType((b, h, rows, value_depth), "float32")))
