"""Suite "distributed": what ``torchrun`` buys on this machine, measured honestly.

* The demo's recovery fine-tune (LeNet-5 pruned to half its MACs, 3 epochs of distillation at global
  batch 64, ``benchmarks/distributed_finetune.py``) on 1 process × all cores, 1 process × 1 thread
  and N processes × 1 thread (DDP over gloo): the fine-tune's own wall time, the whole job's (process
  start, imports, rendezvous included) and the accuracy reached (the same global batch, so it should
  not move).
* The hardware-aware search (``squeezer search``) at 1 and N ranks: the whole command's wall time.

Configurations run in interleaved rounds and report medians. On 2 shared vCPUs the ranks compete
for the same cores as the threads they replace, so little gain is expected; the notes say what the
same runs would need on real multi-GPU hardware.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from . import harness as h

ROOT = Path(__file__).resolve().parent.parent
FINETUNE_COLUMNS = [("config", "configuration", "s"), ("finetune_s", "fine-tune s (median)", ".2f"),
                    ("job_s", "whole job s", ".2f"), ("speedup", "fine-tune speedup vs 1 process", ".2f"),
                    ("accuracy", "test accuracy", ".2%"), ("steps", "optimizer steps", "d")]
SEARCH_COLUMNS = [("goal", "goal", "s"), ("config", "configuration", "s"), ("job_s", "search wall s (median)", ".1f"),
                  ("candidates", "candidates", "d"), ("per_candidate_s", "s per candidate", ".2f"),
                  ("speedup", "per-candidate speedup vs 1 rank", ".2f"), ("recipe", "recipe", "s")]


def _env(threads: int, tvm_threads: int | None = None) -> dict[str, str]:
    """``threads`` for torch in each process; TVM's pool (compiling, the search's timing rank, which
    times while the other ranks wait) gets ``tvm_threads``, by default the same."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "TVM_NUM_THREADS": str(tvm_threads or threads),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _finetune_once(nproc: int, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(ROOT / "benchmarks" / "distributed_finetune.py")]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads), timeout=1800)
    job = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"fine-tune on {nproc} process(es) failed: {done.stderr[-2000:]}")
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1]
    return {**json.loads(line), "job_s": job}


def _search_once(nproc: int, threads: int, argv: Sequence[str], tvm_threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="squeezer-bench-search-") as out:
        cmd = [sys.executable, "-m", "squeezer.cli", "search", *argv, "--quiet", "--out", out, "--nproc", str(nproc)]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads, tvm_threads), timeout=3600)
        job = time.perf_counter() - start
        if done.returncode:
            raise RuntimeError(f"search on {nproc} rank(s) failed: {done.stderr[-2000:]}")
        recipe = (Path(out) / "recipe.txt").read_text().strip().replace("\n", "; ")
    found = re.search(r"(\d+) candidates measured", done.stdout)
    return {"job_s": job, "recipe": recipe, "candidates": int(found.group(1)) if found else 0}


def _search_rows(goal: str, argv: Sequence[str], nproc: int, cores: int, *, rounds: int) -> list[dict[str, Any]]:
    configs = [(f"1 rank × {cores} threads", 1, cores),
               (f"{nproc} ranks × 1 torch thread (timing rank: {cores} TVM threads)", nproc, 1)]
    runs: dict[str, list[dict[str, Any]]] = {c[0]: [] for c in configs}
    for _ in range(rounds):
        for label, n, t in configs:
            runs[label].append(_search_once(n, t, argv, cores))
    rows = []
    for label, _, _ in configs:
        rs = runs[label]
        per = statistics.median(r["job_s"] / max(r["candidates"], 1) for r in rs)
        rows.append({"goal": goal, "config": label, "job_s": statistics.median(r["job_s"] for r in rs),
                     "candidates": rs[-1]["candidates"], "per_candidate_s": per, "recipe": rs[-1]["recipe"]})
    for row in rows:
        row["speedup"] = rows[0]["per_candidate_s"] / row["per_candidate_s"]
    return rows


def run(models: Sequence[str] | None = None, batches: Sequence[int] | None = None, *, quick: bool = False,
        out: str | Path | None = None, threads: int | None = None, nproc: int = 2) -> dict[str, Any]:
    cores = threads or h.CPU_COUNT
    rounds = 1 if quick else 3
    configs = [(f"1 process × {cores} threads", 1, cores), ("1 process × 1 thread", 1, 1),
               (f"{nproc} processes × 1 thread (DDP, gloo)", nproc, 1)]
    runs: dict[str, list[dict[str, Any]]] = {c[0]: [] for c in configs}
    for _ in range(rounds):
        for label, n, t in configs:
            runs[label].append(_finetune_once(n, t))
    base = statistics.median(r["seconds"] for r in runs[configs[0][0]])
    finetune_rows = []
    for label, n, t in configs:
        rs = runs[label]
        s = statistics.median(r["seconds"] for r in rs)
        finetune_rows.append({"config": label, "finetune_s": s, "job_s": statistics.median(r["job_s"] for r in rs),
                              "speedup": base / s, "accuracy": rs[-1]["accuracy"], "steps": rs[-1]["steps"]})
    search_rows = []
    goals = [("compiled latency 1.3x", ["--family", "pruning", "--speedup", "1.3", "--val", "200", "--rounds", "3"]),
             ("stored size 4x", ["--family", "bits", "--compression", "4", "--val", "1000"])]
    for goal, argv in goals:
        search_rows += _search_rows(goal, argv, nproc, cores, rounds=1 if quick else 2)
    sections = [("recovery fine-tune (demo: LeNet-5 pruned to 50 % MACs, 3 epochs KD, global batch 64)",
                 finetune_rows, FINETUNE_COLUMNS),
                ("search (`squeezer search`: latency goal `--family pruning --speedup 1.3 --val 200 --rounds 3`, "
                 "size goal `--family bits --compression 4`)", search_rows, SEARCH_COLUMNS)]
    return h.sectioned_report("distributed", f"distributed (torchrun, {h.CPU_COUNT} CPUs)", sections, quick=quick,
                              out=out, finetune=finetune_rows, search=search_rows, rounds=rounds)
