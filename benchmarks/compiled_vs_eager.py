"""Suite "compiled-vs-eager": TVM-compiled zoo models against torch eager and ONNX Runtime on CPU.

It answers "does compiling with Squeezer pay off at all on this machine?" before any
compression pass is involved, and checks that compilation keeps the numerics.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from . import harness as h

NAME = "compiled-vs-eager"
FILE_STEM = "compiled_vs_eager"

COLUMNS: list[tuple[str, str, str]] = [
    ("model", "model", "s"),
    ("batch", "batch", "d"),
    ("speedup_vs_eager", "speedup tvm vs eager", ".2f"),
    ("speedup_vs_ort", "speedup tvm vs ort", ".2f"),
    ("max_abs_err_str", "max abs err", "s"),
    ("eager_ms", "eager ms", ".3f"),
    ("tvm_ms", "tvm ms", ".3f"),
    ("ort_ms", "ort ms", ".3f"),
]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _bench_row(name: str, batch: int, *, quick: bool, threads: int, ort_reason: str | None,
               tmp: Path) -> dict[str, Any]:
    """Build, check and time one (model, batch); failures are recorded in the row, never raised."""
    import codegen
    import compiler
    from squeezer import zoo

    entry = zoo.ZOO[name]
    model, inputs = entry.build(seed=0), entry.example_inputs(batch=batch, seed=0)
    row: dict[str, Any] = {"model": name, "batch": batch, "eager_ms": None, "tvm_ms": None, "ort_ms": None,
                           "max_abs_err": None, "ort_max_abs_err": None, "flagged": False, "notes": []}
    with torch.no_grad():
        ref = model(*inputs)

    try:
        cm = codegen.build(compiler.trace(model, inputs), target="llvm")
        row["max_abs_err"] = h.max_abs_err(ref, cm(*inputs))
        row["flagged"] = row["max_abs_err"] > h.ERR_TOL
    except Exception as exc:  # noqa: BLE001 - a failing model must not stop the suite
        cm = None
        row["notes"].append(f"tvm: {type(exc).__name__}: {exc}"[:300])

    run_ort = None
    if not ort_reason:  # a missing extra is reported once for the run, not on every row
        try:
            path = tmp / f"{name}_b{batch}.onnx"
            row["onnx_exporter"] = h.export_onnx(model, inputs, path)
            run_ort = h.ort_runner(h.ort_session(path, threads), inputs)
            row["ort_max_abs_err"] = h.max_abs_err(ref, run_ort())
        except Exception as exc:  # noqa: BLE001 - recorded as "n/a" with the reason
            run_ort = None
            row["notes"].append(f"ort: {exc}"[:300])

    rounds, min_s = (1, 0.05) if quick else (3, 0.2)
    timers = {"eager_ms": lambda: h.time_eager(model, inputs, min_run_time=min_s, num_threads=threads)}
    if cm is not None:
        timers["tvm_ms"] = lambda: cm.benchmark(*inputs, number=1, repeat=5 if quick else 10,
                                                min_repeat_ms=int(min_s * 1000 / 5))["median_ms"]
    if run_ort is not None:
        timers["ort_ms"] = lambda: h.time_loop(run_ort, repeats=5 if quick else 10, min_repeat_s=min_s / 5)
    medians, samples = h.interleaved(timers, rounds)
    row.update(medians, samples_ms=samples)  # per-round samples show how noisy the medians are

    row["speedup_vs_eager"] = h.ratio(row["eager_ms"], row["tvm_ms"])
    row["speedup_vs_ort"] = h.ratio(row["ort_ms"], row["tvm_ms"])
    err = row["max_abs_err"]
    row["max_abs_err_str"] = None if err is None else f"{err:.1e}" + (" (>1e-4!)" if row["flagged"] else "")
    return row


def run(models: Sequence[str] | None = None, batches: Sequence[int] | None = None, *, quick: bool = False,
        out: str | Path | None = None, threads: int | None = None) -> dict[str, Any]:
    """Run the suite, write ``<out>/compiled_vs_eager.{json,md}`` and return the result dict (with "markdown")."""
    from squeezer import zoo

    models = list(models or zoo.ZOO)
    unknown = [m for m in models if m not in zoo.ZOO]
    if unknown:
        raise KeyError(f"unknown model(s) {unknown}; choose from {sorted(zoo.ZOO)}")
    batches = list(batches or ([1] if quick else [1, 32]))
    threads = threads or h.CPU_COUNT
    h.set_thread_counts(threads)
    machine_before = h.machine_info()
    ort_reason = h.ort_missing()
    for warning in (ort_reason, h.busy_warning(threads)):
        if warning:
            _log(warning)

    rows = []
    with tempfile.TemporaryDirectory(prefix="squeezer-bench-") as tmp:
        for name in models:
            for batch in batches:
                _log(f"[{NAME}] {name} batch={batch} ...")
                rows.append(_bench_row(name, batch, quick=quick, threads=threads, ort_reason=ort_reason,
                                       tmp=Path(tmp)))
                for note in rows[-1]["notes"]:
                    _log(f"    {note}")

    machine = {**h.machine_info(), "load_avg_1min_at_start": machine_before["load_avg_1min"]}
    notes = [f"- ort: {ort_reason}"] if ort_reason else []
    notes += [f"- {r['model']} (batch {r['batch']}): {n}" for r in rows for n in r["notes"]]
    notes += [f"- {r['model']} (batch {r['batch']}): max abs err {r['max_abs_err']:.2e} exceeds {h.ERR_TOL:g}"
              for r in rows if r["flagged"]]
    notes += [f"- {r['model']} (batch {r['batch']}): onnxruntime max abs err {r['ort_max_abs_err']:.2e} exceeds {h.ERR_TOL:g}"
              for r in rows if (r["ort_max_abs_err"] or 0) > h.ERR_TOL]
    md = "\n".join([
        f"## {NAME}{' (quick)' if quick else ''}",
        "",
        f"{machine['date']} · {machine['platform']} · {machine['cpu_count']} CPUs, {threads} thread(s) per backend · "
        f"load avg {machine_before['load_avg_1min']:.2f} → {machine['load_avg_1min']:.2f} · torch {machine['torch']} · "
        f"tvm {machine['tvm']} · onnxruntime {machine['onnxruntime']}",
        "",
        "Speedup = other backend's ms / TVM ms (>1 means TVM is faster), measured side by side in one run. "
        "Absolute ms are not comparable across runs on this VM.",
        "",
        h.markdown_table(rows, COLUMNS),
        *(["", "Notes:", *notes] if notes else []),
    ])
    result = {"suite": NAME, "quick": quick, "machine": machine,
              "options": {"models": models, "batches": batches, "threads": threads, "err_tol": h.ERR_TOL},
              "columns": [c[0] for c in COLUMNS], "rows": rows}
    out_dir = Path(out) if out else Path(__file__).parent / "results"
    stem = FILE_STEM + ("_quick" if quick else "")
    jpath, mpath = h.write_results(stem, result, md, out_dir)
    _log(f"wrote {jpath} and {mpath}")
    return {**result, "markdown": md, "paths": [str(jpath), str(mpath)]}
