"""Shared timing and reporting utilities for the benchmark suites.

Absolute times on a small shared VM drift from run to run, so every suite measures all
backends of a row side by side (interleaved rounds, same process) and reports ratios as
the headline numbers; the raw milliseconds are kept only as secondary columns.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

CPU_COUNT: int = os.cpu_count() or 1
ERR_TOL: float = 1e-4  # max abs error above which a row is flagged


def set_thread_counts(n: int = CPU_COUNT) -> None:
    """Give every backend the same thread budget.

    ``import codegen`` already sizes TVM's pool to this process's CPU affinity
    (codegen/threads.py); a suite may ask for fewer (``--threads``), and torch, ORT and OpenVINO
    must get the same number. The env var is read when TVM's thread pool first starts, so call
    this before the first run (machine_info's "tvm_threads" records what TVM actually used).
    """
    os.environ["TVM_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def busy_warning(threads: int) -> str | None:
    """A warning when other processes already load the CPUs.

    With every core in use by someone else, a multi-threaded torch eager run waits on a
    descheduled worker at each op and can come out 100x slower; --threads 1 avoids that.
    """
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if threads > 1 and load > 0.5:
        return (f"load average is {load:.2f} on {CPU_COUNT} CPUs: with {threads} threads each, the timings "
                f"(eager especially) may be inflated by contention; consider --threads 1")
    return None


def machine_info() -> dict[str, Any]:
    """Where and with what the numbers were taken (they are only meaningful in that context)."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": CPU_COUNT,
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "tvm_num_threads_env": os.environ.get("TVM_NUM_THREADS"),
        "torch": torch.__version__,
    }
    for mod in ("tvm", "onnx", "onnxruntime", "onnxscript", "openvino"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional extras may be absent
            info[mod] = None
    try:  # what TVM's pool actually uses (it reads the env var once, at start-up)
        import tvm

        info["tvm_threads"] = int(tvm.runtime.num_threads())
    except Exception:  # noqa: BLE001
        info["tvm_threads"] = None
    try:  # the CPU a figure came from, as LLVM names it (these VMs' CPUs differ)
        from tvm.target.codegen import llvm_get_system_cpu

        info["llvm_cpu"] = str(llvm_get_system_cpu())
    except Exception:  # noqa: BLE001
        info["llvm_cpu"] = None
    return info


# ---------------------------------------------------------------------------- timing


def time_eager(model: torch.nn.Module, inputs: Sequence[torch.Tensor], *, min_run_time: float = 0.2,
               num_threads: int = CPU_COUNT) -> float:
    """Median ms per call of ``model(*inputs)`` via torch's Timer (handles warm-up and block sizing)."""
    from torch.utils import benchmark

    timer = benchmark.Timer("m(*x)", globals={"m": model, "x": tuple(inputs)}, num_threads=num_threads)
    with torch.no_grad():
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def time_loop(fn: Callable[[], Any], *, warmup: int = 5, repeats: int = 5, min_repeat_s: float = 0.05) -> float:
    """Median ms per call of ``fn`` with a plain perf_counter loop, for runtimes without a timer of their own.

    The number of calls per repeat is sized from the warm-up so that one repeat lasts
    about ``min_repeat_s``, keeping timer resolution out of fast models' numbers.
    """
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    per_call = max((time.perf_counter() - t0) / max(warmup, 1), 1e-7)
    number = max(1, int(min_repeat_s / per_call))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - t0) / number)
    return statistics.median(samples) * 1e3


def interleaved(timers: dict[str, Callable[[], float]], rounds: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Run each timer once per round, alternating backends; return each one's median and all samples.

    Interleaving spreads slow drifts of the machine (other jobs, thermal) over all
    backends instead of penalising whichever happened to run last.
    """
    samples: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(rounds):
        for k, fn in timers.items():
            samples[k].append(fn())
    return {k: statistics.median(v) for k, v in samples.items()}, samples


def max_abs_err(ref: Any, got: Any) -> float:
    """Largest absolute difference over all outputs (torch tensors or numpy arrays, single or tuple)."""
    def flat(x: Any) -> list[np.ndarray]:
        if isinstance(x, (tuple, list)):
            return [a for item in x for a in flat(item)]
        return [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)]

    r, g = flat(ref), flat(got)
    if len(r) != len(g):
        raise ValueError(f"output count differs: {len(r)} vs {len(g)}")
    return max(float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
               for a, b in zip(r, g))


def rel_err(ref: torch.Tensor, got: Any) -> float:
    """``max_abs_err`` relative to the reference's largest magnitude (the suites' numerics contract)."""
    return max_abs_err(ref, got) / max(float(ref.abs().max()), 1e-30)


def exception_line(exc: BaseException) -> str:
    """``Type: first line of the message``: how a failed step reads in a row of a table."""
    message = str(exc).strip()
    return f"{type(exc).__name__}: {message.splitlines()[0] if message else ''}"


def child_json(module: str, *args: str, timeout: float, env: dict[str, str] | None = None) -> tuple[dict | None, Any]:
    """Run ``python -m benchmarks.<module> args`` from the repository root (a crash, a hang or
    memory exhaustion there does not end the suite): its last JSON line on stdout (None without
    one) and the finished process (stderr, return code). Raises ``subprocess.TimeoutExpired``
    past ``timeout``."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], capture_output=True, text=True,
                         timeout=timeout, env=env, cwd=Path(__file__).resolve().parents[1])
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    return (json.loads(lines[-1]) if lines else None), run


