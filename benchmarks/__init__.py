"""Benchmark suites for Squeezer: ``python -m benchmarks [suite] ...`` or ``squeezer bench ...``.

Each suite times all its backends side by side in one process and reports ratios, because
absolute times on a shared, noisy machine are not comparable from one run to the next.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

__all__ = ["SUITES", "main", "run_suite"]


def _compiled_vs_eager(**opts: Any) -> dict:
    from . import compiled_vs_eager

    return compiled_vs_eager.run(**opts)


def _pruning(**opts: Any) -> dict:
    from . import pruning

    opts.pop("models", None)
    return pruning.run(**opts)


def _pruning_accuracy(**opts: Any) -> dict:
    from . import pruning_accuracy

    opts.pop("models", None)
    return pruning_accuracy.run(**opts)


def _low_rank(**opts: Any) -> dict:
    from . import low_rank

    opts.pop("models", None)
    return low_rank.run(**opts)


def _binary(**opts: Any) -> dict:
    from . import binary

    opts.pop("models", None)
    opts.pop("batches", None)
    return binary.run(**opts)


def _tuning(**opts: Any) -> dict:
    from . import tuning

    opts.pop("models", None)
    return tuning.run(**opts)


def _search(**opts: Any) -> dict:
    from . import search

    opts.pop("models", None)
    opts.pop("batches", None)
    return search.run(**opts)


# Suites are imported lazily so that `--help` and the CLI stay fast.
SUITES: dict[str, Callable[..., dict]] = {"compiled-vs-eager": _compiled_vs_eager, "pruning": _pruning,
                                          "pruning-accuracy": _pruning_accuracy, "low-rank": _low_rank,
                                          "binary": _binary, "tuning": _tuning,
                                          "search": _search}


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
