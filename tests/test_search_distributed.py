"""The hardware-aware search spread over the ranks of a ``torchrun`` job (2 CPU workers, gloo over
loopback): every rank returns the same result, the same as one process's for deterministic goals
(stored size, a MACs stand-in for latency); for the compiled latency, where timings differ run to
run, the ranks agree with each other, the candidates were compiled on both ranks and timed on the
timing rank alone, while the other rank did nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import compiler.latency as latency
import search_ranks_cases as cases

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _torchrun(out: Path, which: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "search_ranks_cases.py"), str(out), which]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def _read(out: Path, case: str) -> tuple[dict, dict]:
    return tuple(json.loads((out / f"{case}-rank{r}.json").read_text()) for r in (0, 1))


@pytest.fixture(scope="module")
def deterministic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("search-ranks")
    _torchrun(out, "size,macs")
    return out


@pytest.mark.parametrize("case", ["size", "macs"])
def test_two_ranks_find_what_one_process_finds(deterministic, case, monkeypatch):
    r0, r1 = _read(deterministic, case)
    assert r0["result"] == r1["result"]
    monkeypatch.setattr(latency, "_provider", latency._provider)   # the case registers its own
    monkeypatch.setattr(latency, "_halves", latency._halves)
    log: list = []
    assert r0["result"] == json.loads(json.dumps(cases.run_case(case, log)))
    # the accuracy evaluations were dealt: both ranks did some, together as many as one process
    done = [sum(1 for what, *_ in r["log"] if what == "accuracy") for r in (r0, r1)]
    assert min(done) > 0 and sum(done) == sum(1 for what, *_ in log if what == "accuracy")


def test_compiled_latency_is_timed_on_one_rank_while_the_other_waits(tmp_path):
    _torchrun(tmp_path, "compiled")
    r0, r1 = _read(tmp_path, "compiled")
    result = r0["result"]
    assert result == r1["result"]
    explored = [result["baseline"]] + result["explored"]
    assert all(c["value"] > 0 and 0 <= c["accuracy"] <= 1 for c in explored)
    assert result["chosen"]["ratios"] and set(result["chosen"]["ratios"].values()) <= {0.5}
    assert result["recipe"] and result["recipe"][0].startswith("channel-pruning:")
    kinds = [{what for what, *_ in r["log"]} for r in (r0, r1)]
    assert kinds[0] == {"accuracy", "compile", "time"} and kinds[1] == {"accuracy", "compile"}
    timed = [(a, b) for what, a, b in r0["log"] if what == "time"]
    assert len(timed) == len(explored)            # rounds=1: one timing per candidate, all on rank 0
    work = [(a, b) for r in (r0, r1) for what, a, b in r["log"] if what != "time"]
    assert not [(w, t) for w in work for t in timed if w[0] < t[1] and t[0] < w[1]]
