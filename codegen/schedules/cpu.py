"""Default CPU schedules so an untuned build is already competitive.

TVM's default Relax CPU pipeline leaves every operator as a naive loop nest (dlight ships
CPU rules only for GEMV and row reductions).  These rules give every fused PrimFunc a
register-blocked, vectorized, parallel schedule:

* ``SpatialReductionRule`` — any block with spatial and reduction loops (matmul, conv in
  NHWC/HWIO, pooling, our compressed kernels): spatial loops tiled into an outer parallel
  part and an inner ``rows × lanes`` register tile accumulated in a local cache, the
  innermost output axis vectorized, elementwise epilogues (bias, activation) fused into
  the write-back.
* ``ElementwiseRule`` — injective functions: loops fused, vectorized, parallel when large.
"""

from __future__ import annotations

import logging
import math

import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule, try_inline
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from . import weight_prefetch
from .pad_rows import (MIN_PAD_ROWS, PaddedInput, band_block_loops, band_loop, max_taps, padded_input,
                       pads_per_channel_block)
from .vector_unit import most_accumulators, tile_rows, vector_lanes, vector_registers
from .concat_partition import concat_boundaries, partition_at_inputs
from .epilogues import (epilogues_at_tiles, inline_without_recompute, pads_nothing, reduces, reverse_inline_epilogue,
                        upstream_names)

LOG = logging.getLogger("squeezer.codegen")
PARALLEL_MIN_WORK = 4096  # below this many output elements a parallel loop costs more than it saves
PARALLEL_MIN_MACS = 1 << 16  # ...unless each output reduces this much in all (a classifier's GEMV)
PAD_ROWS_MAX_WEIGHT_BYTES = 1 << 20  # rows outermost re-read the weight per row: only while it stays in L2
SMALL_REDUCTION = 64       # reductions this short (depthwise 3x3..7x7 windows) are unrolled whole


def vector_width(extent: int, lanes: int, most: int | None = None) -> int:
    """Lanes to vectorize an axis of ``extent`` with: a divisor that is a multiple of a full
    register (16 fp32 on AVX-512) or a power of two >= 4. Odd widths like 24 or 12 make LLVM keep
    the accumulators in memory (a 24-channel conv ran 10x slower than a 32-channel one); small
    extents without such a divisor are one partial vector."""
    most = most or lanes
    for d in range(min(extent, most), 0, -1):
        if extent % d == 0 and (d % lanes == 0 or (d & (d - 1) == 0 and d >= 4)):
            return d
    return extent if extent <= lanes else largest_divisor_at_most(extent, lanes)


def _vector_tile(extent: int, lanes: int, group: int | None) -> int:
    """Lanes of the output axis per register tile: one or two vectors, inside index groups (a
    16-channel group is two ymm vectors on AVX2 that share each broadcast input: regnet_x_400mf
    9.56 -> 8.82 ms on znver3, one vector a tile before)."""
    return vector_width(math.gcd(extent, group) if group else extent, lanes, 2 * lanes)


