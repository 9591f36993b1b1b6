"""Suite "nan-semantics": what torch's NaN rules (codegen/nan_semantics.py) cost in compiled time.

Each zoo model is built twice in one process — with the NaN-keeping legalizations (the default)
and with TVM's stock ones, which drop NaN in ReLU/clip/max pooling — and both are timed in
alternating rounds. A ratio near 1 means the guarantee is free. Each row also checks the NaN
behaviour itself: a NaN image must give the same NaN mask as torch with the rules, and the
stock build is recorded as keeping or dropping it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import harness as h

NAME = "nan-semantics"
COLUMNS = [("model", "model", "s"), ("batch", "batch", "d"), ("ratio", "with / without NaN rules", ".3f"),
           ("with_ms", "with ms", ".4f"), ("without_ms", "without ms", ".4f"),
           ("nan_kept", "NaN image → NaN (with)", "s"), ("stock_nan_kept", "NaN image → NaN (stock)", "s")]


@contextlib.contextmanager
def stock_legalization() -> Iterator[None]:
    """Build with TVM's own legalizations (the behaviour before the NaN rules)."""
    from codegen import relax_pipeline

    saved = relax_pipeline.nan_legalizations
    relax_pipeline.nan_legalizations = dict
    try:
        yield
    finally:
        relax_pipeline.nan_legalizations = saved


def _nan_kept(module, inputs: Sequence[torch.Tensor]) -> str:
    got = module(*[torch.full_like(x, float("nan")) for x in inputs])
    got = got if isinstance(got, (tuple, list)) else [got]
    return "yes" if all(np.isnan(np.asarray(g)).all() for g in got) else "NO"


def _row(name: str, batch: int, quick: bool) -> dict[str, Any]:
    import codegen
    import compiler
    from squeezer import zoo

    entry = zoo.ZOO[name]
    model, inputs = entry.build(seed=0), entry.example_inputs(batch=batch, seed=0)
    graph = compiler.trace(model, inputs)
    with_rules = codegen.build(graph, "llvm")
    with stock_legalization():
        stock = codegen.build(graph, "llvm")
    reps = 5 if quick else 10

    def timer(m):
        return lambda: m.benchmark(*inputs, number=1, repeat=reps, min_repeat_ms=10)["median_ms"]

    medians, samples = h.interleaved({"with_ms": timer(with_rules), "without_ms": timer(stock)}, 2 if quick else 5)
    return {"model": name, "batch": batch, **medians, "samples_ms": samples,
            "ratio": h.ratio(medians["with_ms"], medians["without_ms"]),
            "nan_kept": _nan_kept(with_rules, inputs), "stock_nan_kept": _nan_kept(stock, inputs)}


def run(models: Sequence[str] | None = None, batches: Sequence[int] | None = None, *, quick: bool = False,
        out: str | Path | None = None, threads: int | None = None) -> dict[str, Any]:
    """Time every zoo model with and without the NaN rules; write ``results/nan_semantics[_quick]``."""
    from squeezer import zoo

    models = list(models or zoo.ZOO)
    batches = list(batches or ([1] if quick else [1, 32]))
    h.set_thread_counts(threads or h.CPU_COUNT)
    rows = []
    for name in models:
        for batch in batches:
            print(f"[{NAME}] {name} batch={batch} ...", file=sys.stderr, flush=True)
            rows.append(_row(name, batch, quick))
    ratios = [r["ratio"] for r in rows if r["ratio"]]
    geo = float(np.exp(np.mean(np.log(ratios)))) if ratios else None
    rows.append({"model": "geometric mean", "batch": 0, "ratio": geo})
    return h.sectioned_report(NAME, f"{NAME} (TVM llvm, {threads or h.CPU_COUNT} thread(s))",
                              [("ratio > 1 means the NaN rules cost time; both builds timed in alternating rounds",
                                rows, COLUMNS)], quick=quick, out=out, rows=rows)
