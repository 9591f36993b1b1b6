"""What every pass that trains inside itself shares (SSL, Soft Filter Pruning, the trained weight
sharing, sparsity, hashing and low-rank passes): the training options, the data they train on, and
the training run — in one process, since a pass is decided on rank 0 and broadcast; under
``torchrun`` a method's regularizer or callback goes through ``compiler.finetune.train`` instead.
``squeezer compress --data``, the demo and recipes fill ``train_data``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from compiler import Pass, PassError, PassReport
from compiler.graph import Graph


@dataclass(frozen=True)
class TrainingPass(Pass):
    """Base of the passes that train on ``train_data`` (not registered)."""

    verify_tolerance = None   # lossy: training changes the weights
    torchrun_hint = "use its regularizer / training layers with compiler.finetune.train"

    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    # (x, y) tensors or a Dataset of (x, y); filled from --data by `squeezer compress` and by recipes
    train_data: Any = field(default=None, compare=False, repr=False, metadata={"spec": False})

    def validate(self) -> None:
        self.check_range("epochs", 0, None, integer=True)
        self.check_range("lr", 0.0, None, lo_open=True)
        self.check_range("batch_size", 1, None, integer=True)
        self.check_range("seed", 0, None, integer=True)

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

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.dataset()) / self.batch_size)

    def train(self, graph: Graph, report: PassReport, **hooks: Any):
        """Train ``graph.module`` in place on ``train_data`` with ``hooks`` (TrainConfig fields)."""
        from compiler.distributed import world
        from compiler.finetune import TrainConfig, train

        if world().distributed:
            raise PassError(f"{self.name}: trains inside the pass, in one process; under torchrun {self.torchrun_hint}")
        config = TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed,
                             progress=False, **hooks)
        history = train(graph.module, self.dataset(), config)
        if history.losses:
            report.stats["training_loss"] = f"{history.losses[0]:.4f} -> {history.losses[-1]:.4f}"
        return history
