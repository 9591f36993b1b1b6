"""`build`: Graph -> CompiledModule for the host CPU or CUDA."""

from __future__ import annotations

import json
from typing import Any

import torch
import tvm
from tvm import relax

import compiler
from compiler.errors import BuildError, BuildOptionError, last_line
from compiler.graph import Graph

from . import stack_buffers, threads
from .artifact import SIGNATURE, CompiledModule, RuntimeWeightSet, runtime_versions, signature_of
from .frontend import import_graph, lift_runtime_weights
from .lowering.context import RuntimeWeights
from .options import BuildOptions
from .relax_pipeline import pipeline_for


def _with_signature(mod: tvm.IRModule, signature: dict) -> tvm.IRModule:
    """Add ``squeezer_signature() -> str`` to the module: the library then carries what ``main``
    takes and returns, and ``load`` checks the manifest against it (artifact.py)."""
    bb = relax.BlockBuilder()
    with bb.function(SIGNATURE, []):
        bb.emit_func_output(tvm.ir.StringImm(json.dumps(signature, sort_keys=True)))
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    out[SIGNATURE] = bb.get()[SIGNATURE]
    return out


def build(graph: Graph, target: Any = "llvm", *, database: Any = None, sparse_kernels: str = "auto",
          binary_kernels: str = "auto", default_schedules: bool = True,
          num_threads: int | None = None, int_kernels: str = "auto") -> CompiledModule:
    """Export ``graph`` with torch.export, import it into Relax (our compressed ops lowered to their
    kernels), schedule every operator (tuning records from ``database`` first, our default rules
    for the rest) and compile for ``target``.

    ``sparse_kernels``: ``"auto"`` times each sparse / clustered layer's kernel against a dense
    matmul of its decoded weight on the target and keeps the faster; ``"sparse"`` / ``"dense"``
    force one. Either way the module stores the layer encoded (see weight_codec.py).

    ``binary_kernels``: for pure ±1 layers (BNN / XNOR-Net) that AMX can take (stride-1 convs,
    dense with >= 16 rows) on a target and process with AMX-INT8, ``"auto"`` times the AMX-tile
    and xnor-popcount kernels and keeps the faster; ``"amx"`` / ``"popcount"`` force one
    (kernel_choice.py).

    ``int_kernels``: for int8 layers (``passes.Quantize``), ``"auto"`` runs AMX-INT8 tiles where
    the layer has 16+ rows and the target and process have AMX, else AVX512-VNNI, else a portable
    TE kernel; ``"amx"`` / ``"vnni"`` / ``"generic"`` force one.

    ``default_schedules=False``: on CPU, operators without a tuning record keep TVM's stock
    (unscheduled) lowering instead of our rules: the baseline for what tuning alone finds
    (``tune(..., default_schedules=False)``). Our hand-written kernels keep their schedules.

    ``num_threads``: CPU threads per call of the module (None: one per core this process may use;
    ``m.num_threads`` changes it later).

    A bad option value is a BuildOptionError (an OptionError and a BuildError); a failure while
    building is a BuildError."""
    if not isinstance(graph, Graph):
        raise BuildError(f"build() needs a compiler.Graph (from compiler.trace), got {type(graph).__name__}")
    num_threads = threads.check(num_threads, "build", BuildOptionError)
    options = BuildOptions.create(target, database=database, sparse_kernels=sparse_kernels,
                                  binary_kernels=binary_kernels, default_schedules=default_schedules,
                                  int_kernels=int_kernels)
    store = RuntimeWeights()
    mod, inputs, outputs = import_graph(graph, options, store)
    mod, weight_specs, embedded_bytes = lift_runtime_weights(mod, store)
    mod = _with_signature(mod, signature_of([s.to_dict() for s in inputs], [s.to_dict() for s in outputs], weight_specs))
    tgt = options.target
    try:
        ex = tvm.compile(mod, target=tgt, relax_pipeline=pipeline_for(options), tir_pipeline=stack_buffers.register())
    except BuildError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise BuildError(f"TVM failed to compile for {tgt.kind.name}: {type(exc).__name__}: "
                         f"{last_line(exc)}") from exc
    versions = {**runtime_versions(), "torch": torch.__version__, "squeezer": compiler.__version__}
    weights = RuntimeWeightSet.from_build(store, weight_specs, embedded_bytes) if weight_specs else None
    return CompiledModule(ex, json.loads(str(tgt)), [s.to_dict() for s in inputs], [s.to_dict() for s in outputs],
                          list(graph.history), versions, weights=weights, num_threads=num_threads)
