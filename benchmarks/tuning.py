"""Suite "tuning": the demo's compiled model, untuned vs tuned with ``codegen.tune`` under a time
budget (10 minutes; ``--quick``: 1 minute), timed side by side, from two starting points:

* **our default rules**: the untuned build is our hand-written CPU schedules (codegen/schedules/cpu.py), and
  the database is seeded with them, so "tuned" can only pick something measured faster per kernel.
* **TVM stock**: the untuned build is TVM's stock lowering of the same fused graph
  (``default_schedules=False``: naive loop nests; our layout, padding and fast-math passes still
  run), and MetaSchedule tunes from scratch. This row measures
  what tuning alone finds (target in the issue: >= 1.5x).

Both tuned builds are also compared with our untuned default ("tuned vs our default").
The demo model is the default ``squeezer demo`` compression: LeNet-5 pruned to half its MACs,
batch 1 (``--batch`` for others; each batch and start gets the whole budget). Reported: speedup
tuned / untuned, trials measured, tuning wall time per trial.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from . import harness as h

STARTS = {"rules": ("our default rules", True), "stock": ("TVM stock (no rules)", False)}
COLUMNS = [("batch", "batch", "d"), ("start", "untuned build", "s"), ("speedup", "tuned vs untuned", ".2f"), ("untuned_ms", "untuned ms", ".4f"),
           ("tuned_ms", "tuned ms", ".4f"), ("trials", "trials", "d"), ("s_per_trial", "s / trial", ".2f"),
           ("vs_rules", "tuned vs our default", ".2f"), ("budget_s", "budget s", ".0f"), ("max_abs_err", "max abs err (tuned vs torch)", ".1e")]


def run(models: Sequence[str] | None = None, batches: Sequence[int] | None = None, *, quick: bool = False,
        out: str | Path | None = None, threads: int | None = None) -> dict[str, Any]:
    import codegen
    import compiler
    from squeezer import zoo
    from squeezer.demo import DEFAULT_PASSES

    threads = threads or h.CPU_COUNT
    h.set_thread_counts(threads)
    budget = 60.0 if quick else 600.0
    rows = []
    for batch in batches or [1]:
        torch.manual_seed(0)
        model = zoo.get("lenet5").build(seed=0)
        x = (torch.randn(batch, 1, 28, 28),)
        xs = [t.numpy() for t in x]
        graph = compiler.Pipeline(list(DEFAULT_PASSES))(compiler.trace(model, x))
        builds, tuned_rows = {}, []
        for key, (label, rules) in STARTS.items():
            db = Path(tempfile.mkdtemp(prefix=f"squeezer-tuning-bench-{key}-"))
            result = codegen.tune(graph, "llvm", trials=100000, time_budget=budget, database=db,
                                  progress=False, default_schedules=rules)
            builds[f"{key}_untuned"] = codegen.build(graph, default_schedules=rules)
            builds[f"{key}_tuned"] = tuned = codegen.build(graph, database=db, default_schedules=rules)
            err = h.max_abs_err(graph.run_example(), tuned(*x))
            tuned_rows.append((key, label, result, err))
        med, _ = h.interleaved({k: (lambda m=m: m.benchmark(*xs, number=100, repeat=5)["median_ms"])
                                for k, m in builds.items()}, rounds=5)
        for key, label, result, err in tuned_rows:
            untuned_ms, tuned_ms = med[f"{key}_untuned"], med[f"{key}_tuned"]
            rows.append({"batch": batch, "start": label, "speedup": untuned_ms / tuned_ms, "untuned_ms": untuned_ms,
                         "tuned_ms": tuned_ms, "vs_rules": med["rules_untuned"] / tuned_ms,
                         "trials": result.trials_run, "s_per_trial": result.seconds_per_trial or 0.0,
                         "budget_s": result.seconds, "max_abs_err": err, "flagged": err > h.ERR_TOL})
    header = [f"## tuning (demo model: LeNet-5 pruned to half its MACs; TVM llvm, {threads} thread(s))", "",
              f"{h.machine_info().get('date', '')}", "",
              "Each start tuned with codegen.tune within the budget; all four builds of a batch compiled and "
              "timed side by side. Our default rules: the database is seeded with them. TVM stock: "
              "naive loop nests untuned, MetaSchedule from scratch.", ""]
    markdown = "\n".join(header) + h.markdown_table(rows, COLUMNS)
    result = {"suite": "tuning", "machine": h.machine_info(), "rows": rows, "markdown": markdown}
    h.write_results("tuning_quick" if quick else "tuning", result, markdown, out or Path(__file__).parent / "results")
    return result
