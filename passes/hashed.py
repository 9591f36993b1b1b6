"""HashedNets (pass ``hashed``): Chen, Wilson, Tyree, Weinberger & Chen, "Compressing Neural Networks
with the Hashing Trick", ICML 2015.

Each chosen Linear layer's (out, in) weight becomes *virtual*: ``V[i, j] = ξ(i, j) · w[h(i, j)]``
with ``K = ceil(out · in / compression)`` buckets ``w`` shared by hashing, ``h`` the bucket hash and
``ξ`` the sign hash (each layer its own hash seed, as the paper hashes each layer independently).
The layer stores only ``w`` and its bias (:class:`compiler.ops.HashedLinear`, op
``squeezer::hashed_linear``, whose compiled kernel evaluates the same hash). The buckets start at
the least-squares fit of the trained weight (each bucket the mean of ``ξ · W`` over its positions —
the paper trains from scratch; starting from the trained model converges in a few epochs), then the
whole network trains on ``train_data`` with the buckets' gradient the sum of ``ξ · ∂L/∂V`` over the
positions sharing each bucket (the paper's Eq. 12; autograd of the op gives it). Conv layers are
left as they are (the paper hashes fully connected layers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from compiler import PassReport, register_pass
from compiler.graph import Graph
from compiler.ops.hashed import MAX_SEED, HashedLinear

from .trained_compression import TrainedCompression


@register_pass
@dataclass(frozen=True)
class HashedNets(TrainedCompression):
    """HashedNets (Chen et al. 2015): Linear weights drawn from K hashed buckets, the buckets trained."""

    name = "hashed"

    compression: float = 8.0     # virtual weights per stored bucket: K = ceil(out * in / compression)
    hash_seed: int = 0           # layer l hashes with seed hash_seed + l

    def validate(self) -> None:
        super().validate()
        self.check_range("compression", 1.0, None)
        self.check_range("hash_seed", 0, MAX_SEED // 2, integer=True)

    def buckets_for(self, linear: nn.Linear) -> int:
        return max(1, math.ceil(linear.out_features * linear.in_features / self.compression))

    def run(self, graph: Graph, report: PassReport) -> Graph:
        chosen = {}
        for name, mod in self.targets(graph, report).items():
            if isinstance(mod, nn.Linear):
                chosen[name] = mod
            else:
                report.skip(name, "HashedNets hashes fully connected layers; convolutions are left dense")
        if not chosen:
            return graph
        self.dataset()
        for i, (name, mod) in enumerate(chosen.items()):
            layer = HashedLinear.from_linear(mod, self.buckets_for(mod), seed=self.hash_seed + i)
            graph.module.set_submodule(name, layer)
            report.change(f"{name}: Linear -> HashedLinear ({layer.out_features}x{layer.in_features} virtual weights "
                          f"in {layer.num_buckets} buckets, seed {layer.seed})")
        if self.epochs:
            self.train(graph, report)
        report.stats["buckets"] = sum(graph.module.get_submodule(n).num_buckets for n in chosen)
        return graph
