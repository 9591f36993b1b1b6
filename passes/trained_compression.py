"""What the weight-sharing and sparsity passes that *train* share (``cluster-train``,
``sparsify-train``): their training options, their data, the layers they take, the training run
inside the pass, and the deployment of a learned codebook assignment to the LUT / CSR layers.

The training runs inside the pass, in one process, with ``compiler.finetune.train`` (the method's
regularizer / training layers / step callback); ``squeezer compress --data`` and recipes fill
``train_data``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compiler import PassReport
from compiler.graph import Graph
from compiler.linear_forms import linear_forms
from compiler.ops.lut_linear import SUPPORTED_BITS, LutConv2d, LutLinear, pack_indices
from compiler.ops.sparse import SparseConv2d, SparseLinear, dense_to_csr, plain_conv

from .training_pass import TrainingPass


@dataclass(frozen=True)
class TrainedCompression(TrainingPass):
    """Base of the passes that train the model toward a compressed form (not registered)."""

    reported = ("params", "stored_bytes")

    layers: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def validate(self) -> None:
        super().validate()
        self.check_pattern_tuples("layers", "exclude")

    def requires(self, graph: Graph) -> None:
        self.check_patterns(graph, "layers/exclude", (*self.layers, *self.exclude))
        self.dataset()   # missing data is an error before anything is copied

    def targets(self, graph: Graph, report: PassReport) -> dict[str, nn.Module]:
        """The plain Linear and groups=1 Conv2d layers the pass compresses (``layers``/``exclude``)."""
        linear_forms(graph)   # GPT-2's Conv1D: an nn.Linear first
        chosen = {}
        for name, mod in graph.layers().items():
            if type(mod) not in (nn.Linear, nn.Conv2d) or not self.selects(name, report):
                continue
            if isinstance(mod, nn.Conv2d) and not plain_conv(mod):
                report.skip(name, f"conv with groups={mod.groups}, padding {mod.padding!r}/{mod.padding_mode} "
                                  "is not stored in LUT/CSR layers")
                continue
            chosen[name] = mod
        return chosen


def deploy_codebook(mod: nn.Module, idx: torch.Tensor, codebook: torch.Tensor, *, zero_index: int | None = None,
                    sparse: bool = False) -> nn.Module:
    """The layer ``mod`` (Linear / Conv2d) with weight ``codebook[idx]``: a LUT layer (packed
    indices, ``codebook`` of at most 256 entries), or — ``sparse`` with ``zero_index`` the index of
    the entry 0.0 — a CSR layer storing only the weights not at ``zero_index``, each as an index
    into the other entries (sparse + clustered, as Deep Compression stores them)."""
    rows = idx.reshape(idx.shape[0], -1).long()
    cb = codebook.detach().float().reshape(-1)
    if sparse and zero_index is not None:
        keep = rows != zero_index
        others = torch.cat([cb[:zero_index], cb[zero_index + 1:]])
        shifted = (rows - (rows > zero_index).long()).float()
        values, cols, ptr = dense_to_csr(shifted, keep)
        values = values.to(torch.uint8)
        if not len(others):   # every weight is zero: a one-entry codebook nobody reads
            others = torch.zeros(1)
        if isinstance(mod, nn.Linear):
            return SparseLinear(values, cols, ptr, others, mod.bias, mod.in_features)
        return SparseConv2d(values, cols, ptr, others, mod.bias, tuple(mod.weight.shape), mod.stride, mod.padding,
                            mod.dilation)
    bits = next(b for b in SUPPORTED_BITS if 2 ** b >= len(cb))
    packed = pack_indices(rows, bits)
    if isinstance(mod, nn.Linear):
        return LutLinear(packed, cb, mod.bias, bits, mod.in_features)
    return LutConv2d(packed, cb, mod.bias, bits, tuple(mod.weight.shape), mod.stride, mod.padding, mod.dilation)
