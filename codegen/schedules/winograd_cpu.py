"""CPU schedule of the Winograd transforms (codegen/winograd.py).

Each transform element is a choice among (m+2)² (input) or m² (output) sums, selected by the
position inside the tile. The schedule makes those positions the innermost unrolled loops, so the
selects fold to one straight-line sum each and the shared partial sums are computed once, with
the channel axis vectorized underneath; tiles × channel blocks run in parallel. Bias, activation
and residual add that FuseOps put after the output transform are folded into its write."""

from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from ..winograd import INPUT_BLOCK, OUTPUT_BLOCK
from .cpu import PARALLEL_MIN_WORK, schedule_elementwise, vector_lanes, vector_width
from .epilogues import reverse_inline_epilogue


def _blocks(sch: s_tir.Schedule) -> list:
    """The blocks under the root block ([] for a func without one: not made from TE)."""
    try:
        return list(sch.get_child_blocks(sch.get_sblock("root")))
    except Exception:  # noqa: BLE001 - no root block
        return []


class WinogradTransformRule(CPUScheduleRule):
    """Schedules a func holding a Winograd input or output transform; declines everything else."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = _blocks(sch)
        names = [sch.get(b).name_hint for b in blocks]
        lanes = vector_lanes(target)
        if INPUT_BLOCK in names:
            for b, name in zip(blocks, names):
                if name == INPUT_BLOCK:
                    self._input(sch, b, lanes)
                else:  # the zero padding, materialized: inlined it would branch per load
                    schedule_elementwise(sch, b, lanes)
            return sch
        out = [b for b, name in zip(blocks, names) if name.startswith(OUTPUT_BLOCK)]
        if len(out) != 1:
            return None
        m = int(sch.get(out[0]).name_hint[len(OUTPUT_BLOCK):])
        rest = []
        for b in blocks:
            if b.same_as(out[0]):
                continue
            if not reverse_inline_epilogue(sch, b):
                rest.append(b)
        self._output(sch, out[0], m, lanes)
        for b in rest:
            schedule_elementwise(sch, b, lanes)
        return sch

    @staticmethod
    def _input(sch: s_tir.Schedule, block, lanes: int) -> None:
        e, p, c = sch.get_loops(block)
        alpha = math.isqrt(int(sch.get(e).extent))
        channels = int(sch.get(c).extent)
        xi, nu = sch.split(e, [alpha, alpha])
        co, ci = sch.split(c, [None, vector_width(channels, lanes)])
        sch.reorder(p, co, xi, nu, ci)
        outer = sch.fuse(p, co)
        if int(sch.get(outer).extent) * alpha * alpha * int(sch.get(ci).extent) >= PARALLEL_MIN_WORK:
            sch.parallel(outer)
        sch.unroll(xi)
        sch.unroll(nu)
        sch.vectorize(ci)

    @staticmethod
    def _output(sch: s_tir.Schedule, block, m: int, lanes: int) -> None:
        n, h, w, k = sch.get_loops(block)
        channels = int(sch.get(k).extent)
        ho, hi = sch.split(h, [None, m])
        wo, wi = sch.split(w, [None, m])
        ko, ki = sch.split(k, [None, vector_width(channels, lanes)])
        sch.reorder(n, ho, wo, ko, hi, wi, ki)
        outer = sch.fuse(n, ho, wo, ko)
        if int(sch.get(outer).extent) * m * m * int(sch.get(ki).extent) >= PARALLEL_MIN_WORK:
            sch.parallel(outer)
        sch.unroll(hi)
        sch.unroll(wi)
        sch.vectorize(ki)
