"""Benchmark suites for Squeezer: ``python -m benchmarks [suite] ...`` or ``squeezer bench ...``.

Each suite times all its backends side by side in one process and reports ratios, because
absolute times on a shared, noisy machine are not comparable from one run to the next.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any, Callable

__all__ = ["SUITES", "main", "run_suite"]


def _suite(module: str) -> Callable[..., dict]:
    """The ``run`` of ``benchmarks.<module>``, imported on first call. Every suite's ``run`` takes
    the same options (models, batches, quick, out, threads) and ignores those it has no use for."""
    def run(**opts: Any) -> dict:
        return importlib.import_module(f"{__name__}.{module}").run(**opts)

    return run


# Suites are imported lazily so that `--help` and the CLI stay fast.
SUITES: dict[str, Callable[..., dict]] = {
    name: _suite(name.replace("-", "_"))
    for name in ("compiled-vs-eager", "pruning", "pruning-accuracy", "low-rank", "binary", "tuning", "search",
                 "deep-compression", "amx-contention", "csr-gather", "nan-semantics", "real-models", "kernel-profile", "realized-cut",
                 "pruning-coverage", "trace-coverage", "build-coverage", "build-time", "int8", "distributed", "survey-methods")}


def run_suite(name: str, **opts: Any) -> dict:
    """Run suite ``name`` (options: models, batches, quick, out, threads); writes its results and returns them."""
    key = name.replace("_", "-")
    if key not in SUITES:
        raise KeyError(f"unknown suite {name!r}; choose from {sorted(SUITES)}")
    return SUITES[key](**opts)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("suite", nargs="?", default="compiled-vs-eager", help=f"one of {sorted(SUITES)}")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 1 32; --quick: 1)")
    p.add_argument("--models", default=None, help="comma-separated zoo model names (default: all)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for every backend (default: os.cpu_count(); use 1 on a busy machine)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and batch 1 only: a smoke test")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (also behind ``squeezer bench``); prints the markdown table, returns an exit code."""
    if argv and argv[0] == "--":  # `squeezer bench -- ...`
        argv = argv[1:]
    args = _parser().parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    try:
        result = run_suite(args.suite, models=models, batches=args.batch, quick=args.quick, out=args.out,
                           threads=args.threads)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    print(result["markdown"])
    broken = [r for r in result.get("rows", [])
              if r.get("flagged") or r.get("error") or ("tvm_ms" in r and r["tvm_ms"] is None)]
    if broken:  # a model that failed to build or disagrees with torch fails the run
        print(f"error: {len(broken)} row(s) failed or were flagged (see Notes)", file=sys.stderr)
        return 1
    return 0
