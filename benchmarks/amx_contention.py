"""Diagnostic "amx-contention": how busy this host's AMX unit is, and the binary conv timed only while
it is quiet.

On the shared VM the tile unit's throughput swings by up to ~4× from second to second (something
outside the VM uses it). The suite samples a pure ``tdpbssd`` loop (4096 tile ops on data in L1,
16 cycles each when the unit is ours), prints the spread, then times the benchmark's binary conv
(AMX tiles, xnor-popcount) and torch fp32 in rounds bracketed by two quiet probes, and reports
medians over the quiet rounds. It explains the "binary" suite's AMX rows; it is not a speed claim.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
import tvm
from torch import nn
from tvm.script import tirx as T

from codegen.kernels.amx_kernels import configure_tiles

from . import harness as h

PROBE_TILE_OPS = 4096
QUIET_MS = 0.045      # 4096 × 16 cycles at ~2 GHz is 0.033 ms; above this the unit is shared


def _probe_kernel():
    @T.prim_func
    def probe(a: T.Buffer((32, 64), "int8"), b: T.Buffer((32, 64), "int8"), c: T.Buffer((32, 64), "int32")):
        T.func_attr({"global_symbol": "probe", "tirx.noalias": True})
        cfg = T.alloc_buffer((64,), "uint8", scope="local")
        configure_tiles(cfg)
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.uint8(4), T.address_of(a[0, 0]), T.int64(64)))
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.uint8(5), T.address_of(a[16, 0]), T.int64(64)))
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.uint8(6), T.address_of(b[0, 0]), T.int64(64)))
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.uint8(7), T.address_of(b[16, 0]), T.int64(64)))
        for _ in range(PROBE_TILE_OPS // 4):   # four independent accumulators: throughput, not latency
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbssd", T.uint8(0), T.uint8(4), T.uint8(6)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbssd", T.uint8(1), T.uint8(4), T.uint8(7)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbssd", T.uint8(2), T.uint8(5), T.uint8(6)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbssd", T.uint8(3), T.uint8(5), T.uint8(7)))
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.uint8(0), T.address_of(c[0, 0]), T.int64(256)))
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilerelease"))

    return probe


PROBE_COLUMNS = [("samples", "samples", "d"), ("min", "min ms", ".4f"), ("p25", "p25 ms", ".4f"),
                 ("median", "median ms", ".4f"), ("p75", "p75 ms", ".4f"), ("max", "max ms", ".4f"),
                 ("quiet", "quiet (< 0.045 ms)", ".0%")]
CONV_COLUMNS = [("kernel", "conv3x3 256->256 @14x14, batch 1", "s"), ("ms", "median ms over quiet rounds", ".4f"),
                ("speedup", "vs torch fp32", ".1f"), ("rounds", "quiet rounds", "d")]


def run(models=None, batches=None, *, quick: bool = False, out=None, **_) -> dict:
    import codegen
    import compiler
    from codegen.kernels.amx_kernels import amx_available
    from codegen.target import host_cpu_target
    from compiler.ops.bitserial import BitConv2d

    target = host_cpu_target()
    if not amx_available(target):
        return {"markdown": "no AMX-INT8 on this host (or the OS refused the tile state): nothing to measure"}
    dev = tvm.cpu()
    lib = tvm.compile(tvm.IRModule({"probe": _probe_kernel()}), target=target)
    arrays = [tvm.runtime.tensor(np.ones(s, d), dev) for s, d in [((32, 64), "int8"), ((32, 64), "int8"), ((32, 64), "int32")]]
    timer = lib.mod.time_evaluator("probe", dev, number=20, repeat=1)

    def probe_ms() -> float:
        return timer(*arrays).mean * 1e3

    samples = []
    for _ in range(20 if quick else 60):
        samples.append(probe_ms())
        time.sleep(0.05)
    q = np.percentile(samples, [0, 25, 50, 75, 100])
    probe_row = {"samples": len(samples), **dict(zip(("min", "p25", "median", "p75", "max"), map(float, q))),
                 "quiet": float(np.mean(np.array(samples) < QUIET_MS))}

    gen = torch.Generator().manual_seed(0)
    wc, xc = torch.randn(256, 256, 3, 3, generator=gen), torch.randn(1, 256, 14, 14, generator=gen)
    layer = BitConv2d((wc >= 0)[None], [2.0], -1.0, wc.abs().mean((1, 2, 3)), torch.zeros(256), (1, 1), (1, 1), (1, 1),
                      "sign", xnor_scale=True)
    g = compiler.trace(nn.Sequential(layer).eval(), (xc,))
    builds = {name: codegen.build(g, binary_kernels=name) for name in ("amx", "popcount")}
    xn = xc.numpy()

    def torch_ms() -> float:
        with torch.no_grad():
            start = time.perf_counter()
            for _ in range(10):
                F.conv2d(xc, wc, None, 1, 1)
            return (time.perf_counter() - start) / 10 * 1e3

    quiet: list[dict] = []
    for _ in range(20 if quick else 60):
        if probe_ms() > QUIET_MS:
            continue
        row = {name: c.benchmark(xn, number=20, repeat=1, min_repeat_ms=0)["median_ms"] for name, c in builds.items()}
        row["torch"] = torch_ms()
        if probe_ms() <= QUIET_MS:
            quiet.append(row)
    conv_rows = []
    if quiet:
        med = {k: float(np.median([r[k] for r in quiet])) for k in quiet[0]}
        conv_rows = [{"kernel": name, "ms": med[key], "speedup": med["torch"] / med[key], "rounds": len(quiet)}
                     for name, key in (("AMX tiles", "amx"), ("xnor-popcount", "popcount"), ("torch fp32", "torch"))]
    return h.sectioned_report("amx-contention", f"AMX unit contention on this host ({PROBE_TILE_OPS} tile ops per probe)", [
        ("pure-AMX probe over time", [probe_row], PROBE_COLUMNS),
        ("binary conv timed only between two quiet probes", conv_rows, CONV_COLUMNS)],
        quick=quick, out=out, probe_ms=samples, quiet_rounds=quiet)
