"""This CPU's fp32 multiply-accumulate roofline: a register-only FMA loop, measured.

The VM presents different CPUs on different machines (AVX-512 or not, one or two FMA pipes),
so a kernel's efficiency is stated against what this machine does, not a datasheet. The loop
keeps ``ACCUMULATORS`` independent vector accumulators (more than FMA latency × pipes) in
registers, one chain per thread, so nothing but FMA throughput limits it."""

from __future__ import annotations

from typing import Callable

import numpy as np

ACCUMULATORS = 12
STEPS = 1_000_000


def fma_kernel(threads: int, lanes: int, steps: int = STEPS):
    """PrimFunc: ``threads`` parallel chains, each ``steps`` × ``ACCUMULATORS`` vector FMAs."""
    from tvm.script import tirx as T

    @T.prim_func
    def fma_loop(x: T.Buffer((threads, lanes), "float32"), out: T.Buffer((threads, ACCUMULATORS, lanes), "float32")):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(threads):
            acc = T.decl_buffer((ACCUMULATORS, lanes), "float32", scope="local")
            for a in T.unroll(ACCUMULATORS):
                for v in T.vectorized(lanes):
                    acc[a, v] = T.float32(0)
            for _ in range(steps):
                for a in T.unroll(ACCUMULATORS):
                    for v in T.vectorized(lanes):
                        acc[a, v] = acc[a, v] * x[t, v] + x[t, v]
            for a in T.unroll(ACCUMULATORS):
                for v in T.vectorized(lanes):
                    out[t, a, v] = acc[a, v]

    return fma_loop


def fma_roofline_gmacs(target: str = "llvm", threads: int | None = None) -> float:
    """Measured fp32 GMAC/s of the whole machine (``threads``: TVM's pool size by default)."""
    return fma_probe(target, threads)(number=2, repeat=3)


def fma_probe(target: str = "llvm", threads: int | None = None, steps: int = STEPS) -> Callable[..., float]:
    """The FMA loop compiled once: a callable ``(number=1, repeat=1) -> GMAC/s`` (the best repeat)."""
    import tvm

    from codegen import threads as squeezer_threads
    from codegen.schedules.cpu import vector_lanes
    from codegen.target import resolve_target

    tgt = resolve_target(target)
    n = threads or squeezer_threads.available_cores()
    lanes = vector_lanes(tgt)
    lib = tvm.compile(tvm.IRModule({"main": fma_kernel(n, lanes, steps)}), target=tgt)
    dev = tvm.cpu()
    x = tvm.runtime.tensor(np.full((n, lanes), 0.5, "float32"), dev)
    out = tvm.runtime.tensor(np.zeros((n, ACCUMULATORS, lanes), "float32"), dev)

    def gmacs(number: int = 1, repeat: int = 1) -> float:
        seconds = min(lib.mod.time_evaluator("main", dev, number=number, repeat=repeat)(x, out).results)
        if not np.allclose(out.numpy(), 1.0):  # x = 0.5: every chain converges to 1; anything else was miscompiled
            raise RuntimeError("the FMA roofline loop computed a wrong result")
        return n * ACCUMULATORS * lanes * steps / seconds / 1e9

    return gmacs
