"""Concatenations along the vector axis: the loop split at the inputs' boundaries.

TVM lowers ``concatenate`` to a chain of ``if_then_else`` on the concatenated axis' index
(``144 <= c ? x2[c - 144] : (128 <= c ? x1[c - 128] : x0[c])``). When that axis is the
vectorized one (NHWC channels), every vector evaluates the whole chain: it loads from every
input and selects. DenseNet's pre-activation (BatchNorm + ReLU over the concatenation of all
earlier layers, up to 31 inputs) then ran at 0.6 ms per 14x14 kernel, half of pruned
densenet121's time. Partitioned at the boundaries, each part's index range decides the chain,
so it folds to the one input the part reads."""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, tirx

_IF_THEN_ELSE = tvm.ir.Op.get("prim.if_then_else")


def concat_boundaries(block: tirx.SBlock, axis: int) -> list[int]:
    """The offsets at which the block switches input along its ``axis`` index, sorted; empty when
    it is no concatenation along that axis. A concatenation's choice is
    ``if_then_else(K <= v, x_i[...], ...)`` between two loads, not a load and a constant
    (that is padding)."""
    var = block.iter_vars[axis].var
    extent = block.iter_vars[axis].dom.extent
    if not isinstance(extent, tirx.IntImm):
        return []
    found: set[int] = set()

    def visit(call) -> None:
        if not call.op.same_as(_IF_THEN_ELSE):
            return
        cond = call.args[0]
        if isinstance(cond, tirx.LE) and isinstance(cond.a, tirx.IntImm) and cond.b.same_as(var) \
                and not any(isinstance(a, (tirx.IntImm, tirx.FloatImm)) for a in call.args[1:]):
            found.add(int(cond.a.value))

    tvm_ffi.structural_walk(block.body, [(tvm.ir.Call, visit)])
    return sorted(k for k in found if 0 < k < int(extent.value))


def partition_at_inputs(sch: s_tir.Schedule, loop, extent: int, bounds: list[int], lanes: int) -> None:
    """Vectorize the concatenated axis' ``loop`` in ``lanes`` (a divisor of every boundary) and
    partition the loop over its vectors at ``bounds``: one loop per input, whose index range
    decides the chain (lowering's simplifier folds it to that input's load)."""
    over_vectors, vec = sch.split(loop, [None, lanes])
    if lanes > 1:
        sch.vectorize(vec)
    edges = [0, *bounds, extent]
    widths = [(b - a) // lanes for a, b in zip(edges, edges[1:])]
    sch.loop_partition(over_vectors, [*widths[:-1], None])
