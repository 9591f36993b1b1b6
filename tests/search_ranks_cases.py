"""Searches the distributed-search tests repeat under ``torchrun``: LeNet-5 (seeded: the same weights
on every rank), its accuracy proxy (top-1 agreement with the original on seeded random images), and
a goal per case. Run as a script by torchrun (see test_search_distributed.py): each rank writes its
result, and what it did when (building and evaluating, compiling, timing), as JSON.

Cases: ``size`` (stored-size goal), ``macs`` (a latency goal on a deterministic MACs stand-in, which
cannot be split: the timing rank builds and measures itself), ``compiled`` (a latency goal on the
real compiled latency: compiled on every rank, timed on the timing rank)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import compiler
import compiler.latency as latency
from compiler.distributed import init_from_env, world
from squeezer.search import SearchResult, search

SETTINGS = {
    "size": dict(compression=1.6, step=0.25),
    "macs": dict(speedup=1.5, step=0.25),
    "compiled": dict(speedup=1.2, step=0.5, max_ratio=0.5, uniform=False),
}


def _macs_provider(module, inputs, target):
    macs = compiler.summarize(compiler.trace(module, tuple(inputs))).total_macs
    return lambda: macs / 1e6


def _timed(log: list, what: str, fn):
    """``fn`` that records the interval of every call in ``log`` (what, start, end)."""
    def wrapped(*args, **kwargs):
        start = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            log.append([what, start, time.time()])
    return wrapped


def _providers(case: str, log: list) -> None:
    if case == "macs":
        latency.register_latency_provider(_macs_provider)
        return
    from codegen.latency_provider import artifact_timer, compile_artifact, latency_timer

    def timing(payload, inputs):
        return _timed(log, "time", artifact_timer(payload, inputs))

    latency.register_latency_provider(latency_timer, compile_artifact=_timed(log, "compile", compile_artifact),
                                      time_artifact=timing)


def as_json(result: SearchResult) -> dict:
    def cand(c):
        return None if c is None else {"ratios": c.ratios, "value": c.latency_ms, "accuracy": c.accuracy}
    return {"recipe": result.recipe, "chosen": cand(result.chosen), "baseline": cand(result.baseline),
            "uniform": cand(result.uniform), "explored": [cand(c) for c in result.explored],
            "sensitivity": {k: [list(p) for p in v] for k, v in result.sensitivity.items()}}


def run_case(case: str, log: list | None = None) -> dict:
    """The search of ``case`` (in whatever world this process is in), as JSON-able values."""
    log = [] if log is None else log
    _providers(case, log)
    from squeezer import zoo

    torch.manual_seed(0)
    e = zoo.get("lenet5")
    g = compiler.trace(e.build().eval(), e.example_inputs(batch=1))
    x = torch.randn(48, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = g.module(x).argmax(1)

    def agreement(module):
        with torch.no_grad():
            return float((module(x).argmax(1) == ref).float().mean())

    result = search(g, _timed(log, "accuracy", agreement), rounds=1, **SETTINGS[case])
    return as_json(result)


if __name__ == "__main__":
    out, cases = Path(sys.argv[1]), sys.argv[2].split(",")
    init_from_env()
    for case in cases:
        log: list = []
        result = run_case(case, log)
        (out / f"{case}-rank{world().rank}.json").write_text(json.dumps({"result": result, "log": log}))
    if world().distributed:   # gloo's threads left to interpreter teardown can abort the process at exit
        torch.distributed.destroy_process_group()
