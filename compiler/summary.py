"""`summarize`: parameters, MACs and bytes as actually stored — per layer and in total."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .graph import Graph
from .op_table import call_macs, module_macs, module_storage


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
            params, stored = module_storage(m, fresh, first_use)
            arg_shapes = [a.meta.get("shape") if isinstance(a, torch.fx.Node) else None for a in node.args]
            summary.layers.append(LayerSummary(node.target, type(m).__name__, params,
                                               module_macs(m, arg_shapes, node.meta.get("shape")), stored,
                                               node.meta.get("shape")))
        elif node.op in ("call_function", "call_method"):
            macs = call_macs(node)
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
