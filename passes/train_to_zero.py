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

from dataclasses import dataclass
from typing import Any

import torch

from compiler import PassReport
from compiler.graph import Graph

from .channel_pruning import ChannelPruning
from .training_pass import TrainingPass

REMOVAL_PROBE = 256   # training inputs on which the removal's output change is measured


@dataclass(frozen=True)
class TrainedChannelRemoval(TrainingPass):
    """Base of the passes that train toward zero channels, then remove them (not registered)."""

    reported = ("params", "macs")
    torchrun_hint = ("train with its regularizer/callback through compiler.finetune.train, then run "
                     "channel-pruning:criterion=zeroed,threshold=0")

    exclude: tuple[str, ...] = ()

    def validate(self) -> None:
        super().validate()
        self.check_pattern_tuples("exclude")

    # ---- what a method adds ------------------------------------------------------------------------
    def training_hooks(self, graph: Graph, steps_per_epoch: int) -> dict[str, Any]:
        """``TrainConfig`` fields for this method (``regularizer`` / ``step_callback``)."""
        return {}

    def settle(self, graph: Graph, report: PassReport, hooks: dict[str, Any]) -> None:
        """After training, before the removal (e.g. SSL sets groups below its threshold to zero)."""

    # ---- the pass ---------------------------------------------------------------------------------
    def removal(self) -> ChannelPruning:
        return ChannelPruning(criterion="zeroed", threshold=0.0, exclude=self.exclude)

    def requires(self, graph: Graph) -> None:
        self.check_patterns(graph, "exclude", self.exclude)
        self.dataset()   # missing data is an error before anything is copied

    def run(self, graph: Graph, report: PassReport) -> Graph:
        data = self.dataset()
        hooks = self.training_hooks(graph, self.steps_per_epoch())
        self.train(graph, report, **hooks)
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