def row_tile(rows: int, jf: int, lanes: int, registers: int) -> int | None:
    """Rows per register tile: a divisor of ``rows`` near ``tile_rows``, else one up to
    ``most_accumulators`` (13 rows of squeezenet's 13x13 maps: padded to 16 they wasted 23 %
    of the MACs); None when there is no such divisor (197 tokens: the rows are padded instead)."""
    bound = tile_rows(jf, lanes, registers)
    rf = largest_divisor_at_most(rows, bound)
    if rows <= bound or 2 * rf >= bound:
        return rf
    wide = largest_divisor_at_most(rows, most_accumulators(registers) // max(1, jf // lanes))
    return wide if 2 * wide >= bound else None


def tile_plan(rows: int, ext: int, lanes: int, group: int | None = None, *, registers: int) -> tuple[int, int | None]:
    """The register tile of a matmul/conv output: lanes per row ``jf`` and rows ``rf`` (None
    where no tile divides the rows, which are then padded). Two vectors per row by default; one,
    with more rows, where only that divides them (a 1x1 conv on 27x27 maps: 9 rows of one vector
    instead of padding 27 rows to 32, 18 % more MACs and a copy of the input)."""
    jf = _vector_tile(ext, lanes, group)
    if rows <= 1:
        return jf, None
    rf = row_tile(rows, jf, lanes, registers)
    if rf is None and jf > lanes and jf % lanes == 0:
        narrow = row_tile(rows, lanes, lanes, registers)
        if narrow is not None:
            return lanes, narrow
    return jf, rf


def largest_divisor_at_most(extent: int, bound: int) -> int:
    for f in range(min(extent, bound), 0, -1):
        if extent % f == 0:
            return f
    return 1


def _static_extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _lane_group(sch: s_tir.Schedule, block, iter_index: int) -> int | None:
    """Vectors must not straddle index groups of the vectorized iterator, or loads turn into
    gathers and selects into per-lane branches: ``c // 8`` in a grouped conv, ``c < 16`` in a
    concat. Returns the gcd of such constants in the block (None when there are none)."""
    blk = sch.get(block)
    var = blk.iter_vars[iter_index].var
    divisors: list[int] = []

    def uses_var(expr) -> bool:
        found: list[bool] = []
        tvm_ffi.structural_walk(expr, [(tirx.Var, lambda v: found.append(v.same_as(var)))])
        return any(found)

    def visit(node) -> None:
        for x, c in ((node.a, node.b), (node.b, node.a)):
            if isinstance(c, tirx.IntImm) and c.value > 1 and uses_var(x):
                divisors.append(int(c.value))

    kinds = (tirx.FloorDiv, tirx.FloorMod, tirx.LT, tirx.LE, tirx.GT, tirx.GE)
    for region in blk.reads:
        for rng in region.region:
            tvm_ffi.structural_walk(rng.min, [(k, visit) for k in kinds])
    tvm_ffi.structural_walk(blk.body, [(k, visit) for k in kinds[2:]])
    return math.gcd(*divisors) if divisors else None


def _is_pad_block(sch: s_tir.Schedule, block) -> bool:
    return "pad" in sch.get(block).name_hint


class SpatialReductionRule(CPUScheduleRule):
    """Register-tiled, vectorized schedule for blocks that reduce (matmul, conv, pooling)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or not any(reduces(sch, info) for info in infos):
            return None
        # Keep padding blocks materialized: inlined, they put a branch in the inner loop.
        keep = [i for i in infos if _is_pad_block(sch, i.block_rv)]
        for info in list(keep):
            if pads_nothing(sch, info.block_rv):
                try:
                    sch.compute_inline(info.block_rv)
                    keep.remove(info)
                    infos.remove(info)   # gone from the schedule: nothing may look it up again
                except Exception:  # noqa: BLE001 - stays a copy
                    pass
        rest = inline_without_recompute(sch, [i for i in infos if not _is_pad_block(sch, i.block_rv)])
        lanes, registers = vector_lanes(target), vector_registers(target)
        reductions = [i for i in rest if reduces(sch, i)]
        others = [i.block_rv for i in rest if not reduces(sch, i)]
        if len(reductions) != 1:  # softmax/norm-like chains belong to dlight's Reduction rule
            return None
        for info in reductions:
            if any(k not in "SR" for k in info.dom_kind()):
                return None
        if {sch.get(b).name_hint for b in others} & upstream_names(sch, reductions[0].block_rv):
            return None   # a producer kept apart (the Winograd input transform): it is no epilogue to place
        layout_free = _layout_free_names(func)
        padded_in, padded_out, unplaced, prefetches = [], [], [], []
        for info in reductions:
            padded_in, padded_out = pad_to_whole_tiles(sch, info, lanes, registers)
            tiled = self._tile_reduction(sch, info, lanes, registers, layout_free, padding=padded_input(sch, keep))
            if tiled is None:
                return None  # dynamic extents: leave the func to the next rule untouched
            wb, rows, prefetch = tiled
            prefetches += [prefetch] if prefetch else []
            if rows is not None:  # the zero padding of the rows a window needs, made just before use
                for pad in keep:
                    sch.compute_at(pad.block_rv, rows)
                    sch.set_scope(pad.block_rv, 0, "local")   # a stack array when small (stack_buffers.py)
                    lp = sch.get_loops(pad.block_rv)[-1]
                    ext = _static_extent(sch, lp)
                    _, vec = sch.split(lp, [None, vector_width(ext, lanes)])
                    sch.vectorize(vec)
                keep = []
            # epilogues fused into the write-back block, else computed per tile while it is in cache
            others = [b for b in others if not reverse_inline_epilogue(sch, b)]
            tile_loop = sch.get_loops(wb)[0]
            unplaced = epilogues_at_tiles(sch, padded_out, tile_loop, wb)
            others = epilogues_at_tiles(sch, others, tile_loop, wb)
        for block in [i.block_rv for i in keep] + others + padded_in + unplaced:
            schedule_elementwise(sch, block, lanes)
        return weight_prefetch.insert(sch, prefetches)

    @staticmethod
    def _tile_reduction(sch: s_tir.Schedule, info, lanes: int, registers: int, layout_free: frozenset = frozenset(),
                        padding: PaddedInput | None = None):
        block = info.block_rv
        loops = sch.get_loops(block)
        kinds = info.dom_kind()
        s_loops = [lp for lp, k in zip(loops, kinds) if k == "S"]
        r_loops = [lp for lp, k in zip(loops, kinds) if k == "R"]
        if not s_loops:
            s_loops = [sch.add_unit_loop(block)]
        sch.reorder(*s_loops, *r_loops)
        extents = [_static_extent(sch, lp) for lp in s_loops]
        if any(e is None for e in extents):
            return None
        taps = _window_taps(sch, block, kinds)
        work = math.prod(extents)
        # innermost output axis -> vector lanes; the one before -> register rows
        j = s_loops[-1]
        jext = extents[-1]
        group = _lane_group(sch, block, kinds.rindex("S")) if "S" in kinds else None
        jf, rf = tile_plan(extents[-2] if len(s_loops) >= 2 else 1, jext, lanes, group, registers=registers)
        jo, ji = sch.split(j, [None, jf])
        outer = s_loops[:-1]
        inner = [ji]
        if len(s_loops) >= 2 and extents[-2] > 1:
            # no good divisor where pad_to_whole_tiles could not pad (one-row tiles re-read the
            # weight per row, 7x slower): whole tiles and a predicated last one instead
            rf = rf or tile_rows(jf, lanes, registers)
            io, ii = sch.split(s_loops[-2], [None, rf])
            outer = s_loops[:-2] + [io]
            inner = [ii, ji]
        elif jext // jf >= 8:  # one row (GEMV-like): several vectors of the row in registers instead
            most = min(tile_rows(jf, lanes, registers), max(1, jext // jf // 16))   # >= 16 tiles to share
            jv_f = largest_divisor_at_most(jext // jf, most)
            if jv_f > 1:
                jo, jv = sch.split(jo, [None, jv_f])
                inner = [jv, ji]
        rows = None
        window = taps if taps is not None else _conv_window(sch, r_loops)
        weight, other = _input_elements(sch, block, layout_free)
        pad_blocks = taps is not None and padding is not None and len(outer) >= 2 and pads_per_channel_block(padding)
        # a small window's padding made per band of output rows (and a depthwise one's on a small map
        # per band and block of channels), where there are rows (or blocks) enough to share
        pad_rows = pad_blocks or padding is not None and window is not None and window <= max_taps(taps is not None) \
            and len(outer) >= 2 and math.prod(extents[:len(outer) - 1]) >= MIN_PAD_ROWS \
            and 4 * weight <= PAD_ROWS_MAX_WEIGHT_BYTES
        weight_outer = not pad_rows and _weight_outweighs_inputs(weight, other)
        tiles = 0   # register-row tiles swept per weight panel (weight outer)
        # weight outer: each weight panel loaded once and swept over all the rows
        sch.reorder(*([jo, *outer] if weight_outer else [*outer, jo]), *r_loops, *inner)
        if pad_blocks:
            rows, fused = band_block_loops(sch, outer, extents, jo, jext // jf, jf, padding)
        elif pad_rows:
            rows = band_loop(sch, outer, extents, padding)   # parallel over bands of rows; tiles serial inside
            fused = sch.fuse(outer[-1], jo)
        elif weight_outer:   # too few rows (resnet's 7x7 maps): the padded copy kept, the weight swept
            tiles = math.prod(_static_extent(sch, lp) for lp in outer)
            fused = sch.fuse(jo, *outer)
        else:
            fused = sch.fuse(*outer, jo)
        if worth_parallel(work, [_static_extent(sch, lp) for lp in r_loops]):
            sch.parallel(rows if rows is not None else fused)
        wb = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(wb, fused)
        blk_loops = sch.get_loops(block)
        sch.vectorize(blk_loops[-1])
        if len(inner) == 2:
            sch.unroll(blk_loops[-2])
        if taps is not None:
            for lp in r_loops:  # a depthwise window: unrolled, each loaded input vector serves several taps
                sch.unroll(lp)
        wb_loops = sch.get_loops(wb)
        if len(wb_loops) > 1:
            sch.vectorize(wb_loops[-1])
        if r_loops:  # the accumulators zeroed per register tile (inside the tile loop), so they stay in registers
            sch.decompose_reduction(block, _loop_after(sch, block, fused))
        packed = prepack_weights(sch, block, kinds.rindex("S"), jf, layout_free) if r_loops and layout_free else None
        prefetch = weight_prefetch.plan(sch, block, fused, tiles, r_loops, packed) \
            if weight_outer and not pad_rows and taps is None else None
        return wb, rows, prefetch


def worth_parallel(outputs: int, reduction_extents: list) -> bool:
    """Whether a reducing kernel is worth a parallel loop: enough outputs, or enough MACs behind
    few outputs. A classifier's GEMV (1000 outputs of 1280..2048 MACs each, 5-8 MB of weight
    streamed from memory) ran on one core: half the memory bandwidth, 0.2-0.3 ms a model."""
    if outputs >= PARALLEL_MIN_WORK:
        return True
    if any(e is None for e in reduction_extents):
        return False
    return outputs * math.prod(reduction_extents) >= PARALLEL_MIN_MACS and outputs >= 64


def _loop_after(sch: s_tir.Schedule, block, loop):
    """The block's loop just inside ``loop``."""
    loops = sch.get_loops(block)
    at = next(k for k, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(loop)))
    return loops[at + 1]


