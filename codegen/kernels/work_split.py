"""Dynamic work sharing for hand-written TIR kernels, without atomics.

TVM splits a parallel loop statically into contiguous chunks, one per thread. On a VM whose
vCPUs get stalled, the thread that finishes first then waits for the other at the end of the
region. ``two_ended`` lets threads meet wherever the machine lets them.
"""

from __future__ import annotations

from tvm.script import tirx as T


def two_ended(v, n: int):
    """Work item of parallel iteration ``v`` in ``range(2 * n)``: items ``0..n-1`` ascending, then
    descending. With two threads one sweeps up and the other down, each skipping items the other
    claimed (the kernel keeps a flag per item, zeroed before the loop), and they meet wherever the
    machine lets them; with 2t threads the pairs balance within their halves. TVM's CPU backend
    has no atomics, so two threads can both take the item at the meeting point: it must be
    idempotent (the same values written twice). Which kernels use it, and why the popcount conv
    does not: benchmarks/README.md, "Measurement notes moved from the code"."""
    return T.if_then_else(v < n, v, 2 * n - 1 - v)
