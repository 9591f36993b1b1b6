"""The Deep Compression pipeline (Han, Mao & Dally, ICLR 2016): prune → fine-tune with fixed masks →
cluster the surviving weights → fine-tune the centroids → Huffman-code (at export). Fine-tuning
distills from the original model (Hinton et al. 2015). Used by ``squeezer demo --variant
deep-compression`` and the ``deep-compression`` benchmark."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from .finetune import TrainConfig, batches_of, evaluate, train
from .graph import Graph
from .pipeline import Pipeline
from .registry import parse_pass_spec


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

    def prune_specs(self) -> list[str]:
        return [f"sparsify:sparsity={self.sparsity},scope={self.scope},stage=train"]

    def cluster_specs(self) -> list[str]:
        return [f"cluster:bits={self.bits}"]


def deep_compress(graph: Graph, train_data, test_data, config: DeepCompressionConfig = DeepCompressionConfig(),
                  *, batch: int = 64, progress: bool = False, log=print) -> tuple[Graph, dict]:
    """``graph`` compressed (sparse + clustered layers, weights fine-tuned) and per-stage accuracies."""
    from passes.sparsity import agp_callback

    (xtr, ytr), (xte, yte) = train_data, test_data
    test = batches_of(xte, yte, 250)
    teacher = graph.module
    stats = {"accuracy_original": evaluate(teacher, test)}
    t = time.perf_counter()
    if config.gradual_steps:
        g = Pipeline([parse_pass_spec(f"sparsify:sparsity=0.0,scope={config.scope},stage=train")])(graph)
        callback = agp_callback(config.sparsity, config.gradual_steps, scope=config.scope)
    else:
        g = Pipeline([parse_pass_spec(s) for s in config.prune_specs()])(graph)
        callback = None
    stats["accuracy_pruned"] = evaluate(g.module, test)
    cfg = TrainConfig(epochs=config.prune_epochs, lr=config.lr, seed=1, progress=progress, step_callback=callback)
    train(g.module, batches_of(xtr, ytr, batch, shuffle=True, seed=1), cfg, teacher=teacher)
    stats["accuracy_pruned_finetuned"] = evaluate(g.module, test)
    g = Pipeline([parse_pass_spec(s) for s in config.cluster_specs()])(g)
    stats["accuracy_clustered"] = evaluate(g.module, test)
    cfg = dataclasses.replace(cfg, epochs=config.cluster_epochs, lr=config.cluster_lr, step_callback=None)
    train(g.module, batches_of(xtr, ytr, batch, shuffle=True, seed=2), cfg, teacher=teacher)
    stats["accuracy_clustered_finetuned"] = evaluate(g.module, test)
    stats["seconds"] = time.perf_counter() - t
    for r in g.reports:
        log(str(r))
    return g, stats


def dense_fp32_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * 4 for p in module.parameters())