def pad_to_whole_tiles(sch: s_tir.Schedule, info, lanes: int, registers: int) -> tuple[list, list]:
    """A matmul-like block whose output axis has no vector-sized divisor (ViT's 197 tokens, a
    prime, as the columns of Q@Kᵀ) would run scalar, and one whose rows have no divisor near
    ``tile_rows`` runs a predicated last register tile (branches in the unrolled FMA rows: ViT's
    Linears at 75 % of peak). Its iteration domain is padded to whole vectors and tiles instead
    (``pad_einsum``: zero-padded operand copies, and a copy of the valid part of the result, into
    which the epilogue then fuses). Returns the blocks that adds (operand copies, result copies);
    none where nothing needs or allows padding (a conv's window is no einsum)."""
    kinds = info.dom_kind()
    block = info.block_rv
    spatial = [k for k, kind in enumerate(kinds) if kind == "S"]
    extents = [sch.get(block).iter_vars[k].dom.extent for k in spatial[-2:]]
    if not spatial or not all(isinstance(e, tirx.IntImm) for e in extents):
        return [], []
    factors = [1] * len(kinds)
    ext = int(extents[-1])
    group = _lane_group(sch, block, spatial[-1])
    if ext > lanes and vector_width(ext, lanes, 2 * lanes) < 4 and not group:
        factors[spatial[-1]] = lanes
        ext = -(-ext // lanes) * lanes
    rows = int(extents[0]) if len(extents) == 2 else 0
    if rows > 1:
        jf, rf = tile_plan(rows, ext, lanes, group, registers=registers)
        if rf is None:   # whole register tiles, no predicated last one
            factors[spatial[-2]] = tile_rows(max(jf, lanes), lanes, registers)
    if factors == [1] * len(kinds):
        return [], []
    before = {sch.get(b).name_hint for b in sch.get_producers(block) + sch.get_consumers(block)}
    try:
        sch.pad_einsum(block, factors)
    except Exception:  # noqa: BLE001 - not an einsum
        return [], []
    return ([b for b in sch.get_producers(block) if sch.get(b).name_hint not in before],
            [b for b in sch.get_consumers(block) if sch.get(b).name_hint not in before])


def _input_elements(sch: s_tir.Schedule, block, layout_free: frozenset) -> tuple[int, int]:
    """Elements the block reads from its constant (layout-free) weights and from its other
    static-shaped inputs (the buffer it accumulates into not counted)."""
    blk = sch.get(block)
    written = {region.source.name for region in blk.writes}
    weight = other = 0
    for region in blk.reads:
        buf = region.source
        if buf.name in written or not all(isinstance(d, tirx.IntImm) for d in buf.shape):
            continue
        elems = math.prod(int(d) for d in buf.shape)
        if buf.name in layout_free:
            weight += elems
        else:
            other += elems
    return weight, other


def _weight_outweighs_inputs(weight: int, other: int) -> bool:
    """The block's constant weight is larger than its other inputs (ViT's 768x3072 Linear at 197
    tokens: 9.4 MB against 0.6 MB; resnet's last 3x3 convs). Rows outermost would stream the whole
    weight once per row tile from L3 or memory (in a model the weight is never cached: 25 times
    per ViT Linear); column tiles outermost keep each weight panel in L2 while the small
    activations are swept, so the weight is read once."""
    return weight > other > 0


def _conv_window(sch: s_tir.Schedule, r_loops: list) -> int | None:
    """Taps of a conv's window (kh*kw of its kh, kw, channel reductions): a 3x3 grouped conv
    (regnet's 16-channel groups) gets its padding made per band of output rows like a depthwise one,
    instead of a padded copy of its whole input."""
    if len(r_loops) != 3:
        return None
    ext = [_static_extent(sch, lp) for lp in r_loops[:2]]
    return None if None in ext else math.prod(ext)


def _window_taps(sch: s_tir.Schedule, block, kinds: str) -> int | None:
    """The taps of a depthwise-style window: a reduction of at most SMALL_REDUCTION iterations
    whose reads are all contiguous along the vectorized axis (None for anything else)."""
    r_ext = [_static_extent(sch, lp) for lp, k in zip(sch.get_loops(block), kinds) if k == "R"]
    if not r_ext or None in r_ext or math.prod(r_ext) > SMALL_REDUCTION \
            or not _reads_along(sch, block, kinds.rindex("S")):
        return None
    return math.prod(r_ext)


def _reads_along(sch: s_tir.Schedule, block, j_index: int) -> bool:
    """Every read is contiguous along the vectorized axis (its last index is that axis): the
    window of an NHWC depthwise conv, not a channel-strided NCHW pooling, whose unrolled gathers
    took LLVM minutes to compile."""
    blk = sch.get(block)
    j_var = blk.iter_vars[j_index].var
    for region in blk.reads:
        last = region.region[-1].min if region.region else None
        found: list[bool] = []
        if last is not None:
            tvm_ffi.structural_walk(last, [(tirx.Var, lambda v: found.append(v.same_as(j_var)))])
        if not any(found):
            return False
    return True


def _layout_free_names(func: tirx.PrimFunc) -> frozenset:
    """Names of the func's parameters bound to constants (Relax's AttachAttrLayoutFreeBuffers):
    weights whose layout the schedule may choose, since they are repacked once at build time."""
    indices = func.attrs.get("layout_free_buffers", []) if func.attrs else []
    return frozenset(func.params[int(i)].name for i in indices)


def prepack_weights(sch: s_tir.Schedule, block, j_index: int, jf: int, layout_free: frozenset):
    """Weights read along the vectorized output axis in blocks of ``jf`` (an HWIO conv weight, a
    [K, N] matmul weight) stored blocked, ``[N // jf, ..., jf]``: a register tile's whole reduction
    then streams one contiguous run of the weight instead of ``jf`` values every N (one cache line
    per 2 KB on a 512-channel conv, which DRAM prefetchers could not follow: resnet18's last
    convs ran 2.2x slower inside the model than alone). The copy into this layout is marked as
    a layout-rewrite preprocess, split out of the kernel by SplitLayoutRewritePreproc and folded
    into the constant at build time (relax_pipeline.py). Returns the copy block (None: no copy)."""
    blk = sch.get(block)
    j_var = blk.iter_vars[j_index].var
    for k, region in enumerate(blk.reads):
        buf, rng = region.source, region.region
        last = rng[-1] if rng else None
        if buf.name not in layout_free or last is None or len(buf.shape) < 2 or not isinstance(buf.shape[-1], tirx.IntImm):
            continue
        n = int(buf.shape[-1])
        if n % jf or n == jf or not (isinstance(last.min, tirx.Var) and last.min.same_as(j_var)):
            continue  # not indexed by the vector axis alone, or already one block
        cached = sch.cache_read(block, k, "global")
        sch.transform_layout(block, ("read", k), lambda *idx: (idx[-1] // jf, *idx[:-1], idx[-1] % jf))
        sch.annotate(cached, "meta_schedule.layout_rewrite_preproc", True)
        return cached
    return None


def schedule_elementwise(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Vectorize the innermost axis (in lanes that respect its index groups), fuse the rest into
    one loop, parallel when large."""
    loops = sch.get_loops(block)
    if not loops:
        return
    extents = [_static_extent(sch, lp) for lp in loops]
    if any(e is None for e in extents):
        return
    work = math.prod(extents)
    axis = len(sch.get(block).iter_vars) - 1   # the innermost iterator; -1: none
    group = _lane_group(sch, block, axis) if axis >= 0 else None
    inner_ext = extents[-1] if not group else math.gcd(extents[-1], group)
    bounds = concat_boundaries(sch.get(block), axis) if axis >= 0 and len(loops) > 1 else []
    vf = vector_width(inner_ext, lanes)
    if bounds:   # a concatenation along the vector axis: one loop per input, each reading it alone
        partition_at_inputs(sch, loops[-1], extents[-1], bounds, vector_width(math.gcd(inner_ext, *bounds), lanes))
        outer = sch.fuse(*loops[:-1])
    elif vf > 1:
        outer_inner, vec = sch.split(loops[-1], [None, vf])
        sch.vectorize(vec)
        outer = sch.fuse(*loops[:-1], outer_inner)
    else:
        outer = sch.fuse(*loops)
    if work >= PARALLEL_MIN_WORK:
        sch.parallel(outer)


class ElementwiseRule(CPUScheduleRule):
    """Injective functions (reshape, add, layout transforms): fused, vectorized, parallel."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or any(reduces(sch, info) for info in infos):
            return None
        infos = try_inline(sch, infos)
        lanes = vector_lanes(target)
        for info in infos:
            schedule_elementwise(sch, info.block_rv, lanes)
        return sch


class SafeRule(ScheduleRule):
    """Wraps a rule (ours or dlight's, CPU or GPU) so one that raises on a func — a schedule
    primitive refusing it, or a bug in the rule — falls through to the next rule instead of
    failing the whole build."""

    def __init__(self, rule) -> None:
        self.rule = rule

    def apply(self, func, target, tunable):
        try:
            return self.rule.apply(func, target, tunable)
        except Exception as exc:  # noqa: BLE001 - any refusal means "not mine", the next rule decides
            LOG.debug("%s declined %s: %s", type(self.rule).__name__, func.attrs.get("global_symbol", "func")
                      if func.attrs else "func", exc)
            return None

    def is_target_available(self, target: Target) -> bool:
        return self.rule.is_target_available(target)
