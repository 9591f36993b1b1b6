"""Row reductions (LayerNorm, RMSNorm, softmax) with their sums and maxima in vector lanes.

dlight's CPU ``Reduction`` rule runs each row's reduction as one serial chain (768 dependent adds
per ViT LayerNorm row, twice: 0.17 ms for 197 rows, 3 % of vit_b_16 and 7 % of convnext_tiny),
because TVM's ``rfactor`` refuses a block that ``compute_at`` has already nested. Here every
reduction over a row's innermost axis is factored first, while it is still a top-level block:
``lanes`` partial results accumulate in one vector register (the row walked a vector at a time),
and one short serial pass adds the lanes. Then, as dlight does: the last block's leading spatial
axes parallel, every block computed inside that loop, elementwise blocks vectorized. The factored
blocks' lane loops are found by their bindings after ``compute_at`` (which nests them in no fixed
order): taken by position, the lane loop stayed outermost and each lane ran its own serial chain,
which cost ViT's LayerNorm 117 us instead of 20 and a Swin stage-1 LayerNorm 286 us instead of 59
(znver4, 2 threads). Rows that are not whole registers are walked by the widest divisor of the
row (``row_vector_width``: 7 for a 7x7 window's 49 scores).

Summing in lanes changes the order of additions (as every vectorized BLAS does); the result
stays within the 1e-4 relative contract."""

from __future__ import annotations

import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from .cpu import _static_extent, largest_divisor_at_most, vector_lanes

MIN_VECTORS = 2   # a row shorter than this many vectors keeps dlight's schedule


def row_vector_width(extent: int, lanes: int) -> int | None:
    """Lanes to walk a row of ``extent`` with: a whole register when the row is whole registers,
    else the widest divisor of the row of at least a quarter register (a 49-wide window-attention
    row of Swin or MaxViT: 7). Every vector is then full: split by a whole register, the last
    vector's predicate makes TVM scalarize the whole loop (dlight's rule does; MaxViT's softmax
    ran its exp one float at a time, 0.7 ns an element). None for a row with no such divisor."""
    if extent % lanes == 0:
        return lanes
    width = largest_divisor_at_most(extent, lanes - 1)
    return width if width >= max(2, lanes // 4) else None


def _reads_rows(sch: s_tir.Schedule, block) -> bool:
    """Every read the reduction walks is contiguous along it (its last index is the reduction
    variable): a softmax over a middle axis would turn the lanes into gathers."""
    blk = sch.get(block)
    (r_var,) = [iv.var for iv in blk.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    walked = False
    for region in blk.reads:
        for k, rng in enumerate(region.region):
            found: list[bool] = []
            tvm_ffi.structural_walk(rng.min, [(tirx.Var, lambda v: found.append(v.same_as(r_var)))])
            if any(found):
                if k != len(region.region) - 1:
                    return False
                walked = True
    return walked


def _lane_and_reduction_loops(sch: s_tir.Schedule, rf) -> tuple:
    """The loops a factored block's lane and reduction iterators are bound to. ``compute_at``
    nests them in no fixed order among unit loops (a 4-D softmax got lane, unit, unit, reduction,
    unit), so they are found by their bindings, not by position."""
    loops = sch.get_loops(rf)
    realize = sch.get(loops[-1]).body
    while not isinstance(realize, s_tir.SBlockRealize):   # a unit loop or two may sit in between
        realize = realize.body
    inner = [(sch.get(loop).loop_var, loop) for loop in loops[1:] if _static_extent(sch, loop) != 1]  # [0]: rows
    lane = outer = None
    for iv, value in zip(realize.block.iter_vars, realize.iter_values):
        found: list = []
        tvm_ffi.structural_walk(value, [(tirx.Var, lambda v: found.extend(lp for var, lp in inner if var.same_as(v)))])
        if len(found) == 1:
            if iv.iter_type == tirx.IterVar.CommReduce:
                outer = found[0]
            else:
                lane = found[0]
    if lane is None or outer is None:
        raise ValueError("factored reduction without a lane and a reduction loop")
    return lane, outer


class RowReductionRule(CPUScheduleRule):
    """Reductions over the innermost axis of rows, vectorized by a factored lane axis."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or len(infos) < 2 or not infos[-1].is_injective():
            return None
        reductions = [i for i in infos if not i.is_injective()]
        if not reductions:
            return None
        lanes = vector_lanes(target)
        leading = min(len(i.dom_kind()) - len(i.dom_kind().lstrip("S")) for i in infos)   # leading spatial axes
        if not leading:
            return None
        widths = set()
        for info in reductions:   # one reduction axis, innermost, whole vectors of it
            kinds = info.dom_kind()
            if kinds.count("R") != 1 or not kinds.endswith("R"):
                return None
            ext = _static_extent(sch, sch.get_loops(info.block_rv)[-1])
            width = row_vector_width(ext, lanes) if ext is not None else None
            if width is None or ext < MIN_VECTORS * width or not _reads_rows(sch, info.block_rv):
                return None
            widths.add(width)
        if len(widths) != 1:
            return None
        (width,) = widths
        factored = []
        for info in reductions:
            loop = sch.get_loops(info.block_rv)[-1]
            _, lane = sch.split(loop, [None, width])
            factored.append(sch.rfactor(lane, factor_axis=len(info.dom_kind()) - 1))
        last = infos[-1].block_rv
        loops = sch.get_loops(last)
        rows = sch.fuse(*loops[:leading]) if leading > 1 else loops[0]
        sch.parallel(rows)
        self._vectorize_inner(sch, last, width)
        blocks = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if not sch.get(b).same_as(sch.get(last))]
        for block in reversed(blocks):
            sch.compute_at(block, rows, preserve_unit_loops=True)
        for rf in factored:       # (..., lane, outer) -> (..., outer, lane): the lane axis a vector
            lane, outer = _lane_and_reduction_loops(sch, rf)
            sch.reorder(outer, lane)
            sch.vectorize(lane)
        for info in infos[:-1]:
            if info.is_injective():
                self._vectorize_inner(sch, info.block_rv, width)
        return sch

    @staticmethod
    def _vectorize_inner(sch: s_tir.Schedule, block, lanes: int) -> None:
        loops = sch.get_loops(block)
        if len(loops) <= 1:
            return
        ext = _static_extent(sch, loops[-1])
        if ext is None or ext < 2:
            return
        width = row_vector_width(ext, lanes) if ext > lanes else None
        if width is not None:
            _, vec = sch.split(loops[-1], [None, width])
            sch.vectorize(vec)
        elif ext <= lanes:
            sch.vectorize(loops[-1])