def ratio(num: float | None, den: float | None) -> float | None:
    """num/den, or None when either side is missing (e.g. no ONNX Runtime)."""
    return num / den if num is not None and den else None


# ---------------------------------------------------------------------------- onnxruntime


def ort_missing() -> str | None:
    """None when the optional 'bench' extra is importable, else a message saying how to get it."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} not installed (pip install 'squeezer[bench]'); skipping the onnxruntime column"
    return None


def export_onnx(model: torch.nn.Module, inputs: Sequence[torch.Tensor], path: Path) -> str:
    """Export with the dynamo exporter, falling back to TorchScript; return which one worked.

    Exporter chatter goes to a buffer so that stdout stays the results table.
    """
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # its warnings bypass redirect_stderr
    errors = []
    for dynamo in (True, False):
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                torch.onnx.export(model, tuple(inputs), str(path), dynamo=dynamo)
            return "dynamo" if dynamo else "torchscript"
        except Exception as exc:  # noqa: BLE001 - any exporter failure becomes an "n/a" row
            msg = str(exc).strip().splitlines()
            errors.append(f"{'dynamo' if dynamo else 'torchscript'}: {type(exc).__name__}: {msg[0] if msg else ''}"[:200])
    raise RuntimeError("; ".join(errors))


def ort_session(path: Path, threads: int = CPU_COUNT) -> Any:
    """A CPU InferenceSession using the same thread count as the other backends."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def ort_runner(session: Any, inputs: Sequence[torch.Tensor]) -> Callable[[], list[np.ndarray]]:
    """A zero-argument callable running ``session`` on ``inputs`` (numpy conversion done once, outside timing)."""
    feed = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
    return lambda: session.run(None, feed)


# ---------------------------------------------------------------------------- reporting


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    return format(v, spec)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Render ``rows`` as a GitHub markdown table; ``columns`` is (key, header, format spec)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" if i < 1 else "---:" for i in range(len(columns))) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k), spec) for k, _, spec in columns) + " |")
    return "\n".join(lines)


def write_results(name: str, result: dict[str, Any], markdown: str, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.json`` and ``.md``; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / f"{name}.json", out / f"{name}.md"
    jpath.write_text(json.dumps(result, indent=2) + "\n")
    mpath.write_text(markdown + "\n")
    return jpath, mpath


def write_sweep(suite: str, rows: list[dict[str, Any]], report: Callable[[list[dict[str, Any]]], str], *,
                rerun: bool, quick: bool, out: str | Path | None) -> dict[str, Any]:
    """Save a per-model sweep's rows (one row a model, keyed by ``"model"``) as ``<suite>.json``
    and ``.md`` (``_quick`` for a quick run); a rerun of some models replaces their rows in the
    saved results and keeps the others."""
    name = suite.replace("-", "_")
    out = Path(out or Path(__file__).parent / "results")
    saved = out / f"{name}.json"
    if rerun and not quick and saved.exists():
        fresh = {r["model"]: r for r in rows}
        rows = [fresh.pop(r["model"], r) for r in json.loads(saved.read_text())["rows"]] + list(fresh.values())
    markdown = report(rows)
    result = {"suite": suite, "machine": machine_info(), "rows": rows, "markdown": markdown}
    write_results(f"{name}_quick" if quick else name, result, markdown, out)
    return result


def sweep_header(title: str) -> list[str]:
    """A per-model sweep report's first lines: its title, then the date and the CPU LLVM names."""
    machine = machine_info()
    return [f"## {title}", "", f"{machine.get('date', '')} · LLVM {machine.get('llvm_cpu', '?')}", ""]


def sectioned_report(suite: str, title: str, sections: Sequence[tuple[str, Sequence[dict[str, Any]], Sequence]], *,
                     quick: bool, out: str | Path | None, **data: Any) -> dict[str, Any]:
    """A suite with several tables (``sections``: subtitle, rows, columns): the markdown report under
    ``title`` and the date, written with ``data`` (the rows by name) to ``results/<suite>[_quick]``."""
    machine = machine_info()
    md = [f"## {title}", "", f"{machine.get('date', '')}", ""]
    for subtitle, rows, columns in sections:
        md += [f"### {subtitle}", "", markdown_table(rows, columns), ""]
    markdown = "\n".join(md[:-1])
    result = {"suite": suite, "machine": machine, **data, "markdown": markdown}
    stem = suite.replace("-", "_") + ("_quick" if quick else "")
    write_results(stem, result, markdown, out or Path(__file__).parent / "results")
    return result

