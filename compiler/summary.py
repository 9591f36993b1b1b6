"""`summarize`: parameters, MACs and bytes as actually stored — per layer and in total."""

from __future__ import annotations

import json
import operator
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .graph import Graph
from .ops.library import CompressedLayer


@dataclass
class LayerSummary:
    name: str
    kind: str
    params: int
    macs: int
    stored_bytes: int
    output_shape: tuple | None


@dataclass
class Summary:
    layers: list[LayerSummary] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def total_bytes(self) -> int:
        return sum(layer.stored_bytes for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [asdict(layer) for layer in self.layers],
                "total": {"params": self.total_params, "macs": self.total_macs, "stored_bytes": self.total_bytes}}

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), default=str, **kw)

    def table(self) -> str:
        head = f"{'layer':<32}{'kind':<22}{'params':>10}{'MACs':>14}{'bytes':>12}  output"
        rows = [head, "-" * len(head)]
        for s in self.layers:
            rows.append(f"{s.name[:31]:<32}{s.kind[:21]:<22}{s.params:>10,}{s.macs:>14,}{s.stored_bytes:>12,}  {s.output_shape}")
        rows.append("-" * len(head))
        rows.append(f"{'total':<54}{self.total_params:>10,}{self.total_macs:>14,}{self.total_bytes:>12,}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def _numel(shape: Any) -> int:
    return math.prod(shape) if shape and all(isinstance(d, int) for d in shape) else 0


def _module_macs(m: nn.Module, in_shape: Any, out_shape: Any, arg_shapes: list | None = None) -> int:
    out = _numel(out_shape)
    if isinstance(m, CompressedLayer):
        return m.macs(in_shape, out_shape)
    if isinstance(m, nn.modules.conv._ConvTransposeNd):  # each input element scatters to a kernel
        return _numel(in_shape) * (m.out_channels // m.groups) * math.prod(m.kernel_size)
    if isinstance(m, nn.modules.conv._ConvNd):
        return out * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    if isinstance(m, nn.Linear):
        return out * m.in_features
    if isinstance(m, nn.MultiheadAttention) and arg_shapes and len(arg_shapes) >= 2 and arg_shapes[0] and arg_shapes[1]:
        q, k = arg_shapes[0], arg_shapes[1]
        if len(q) == 3 and len(k) == 3:
            q_tokens, k_tokens = q[0] * q[1], k[0] * k[1]  # L*N either layout
            src_len = k[1] if m.batch_first else k[0]
            e = m.embed_dim
            # q projection, k and v projections, QK^T and AV, output projection
            return q_tokens * e * e + 2 * k_tokens * e * e + 2 * q_tokens * src_len * e + q_tokens * e * e
    return 0


def _function_macs(node: torch.fx.Node) -> int:
    shapes = [a.meta.get("shape") for a in node.all_input_nodes]
    out = _numel(node.meta.get("shape"))
    t = node.target
    if t in (torch.matmul, torch.bmm, torch.mm, operator.matmul) and shapes and shapes[0]:
        return out * shapes[0][-1]
    if t is F.linear and shapes and shapes[0]:
        return out * shapes[0][-1]
    if t in (F.conv1d, F.conv2d, F.conv3d) and len(shapes) > 1 and shapes[1]:
        return out * _numel(shapes[1][1:])
    if t is F.scaled_dot_product_attention and len(shapes) >= 3 and shapes[0] and shapes[1]:
        q, k = shapes[0], shapes[1]
        return _numel(q[:-1]) * k[-2] * q[-1] * 2  # QK^T and attn @ V
    return 0


def summarize(graph: Graph) -> Summary:
    """Per-layer parameters, MACs on the example inputs, and bytes as stored (packed storage counts at
    its real size). Parameters owned directly by the root (``get_attr``) are listed as their own rows."""
    summary = Summary()
    seen: set[int] = set()
    for node in graph.module.graph.nodes:
        if node.op == "call_module":
            m = graph.module.get_submodule(node.target)
            fresh = [t for t in [*m.parameters(), *m.buffers()] if id(t) not in seen]  # tied weights count once
            first_use = len(fresh) == len([*m.parameters(), *m.buffers()])
            seen.update(id(t) for t in fresh)
            if isinstance(m, CompressedLayer):
                params, stored = (m.dense_params(), m.stored_bytes()) if first_use else (0, 0)
            else:
                params = sum(t.numel() for t in fresh if isinstance(t, nn.Parameter))
                stored = sum(t.numel() * t.element_size() for t in fresh)
            arg_shapes = [a.meta.get("shape") if isinstance(a, torch.fx.Node) else None for a in node.args]
            in_shape = arg_shapes[0] if arg_shapes else None
            summary.layers.append(LayerSummary(node.target, type(m).__name__, params,
                                               _module_macs(m, in_shape, node.meta.get("shape"), arg_shapes), stored,
                                               node.meta.get("shape")))
        elif node.op == "call_function":
            macs = _function_macs(node)
            if macs:
                name = getattr(node.target, "__name__", str(node.target))
                summary.layers.append(LayerSummary(node.name, name, 0, macs, 0, node.meta.get("shape")))
        elif node.op == "get_attr":
            t = graph.module
            for part in node.target.split("."):
                t = getattr(t, part)
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                summary.layers.append(LayerSummary(node.target, "tensor", t.numel() if t.is_floating_point() else 0,
                                                   0, t.numel() * t.element_size(), tuple(t.shape)))
    return summary
