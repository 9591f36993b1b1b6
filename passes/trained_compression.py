"""What the weight-sharing and sparsity passes that *train* share (``cluster-train``,
``sparsify-train``): their training options, their data, the layers they take, the training run
inside the pass, and the deployment of a learned codebook assignment to the LUT / CSR layers.

The training runs inside the pass, in one process, with ``compiler.finetune.train`` (the method's
regularizer / training layers / step callback); ``squeezer compress --data`` and recipes fill
``train_data``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from compiler import Pass, PassError, PassReport
from compiler.graph import Graph
from compiler.linear_forms import linear_forms
from compiler.ops.lut_linear import SUPPORTED_BITS, LutConv2d, LutLinear, pack_indices
from compiler.ops.sparse import SparseConv2d, SparseLinear, dense_to_csr, plain_conv


@dataclass(frozen=True)
class TrainedCompression(Pass):
    """Base of the passes that train the model toward a compressed form (not registered)."""

    verify_tolerance = None   # lossy: training changes the weights
    reported = ("params", "stored_bytes")

    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    layers: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    # (x, y) tensors or a Dataset of (x, y); filled from --data by `squeezer compress` and by recipes
    train_data: Any = field(default=None, compare=False, repr=False, metadata={"spec": False})

    def validate(self) -> None:
        self.check_range("epochs", 0, None, integer=True)
        self.check_range("lr", 0.0, None, lo_open=True)
        self.check_range("batch_size", 1, None, integer=True)
        self.check_range("seed", 0, None, integer=True)
        self.check_pattern_tuples("layers", "exclude")

    def dataset(self) -> Dataset:
        data = self.train_data
        if data is None:
            raise PassError(f"{self.name}: trains on data: give train_data=(x, y) in Python, or --data mnist|FILE "
                            "to `squeezer compress` (the demo and recipes pass their training set)")
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
            return TensorDataset(*data)
        if isinstance(data, Dataset):
            return data
        self._fail("train_data", type(data).__name__, "(x, y) tensors or a Dataset of (x, y) pairs")

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

    def train(self, graph: Graph, report: PassReport, **hooks: Any):
        """Train ``graph.module`` in place on ``train_data`` with ``hooks`` (TrainConfig fields)."""
        from compiler.distributed import world
        from compiler.finetune import TrainConfig, train

        if world().distributed:
            raise PassError(f"{self.name}: trains inside the pass, in one process; under torchrun use its "
                            "regularizer / training layers with compiler.finetune.train")
        config = TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed,
                             progress=False, **hooks)
        history = train(graph.module, self.dataset(), config)
        if history.losses:
            report.stats["training_loss"] = f"{history.losses[0]:.4f} -> {history.losses[-1]:.4f}"
        return history

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.dataset()) / self.batch_size)


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
