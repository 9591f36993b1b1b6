"""`build`: Graph -> CompiledModule for the host CPU or CUDA."""

from __future__ import annotations

import json
from typing import Any

import torch
import tvm

import compiler
from compiler.errors import BuildError, OptionError, last_line
from compiler.graph import Graph

from .artifact import CompiledModule, RuntimeWeightSet, runtime_versions
from .frontend import import_graph, lift_runtime_weights
from .lowering import collecting_runtime_weights
from .lowering.bitserial import binary_policy
from .lowering.sparse import sparse_policy
from .relax_pipeline import pipeline_for
from .target import resolve_target


def build(graph: Graph, target: Any = "llvm", *, database: Any = None, sparse_kernels: str = "auto",
          binary_kernels: str = "auto", default_schedules: bool = True) -> CompiledModule:
    """Export ``graph`` with torch.export, import it into Relax (our compressed ops lowered to their
    kernels), schedule every operator (tuning records from ``database`` first, our default rules
    for the rest) and compile for ``target``.

    ``sparse_kernels``: ``"auto"`` times each sparse / clustered layer's kernel against a dense
    matmul of its decoded weight on the target and keeps the faster; ``"sparse"`` / ``"dense"``
    force one. Either way the module stores the layer encoded (see weight_codec.py).

    ``binary_kernels``: for pure ±1 layers (BNN / XNOR-Net) that AMX can take (stride-1 convs,
    dense with >= 16 rows) on a target and process with AMX-INT8, ``"auto"`` times the AMX-tile
    and xnor-popcount kernels and keeps the faster; ``"amx"`` / ``"popcount"`` force one
    (lowering/bitserial.py).

    ``default_schedules=False``: on CPU, operators without a tuning record keep TVM's stock
    (unscheduled) lowering instead of our rules: the baseline for what tuning alone finds
    (``tune(..., default_schedules=False)``). Our hand-written kernels keep their schedules."""
    if not isinstance(graph, Graph):
        raise BuildError(f"build() needs a compiler.Graph (from compiler.trace), got {type(graph).__name__}")
    if not isinstance(default_schedules, bool):
        raise OptionError(f"build: default_schedules must be True or False, got {default_schedules!r}")
    tgt = resolve_target(target)
    # lowerings of compressed ops pick target-specific kernels (Target.current())
    with tgt, sparse_policy(sparse_kernels), binary_policy(binary_kernels), collecting_runtime_weights() as store:
        mod, inputs, outputs = import_graph(graph)
        mod, weight_specs, embedded_bytes = lift_runtime_weights(mod, store)
    try:
        ex = tvm.compile(mod, target=tgt, relax_pipeline=pipeline_for(tgt, database,
                                                                     default_schedules=default_schedules))
    except BuildError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise BuildError(f"TVM failed to compile for {tgt.kind.name}: {type(exc).__name__}: "
                         f"{last_line(exc)}") from exc
    versions = {**runtime_versions(), "torch": torch.__version__, "squeezer": compiler.__version__}
    target_json = json.loads(str(tgt))
    weights = RuntimeWeightSet.from_build(store, weight_specs, embedded_bytes) if weight_specs else None
    return CompiledModule(ex, target_json, [s.to_dict() for s in inputs], [s.to_dict() for s in outputs],
                          list(graph.history), versions, weights=weights)
