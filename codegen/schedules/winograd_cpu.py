"""CPU schedule of the Winograd transforms and GEMM (codegen/winograd.py).

Each transform element is a choice among (m+2)² (input) or m² (output) sums, selected by the
position inside the tile. The schedule makes those positions the innermost unrolled loops, so the
selects fold to one straight-line sum each and the shared partial sums are computed once, with
the channel axis vectorized underneath.

The input transform is computed per block of ``tile_rows`` tiles (8 on AVX-512, 6 on AVX2), the
zero padding folded into its loads, right before the block's GEMM, which keeps a register tile of
that many tiles × one or two vectors of output channels: the block's transformed input (8·(m+2)²·C floats, 129 KB
for densenet's 128 channels) stays in L2 instead of going to memory and back (2.25× the input
for F(4,3)); blocks run in parallel. Bias, activation and residual add that FuseOps put after the
output transform are folded into its write."""

from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from ..winograd import GEMM_BLOCK, INPUT_BLOCK, OUTPUT_BLOCK
from .cpu import (PARALLEL_MIN_WORK, _layout_free_names, largest_divisor_at_most, prepack_weights,
                  schedule_elementwise, vector_lanes, vector_width)
from .vector_unit import tile_rows, vector_registers
from .epilogues import inline_into_consumers, reverse_inline_epilogue

MIN_GEMM_ROWS = 4   # fewer rows re-read the weight too often: a whole tile_rows block, the last one partial


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
        if INPUT_BLOCK in names and GEMM_BLOCK in names:
            self._input_gemm(sch, dict(zip(names, blocks)), lanes, vector_registers(target), _layout_free_names(func))
            return sch
        if INPUT_BLOCK in names:
            for b, name in zip(blocks, names):
                if name == INPUT_BLOCK:
                    self._input_alone(sch, b, lanes)
                else:  # the zero padding, materialized: inlined it would branch per load
                    schedule_elementwise(sch, b, lanes)
            return sch
        out = [b for b, name in zip(blocks, names) if name.startswith(OUTPUT_BLOCK)]
        if len(out) != 1:
            return None
        m = int(sch.get(out[0]).name_hint[len(OUTPUT_BLOCK):])
        # the epilogue made one block (SiLU's x * sigmoid(x) reads the bias add twice), then
        # folded into the transform's write
        chain = [b for b in blocks if not b.same_as(out[0]) and not inline_into_consumers(sch, b)]
        rest = [b for b in chain if not reverse_inline_epilogue(sch, b)]
        self._output(sch, out[0], m, lanes)
        for b in rest:
            schedule_elementwise(sch, b, lanes)
        return sch

    @classmethod
    def _input_gemm(cls, sch: s_tir.Schedule, blocks: dict, lanes: int, registers: int, layout_free: frozenset) -> None:
        gemm, transform = blocks.pop(GEMM_BLOCK), blocks.pop(INPUT_BLOCK)
        # The zero padding inlines: its branch depends on the tile alone, not on the vectorized
        # channels (faster than a padded copy per block: 322 against 342 us on densenet's
        # 128 -> 32 conv at 56x56). So does any elementwise producer FuseOps put in.
        kept = []
        for block in blocks.values():
            try:
                sch.compute_inline(block)
            except Exception:  # noqa: BLE001 - made per block of tiles below
                kept.append(block)
        e, p, k, c = sch.get_loops(gemm)
        tiles, channels = int(sch.get(p).extent), int(sch.get(k).extent)
        width = vector_width(channels, lanes, 2 * lanes)
        most = tile_rows(width, lanes, registers)
        rows = largest_divisor_at_most(tiles, most)
        rows = rows if rows >= MIN_GEMM_ROWS else min(most, tiles)
        po, pi = sch.split(p, [None, rows])
        ko, ki = sch.split(k, [None, width])
        sch.reorder(po, e, ko, c, pi, ki)
        if int(sch.get(po).extent) > 1:
            sch.parallel(po)
        acc = sch.cache_write(gemm, 0, "local")
        sch.reverse_compute_at(acc, ko)
        sch.unroll(pi)
        sch.vectorize(ki)
        sch.vectorize(sch.get_loops(acc)[-1])
        sch.decompose_reduction(gemm, c)
        prepack_weights(sch, gemm, 2, width, layout_free)
        sch.compute_at(transform, po)
        cls._transform(sch, transform, lanes)
        for block in kept:
            sch.compute_at(block, po)
            lp = sch.get_loops(block)[-1]
            _, vec = sch.split(lp, [None, vector_width(int(sch.get(lp).extent), lanes)])
            sch.vectorize(vec)

    @classmethod
    def _input_alone(cls, sch: s_tir.Schedule, block, lanes: int) -> None:
        """The whole transformed input, tiles x channel blocks in parallel (for a GEMM of its own)."""
        cls._transform(sch, block, lanes)
        p, co, *inner = sch.get_loops(block)
        outer = sch.fuse(p, co)
        if math.prod(int(sch.get(lp).extent) for lp in [outer, *inner]) >= PARALLEL_MIN_WORK:
            sch.parallel(outer)

    @staticmethod
    def _transform(sch: s_tir.Schedule, block, lanes: int) -> None:
        e, p, c = sch.get_loops(block)[-3:]
        alpha = math.isqrt(int(sch.get(e).extent))
        channels = int(sch.get(c).extent)
        xi, nu = sch.split(e, [alpha, alpha])
        co, ci = sch.split(c, [None, vector_width(channels, lanes)])
        sch.reorder(p, co, xi, nu, ci)
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
