"""A compression recipe as stages: each applies pass objects, then recovers accuracy by knowledge
distillation (Hinton et al. 2015) from the original model. The demo's variants and Deep
Compression are both written as stages, so the prune → fine-tune → finalize → fine-tune loop exists
once."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch.utils.data import TensorDataset

from compiler.distributed import decided_on_main
from compiler.finetune import TrainConfig, batches_of, train
from compiler.graph import Graph
from compiler.pass_infra import Pass
from compiler.pipeline import Pipeline

Data = tuple[torch.Tensor, torch.Tensor]
CALIBRATION_BATCHES = 8   # training batches a data-driven pass without its own calibration data gets


@dataclass(frozen=True)
class Stage:
    """Passes, then (when ``finetune`` is given and has epochs) distillation fine-tuning on
    batches shuffled with ``data_seed``."""

    passes: tuple[Pass, ...]
    finetune: TrainConfig | None = None
    data_seed: int = 1

    def compress(self, graph: Graph, train_data: Data | None = None, *, batch: int = 64) -> Graph:
        """Apply the passes. A pass with a ``calibration`` field left empty (Quantize, data-driven
        ChannelPruning criteria) gets the first :data:`CALIBRATION_BATCHES` shuffled training batches;
        one with an empty ``train_data`` (passes that train: SSL, Soft Filter Pruning) the training set."""
        if not self.passes:
            return graph
        passes = list(self.passes)
        if train_data is not None and any(getattr(p, "calibration", None) == () for p in passes):
            x, y = train_data
            batches = tuple(batches_of(x, y, batch, shuffle=True, seed=self.data_seed)[:CALIBRATION_BATCHES])
            passes = [replace(p, calibration=batches) if getattr(p, "calibration", None) == () else p for p in passes]
        if train_data is not None:   # passes that train (SSL, Soft Filter Pruning) get the training set
            passes = [replace(p, train_data=train_data) if getattr(p, "train_data", False) is None else p for p in passes]
        # decided once, on rank 0, and broadcast: every rank of a distributed run holds the same architecture
        return decided_on_main(lambda: Pipeline(passes)(graph))

    @property
    def trains(self) -> bool:
        return self.finetune is not None and self.finetune.epochs > 0

    def recover(self, graph: Graph, train_data: Data, *, teacher: torch.nn.Module, batch: int) -> None:
        """Fine-tune ``graph.module`` in place (nothing to do without a fine-tuning config): global
        batches of ``batch`` reshuffled each epoch with ``data_seed``, split over the ranks of a
        distributed run."""
        if self.trains:
            config = replace(self.finetune, batch_size=batch, data_seed=self.data_seed)
            train(graph.module, TensorDataset(*train_data), config, teacher=teacher)


@dataclass(frozen=True)
class Recipe:
    """Stages run in order on one graph."""

    stages: tuple[Stage, ...]

    @property
    def passes(self) -> list[Pass]:
        return [p for s in self.stages for p in s.passes]

    def specs(self) -> list[str]:
        """The passes as spec strings (what a recipe file holds; fine-tuning is not part of it)."""
        return [p.spec() for p in self.passes]

    def with_first_finetune(self, **changes) -> Recipe:
        """The recipe with the first stage's fine-tuning config changed (e.g. ``epochs=0``)."""
        if not self.stages or self.stages[0].finetune is None:
            return self
        first = replace(self.stages[0], finetune=replace(self.stages[0].finetune, **changes))
        return Recipe((first, *self.stages[1:]))

    def with_progress(self, progress: bool) -> Recipe:
        return self.with_finetune(progress=progress)

    def with_finetune(self, **changes) -> Recipe:
        """Every stage's fine-tuning config changed (e.g. ``checkpoint_dir=...``)."""
        return Recipe(tuple(replace(s, finetune=replace(s.finetune, **changes)) if s.finetune else s
                            for s in self.stages))

    def run(self, graph: Graph, train_data: Data, *, batch: int,
            on_step: Callable[[int, str, Graph], None] = lambda *_: None) -> Graph:
        """Run every stage, distilling from ``graph``'s module; ``on_step(stage, "compressed" |
        "recovered", graph)`` is called after each half of each stage (for logs and accuracies)."""
        teacher = graph.module
        for i, stage in enumerate(self.stages):
            graph = stage.compress(graph, train_data, batch=batch)
            on_step(i, "compressed", graph)
            stage.recover(graph, train_data, teacher=teacher, batch=batch)
            on_step(i, "recovered", graph)
        return graph
