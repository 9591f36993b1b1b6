"""A search's candidate evaluations spread over the ranks of one ``torchrun`` job.

A batch of candidates (one greedy round's trials, the sensitivity scan's probes) is dealt round-robin
over the ranks; each rank builds its candidates' graphs (the passes are deterministic: the same
levels give the same graph on every rank), measures their accuracy and, for a latency goal,
compiles them. Latency is measured only on the timing ranks — the lowest rank of each device type
(:func:`device_type`) — which receive every compiled artifact and time them all, one after another,
while every other rank waits: no rank builds or evaluates while a timing runs, so the timings are
as undisturbed as a one-process search's, and every candidate of a batch is timed on the same
machines. What each rank found is then gathered on every rank, so every rank holds the same
candidate list and takes the same decision. A size goal needs no timing rank: the stored size is
the same wherever it is counted.
"""

from __future__ import annotations

import math
import platform
import socket
from typing import Any, Callable, Sequence

import torch

from compiler.distributed import all_gather_json, barrier, recv_bytes, send_bytes, world
from compiler.graph import Graph
from compiler.latency import artifact_halves, latency_timer
from compiler.summary import summarize

Levels = dict[str, float]


def median_of(timer: Callable[[], float], rounds: int) -> float:
    """The median of ``rounds`` measurements (each itself a median of TVM's repeats)."""
    return sorted(timer() for _ in range(rounds))[rounds // 2]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_type(target: str) -> str:
    """What a rank's timings are comparable under: its machine's hostname, CPU model and the target
    string. The hostname, because ranks on one machine share its cores, caches and memory bandwidth:
    one of them must time alone, and two machines each have one timing rank, timing side by side
    without disturbing each other. The CPU model and the target keep kinds of hardware apart even
    where hostnames repeat (containers), and say in the key what the timings are of."""
    return f"{socket.gethostname()}|{_cpu_model()}|{target}"


def timing_ranks(target: str) -> list[int]:
    """The lowest rank of each device type, in rank order (the same list on every rank)."""
    first: dict[str, int] = {}
    for rank, kind in enumerate(all_gather_json(device_type(target))):
        first.setdefault(kind, rank)
    return sorted(first.values())


def _ship_artifacts(blobs: dict[int, bytes], n: int, timers: list[int]) -> dict[int, bytes]:
    """Every rank's compiled artifacts to every timing rank, point to point (the others receive
    nothing). Each pair's messages go in one global order (source, timing rank, candidate), which
    every rank walks the same way, so no two ranks ever wait on each other."""
    w = world()
    got = dict(blobs) if w.rank in timers else {}
    for src in range(w.size):
        for dst in timers:
            if src == dst:
                continue
            for i in range(src, n, w.size):
                if w.rank == src:
                    send_bytes(blobs[i], dst)
                elif w.rank == dst:
                    got[i] = recv_bytes(src)
    return got


def _time_batch(batch: Sequence[Levels], blobs: dict[int, bytes], build: Callable[[Levels], Graph],
                inputs: Sequence[Any], target: str, rounds: int) -> dict[int, float]:
    """Latency of every candidate, measured on the timing ranks alone ({} elsewhere). The artifacts
    arrive from the ranks that compiled them; with a provider that cannot be split (a stand-in),
    the timing rank builds and measures each candidate itself."""
    halves = artifact_halves()
    timers = timing_ranks(target)
    barrier()                      # every rank's building and evaluating done before any timing starts
    got = _ship_artifacts(blobs, len(batch), timers) if halves is not None else {}
    if world().rank not in timers:
        return {}
    out = {}
    for i, levels in enumerate(batch):
        if halves is not None:
            timer = halves[1](got.pop(i), inputs)
        else:
            g = build(levels)
            timer = latency_timer(g.module, g.example_inputs, target)
        out[i] = median_of(timer, rounds)
    return out


def evaluate_spread(batch: Sequence[Levels], build: Callable[[Levels], Graph],
                    accuracy: Callable[[torch.nn.Module], float], *, metric: str | None, target: str,
                    rounds: int, inputs: Sequence[Any]) -> list[tuple[float, float]]:
    """(metric value, accuracy) of every candidate of ``batch``, in order, the same on every rank.
    ``metric``: "size" (stored bytes), "latency" (ms on the timing ranks; the mean over device types
    when the job spans several, so a greedy round compares timings from the same machines) or None
    (accuracy only: NaN). ``accuracy`` runs on one rank per candidate: it must not itself talk to
    the other ranks. ``inputs``: the model's example inputs, which a timing rank times the artifacts on."""
    w = world()
    halves = artifact_halves() if metric == "latency" else None
    mine: dict[str, list[list[float]]] = {"accuracy": [], "size": [], "latency": []}
    blobs: dict[int, bytes] = {}
    for i in range(w.rank, len(batch), w.size):
        g = build(batch[i])
        if metric == "size":
            mine["size"].append([i, float(summarize(g).total_bytes)])
        elif halves is not None:
            blobs[i] = halves[0](g.module, g.example_inputs, target)
        mine["accuracy"].append([i, accuracy(g.module)])
    if metric == "latency":
        mine["latency"] = [[i, ms] for i, ms in _time_batch(batch, blobs, build, inputs, target, rounds).items()]
    shared = all_gather_json(mine)
    accuracies = {int(i): float(a) for part in shared for i, a in part["accuracy"]}
    values: dict[int, list[float]] = {}
    for part in shared:            # rank order: the same sums, the same floats, on every rank
        for i, v in part["size"] + part["latency"]:
            values.setdefault(int(i), []).append(float(v))
    return [(sum(values[i]) / len(values[i]) if i in values else math.nan, accuracies[i]) for i in range(len(batch))]
