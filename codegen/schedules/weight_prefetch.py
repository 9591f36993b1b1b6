"""Software prefetch of the next weight panel in a weight-outer matmul/conv kernel.

Where a kernel's weight outweighs its activations (resnet's 7x7 stage, a GEMM over few rows)
each thread sweeps one prepacked weight panel over all its register-row tiles, then moves to the
next panel. Inside a model that weight comes from memory: the first row tile of each panel
waits on it, the other tiles compute from cache, and memory sits idle while they do. A 49-row
2048x512 matmul ran at 90 GMAC/s with a cold weight against 145 with a hot one; the hardware
prefetchers follow one stream about 1 KB ahead, far too little to hide it.

So each register tile's reduction is split into chunks of CHUNK iterations, and before each
chunk the kernel prefetches its share of the *next* panel's cache lines: the lines of one panel
spread evenly over the chunks of all row tiles of the current one, so the next panel is in L2
by the time it is needed and the fetch overlaps the compute (the same matmul then ran at 136
GMAC/s cold). The prefetch loop sits outside the innermost reduction loop, so LLVM still keeps
the accumulators in registers there (an opaque call inside it made them round-trip memory)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import tvm_ffi
from tvm import s_tir, tirx

MIN_WEIGHT_BYTES = 1 << 20   # smaller weights stay in L2 across calls: nothing to hide
CHUNK = 64                   # reduction iterations between two prefetch bursts
LINE_FLOATS = 16             # one 64-byte cache line of fp32
LOCALITY = 2                 # llvm.prefetch locality: into L2 (the panel's sweep reads it from there)


@dataclass
class PrefetchPlan:
    """One kernel's prefetch: its panel-major parallel loop, the row tiles per panel, the
    reduction loops down to the chunked one, and the prepacked weight buffer."""
    fused: s_tir.LoopRV
    tiles: int
    chunk_loops: list
    buffer: tirx.Buffer


def plan(sch: s_tir.Schedule, block, fused, tiles: int, r_loops: list, weight_block) -> PrefetchPlan | None:
    """Split the block's longest reduction loop into CHUNK-sized pieces and say where to prefetch,
    or None where the kernel gains nothing (small weight, one row tile, no even chunks)."""
    if weight_block is None or tiles < 2 or not r_loops:
        return None
    buf = sch.get(weight_block).writes[0].source
    shape = [int(d) for d in buf.shape]
    if math.prod(shape) * 4 < MIN_WEIGHT_BYTES or shape[0] < 2 or str(buf.dtype) != "float32":
        return None
    extents = [int(sch.get(lp).extent) for lp in r_loops]
    longest = max(range(len(r_loops)), key=lambda k: extents[k])
    if extents[longest] < 2 * CHUNK or extents[longest] % CHUNK:
        return None
    ko, _ = sch.split(r_loops[longest], [None, CHUNK])
    return PrefetchPlan(fused, tiles, list(r_loops[:longest]) + [ko], buf)


def insert(sch: s_tir.Schedule, plans: list[PrefetchPlan]) -> s_tir.Schedule:
    """The scheduled function with each plan's prefetch loop placed first in its chunk loop."""
    if not plans:
        return sch
    func = sch.mod["main"]
    for p in plans:
        func = _with_prefetch(func, sch, p)
    return s_tir.Schedule(func)


def _with_prefetch(func: tirx.PrimFunc, sch: s_tir.Schedule, p: PrefetchPlan) -> tirx.PrimFunc:
    buf = p.buffer
    fused = sch.get(p.fused)
    loops = [sch.get(lp) for lp in p.chunk_loops]
    shape = [int(d) for d in buf.shape]
    panel_floats = math.prod(shape[1:])
    lines = -(-panel_floats // LINE_FLOATS)
    chunks = p.tiles * math.prod(int(lp.extent) for lp in loops)
    per_chunk = -(-lines // chunks)
    dt = str(fused.extent.ty.dtype)

    def c(v: int):
        return tirx.IntImm(dt, v)

    chunk = tirx.floormod(fused.loop_var, c(p.tiles))
    for lp in loops:
        chunk = chunk * c(int(lp.extent)) + lp.loop_var
    pt = tirx.Var("pf", dt)
    line = tirx.min(chunk * c(per_chunk) + pt, c(lines - 1))
    panel = tirx.min(tirx.floordiv(fused.loop_var, c(p.tiles)) + c(1), c(shape[0] - 1))
    flat = line * c(LINE_FLOATS)
    idx = []
    for dim in reversed(shape[1:]):
        idx.append(tirx.floormod(flat, c(dim)))
        flat = tirx.floordiv(flat, c(dim))
    address = tirx.call_intrin("handle", "tirx.address_of", tirx.BufferLoad(buf, [panel] + idx[::-1]))
    call = tirx.call_llvm_intrin("void", "llvm.prefetch.p0", address, 0, LOCALITY, 1)
    prefetch = tirx.For(pt, c(0), c(per_chunk), tirx.ForKind.SERIAL, tirx.Evaluate(call))
    target = loops[-1].loop_var

    def at_loop(node, mutator):
        node = mutator.default_mutate(node)
        if node.loop_var.same_as(target):
            return tirx.For(node.loop_var, node.min, node.extent, node.kind,
                            tirx.SeqStmt([prefetch, node.body]), node.thread_binding, node.annotations)
        return node

    return func.with_body(tvm_ffi.structural_mutate(func.body, [(tirx.For, at_loop)]))
