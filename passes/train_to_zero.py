"""The shape shared by the training methods that end in structured pruning (Structured Sparsity
Learning, Soft Filter Pruning): train the model on the pass's own data with a method-specific
regularizer or step callback, settle what training left (the report's ``settle_max_abs_change``
measures what that changes), then remove the channels that are zero through channel pruning's
``zeroed`` criterion at ``threshold=0`` — an exact removal, which the report measures
(``removal_max_abs_change``, both on up to 256 training inputs).

The training runs inside the pass, in one process (a pass is decided on rank 0 and broadcast); to
train under ``torchrun``, use the method's regularizer or callback with
``compiler.finetune.train`` and then ``ChannelPruning(criterion="zeroed", threshold=0)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from compiler import Pass, PassError, PassReport
from compiler.graph import Graph

from .channel_pruning import ChannelPruning

REMOVAL_PROBE = 256   # training inputs on which the removal's output change is measured


@dataclass(frozen=True)
class TrainedChannelRemoval(Pass):
    """Base of the passes that train toward zero channels, then remove them (not registered)."""

    verify_tolerance = None  # lossy: training changes the weights
    reported = ("params", "macs")

    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    exclude: tuple[str, ...] = ()
    # (x, y) tensors or a Dataset of (x, y); filled from --data by `squeezer compress` and by recipes
    train_data: Any = field(default=None, compare=False, repr=False, metadata={"spec": False})

    def validate(self) -> None:
        self.check_range("epochs", 0, None, integer=True)
        self.check_range("lr", 0.0, None, lo_open=True)
        self.check_range("batch_size", 1, None, integer=True)
        self.check_range("seed", 0, None, integer=True)
        self.check_pattern_tuples("exclude")

    # ---- what a method adds ------------------------------------------------------------------------
    def training_hooks(self, graph: Graph, steps_per_epoch: int) -> dict[str, Any]:
        """``TrainConfig`` fields for this method (``regularizer`` / ``step_callback``)."""
        return {}

    def settle(self, graph: Graph, report: PassReport, hooks: dict[str, Any]) -> None:
        """After training, before the removal (e.g. SSL sets groups below its threshold to zero)."""

    # ---- the pass ---------------------------------------------------------------------------------
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

    def removal(self) -> ChannelPruning:
        return ChannelPruning(criterion="zeroed", threshold=0.0, exclude=self.exclude)

    def requires(self, graph: Graph) -> None:
        self.check_patterns(graph, "exclude", self.exclude)
        self.dataset()   # missing data is an error before anything is copied

    def run(self, graph: Graph, report: PassReport) -> Graph:
        from compiler.distributed import world
        from compiler.finetune import TrainConfig, train

        if world().distributed:
            raise PassError(f"{self.name}: trains inside the pass, in one process; under torchrun train with its "
                            "regularizer/callback through compiler.finetune.train, then run "
                            "channel-pruning:criterion=zeroed,threshold=0")
        data = self.dataset()
        hooks = self.training_hooks(graph, math.ceil(len(data) / self.batch_size))
        config = TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed,
                             progress=False, **hooks)
        history = train(graph.module, data, config)
        if history.losses:
            report.stats["training_loss"] = f"{history.losses[0]:.4f} -> {history.losses[-1]:.4f}"
        probe = torch.stack([data[i][0] for i in range(min(REMOVAL_PROBE, len(data)))])
        with torch.no_grad():
            trained = graph.module.eval()(probe)
            self.settle(graph, report, hooks)
            before = graph.module.eval()(probe)
            self.removal().run(graph, report)
            graph.recompile()
            after = graph.module.eval()(probe)
        report.stats["settle_max_abs_change"] = float((trained - before).abs().max())
        report.stats["removal_max_abs_change"] = float((before - after).abs().max())
        return graph

    def ensures(self, before: Graph, after: Graph) -> None:
        self.removal().ensures(before, after)
