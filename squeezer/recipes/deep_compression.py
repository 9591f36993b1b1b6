"""The Deep Compression pipeline (Han, Mao & Dally, ICLR 2016): prune → fine-tune with fixed masks →
cluster the surviving weights → fine-tune the centroids → Huffman-code (at export). Fine-tuning
distills from the original model (Hinton et al. 2015). Used by ``squeezer demo --variant
deep-compression`` and the ``deep-compression`` benchmark."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from compiler.finetune import TrainConfig, batches_of, evaluate
from compiler.graph import Graph
from passes import Sparsify, WeightClustering, agp_callback

from .stages import Recipe, Stage


@dataclass(frozen=True)
class DeepCompressionConfig:
    sparsity: float = 0.92          # the paper keeps 8 % of LeNet-300-100 and LeNet-5
    scope: str = "global"
    bits: int = 5
    prune_epochs: int = 6
    cluster_epochs: int = 3
    lr: float = 1e-3
    cluster_lr: float = 1e-4
    gradual_steps: int = 0          # > 0: reach the sparsity along Zhu & Gupta's schedule over these steps

    def recipe(self, finetune: TrainConfig = TrainConfig(seed=1, progress=False)) -> Recipe:
        """Two stages: masked pruning + fine-tuning, then clustering + centroid fine-tuning.
        ``finetune`` gives the distillation settings (temperature, alpha, seed, progress)."""
        if self.gradual_steps:   # start dense; the AGP callback raises the sparsity during training
            prune = Sparsify(sparsity=0.0, scope=self.scope, stage="train")
            callback = agp_callback(self.sparsity, self.gradual_steps, scope=self.scope)
        else:
            prune, callback = Sparsify(sparsity=self.sparsity, scope=self.scope, stage="train"), None
        prune_cfg = replace(finetune, epochs=self.prune_epochs, lr=self.lr, step_callback=callback)
        cluster_cfg = replace(finetune, epochs=self.cluster_epochs, lr=self.cluster_lr, step_callback=None)
        return Recipe((Stage((prune,), prune_cfg, data_seed=1),
                       Stage((WeightClustering(bits=self.bits),), cluster_cfg, data_seed=2)))


_STAT_NAMES = {(0, "compressed"): "accuracy_pruned", (0, "recovered"): "accuracy_pruned_finetuned",
               (1, "compressed"): "accuracy_clustered", (1, "recovered"): "accuracy_clustered_finetuned"}


def deep_compress(graph: Graph, train_data, test_data, config: DeepCompressionConfig = DeepCompressionConfig(),
                  *, batch: int = 64, progress: bool = False, log=print) -> tuple[Graph, dict]:
    """``graph`` compressed (sparse + clustered layers, weights fine-tuned) and per-stage accuracies."""
    xte, yte = test_data
    test = batches_of(xte, yte, 250)
    stats = {"accuracy_original": evaluate(graph.module, test)}
    t = time.perf_counter()
    recipe = config.recipe(TrainConfig(seed=1, progress=progress))

    def record(stage: int, step: str, g: Graph) -> None:
        stats[_STAT_NAMES[stage, step]] = evaluate(g.module, test)

    g = recipe.run(graph, train_data, batch=batch, on_step=record)
    stats["seconds"] = time.perf_counter() - t
    for r in g.reports:
        log(str(r))
    return g, stats


def dense_fp32_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * 4 for p in module.parameters())
