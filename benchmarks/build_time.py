"""Suite "build-time": what constant folding in numpy (codegen/numpy_folding.py) saves a build.

Each model is traced once and built for ``llvm`` with the default options, alternately with the
numpy folds and without them (every constant call then goes through TVM's FoldConstant, which
builds and runs a kernel for it), in one process, round after round. Reported per model: the
median build time of each and their ratio, and whether the two modules' outputs on the same input
are bit for bit equal (they must be: the folds are exact)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Sequence
from unittest import mock

import numpy as np
import torch

from . import harness as h

DEFAULT = ["resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny", "vit_b_32"]
QUICK = ["squeezenet1_1"]
COLUMNS = [("model", "model", "s"), ("foldconstant_s", "FoldConstant only: build s", ".1f"),
           ("numpy_fold_s", "numpy folds first: build s", ".1f"), ("speedup", "speed-up", ".2f"),
           ("bitwise_equal", "outputs bit for bit equal", "s")]


def _build(graph, x: torch.Tensor, numpy_folds: bool) -> tuple[float, np.ndarray]:
    import codegen
    import codegen.relax_pipeline as pipeline

    fold = pipeline.numpy_fold_constants if numpy_folds else (lambda mod: mod)
    with mock.patch.object(pipeline, "numpy_fold_constants", fold):
        start = time.perf_counter()
        module = codegen.build(graph, "llvm")
        seconds = time.perf_counter() - start
    return seconds, np.asarray(module(x))


def row(name: str, rounds: int) -> dict[str, Any]:
    import compiler
    from .pruning_coverage import model_and_input

    torch.manual_seed(0)
    model, x = model_and_input(name)
    graph = compiler.trace(model, x)
    times: dict[bool, list[float]] = {False: [], True: []}
    outputs: dict[bool, np.ndarray] = {}
    for _ in range(rounds):
        for numpy_folds in (False, True):
            seconds, outputs[numpy_folds] = _build(graph, x, numpy_folds)
            times[numpy_folds].append(seconds)
    stock, ours = statistics.median(times[False]), statistics.median(times[True])
    return {"model": name, "foldconstant_s": stock, "numpy_fold_s": ours, "speedup": stock / ours,
            "bitwise_equal": "yes" if np.array_equal(outputs[False], outputs[True]) else "no",
            "rounds": {"foldconstant": times[False], "numpy_fold": times[True]}}


def run(models: Sequence[str] | None = None, batches: Sequence[int] | None = None, *, quick: bool = False,
        out: str | Path | None = None, threads: int | None = None) -> dict[str, Any]:
    threads = threads or h.CPU_COUNT
    h.set_thread_counts(threads)
    rows = []
    for name in list(models) if models else QUICK if quick else DEFAULT:
        rows.append(row(name, rounds=1 if quick else 2))
        print(f"{name}: {json.dumps(rows[-1])}", flush=True)
    return h.write_sweep("build-time", rows, lambda rows: _report(rows, threads), rerun=bool(models),
                         quick=quick, out=out)


def _report(rows: list[dict[str, Any]], threads: int) -> str:
    lines = [*h.sweep_header(f"build-time (torchvision classifiers, 1×3×224×224, `llvm`; {threads} thread(s))"),
             "Each model built alternately without and with the numpy constant folds, in one process "
             "(median of the rounds; tracing not included). Both builds' outputs on the same input are "
             "compared bit for bit.", ""]
    return "\n".join(lines) + h.markdown_table(rows, COLUMNS)
