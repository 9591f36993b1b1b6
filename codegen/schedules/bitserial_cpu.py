"""CPU schedules of the TE bit-serial kernels (kernels/bitserial_te.py): a register tile of output
rows × 16 words of outputs around the popcount block "P", accumulators in registers, parallel
outer loops; the bit-packing of the activations and the epilogue parallel and vectorized; the
small XNOR-Net scale kernels vectorized along a row. Each returns the function marked scheduled."""

from __future__ import annotations

import tvm


def divisor(n: int, options=(16, 8, 4, 2, 1)) -> int:
    return next(f for f in options if n % f == 0)


def popcount_tiles(func, spatial: list[str], tile_m: str, tile_n: str, n_extent: int, m_extent: int):
    """Schedule the popcount block "P": parallel over ``spatial`` (+ outer tiles), a register tile of
    ``tile_m`` rows × ``tile_n`` vector lanes, accumulators in registers; the bit-packing of the
    activations parallel with contiguous reads; the epilogue parallel and vectorized."""
    sch = tvm.s_tir.Schedule(func)
    blk = sch.get_sblock("P")
    loops = sch.get_loops(blk)
    by = {sch.get(lp).loop_var.name: lp for lp in loops}
    reduce = [lp for name, lp in by.items() if name.startswith("rd_")]
    mo, mi = sch.split(by[tile_m], [None, divisor(m_extent, (8, 7, 6, 5, 4, 3, 2, 1))])
    no, ni = sch.split(by[tile_n], [None, divisor(n_extent)])
    outer = [by[n] for n in spatial]
    sch.reorder(*outer, no, mo, *reduce, mi, ni)   # a block of weights stays in L1 across row tiles
    fused = sch.fuse(*outer, no, mo)
    sch.parallel(fused)
    cache = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(cache, fused)
    sch.unroll(mi)
    if len(reduce) > 1 and int(sch.get(reduce[-1]).extent) <= 8:
        sch.unroll(reduce[-1])   # a conv's few channel words per tap: no loop overhead between them
    _vectorize_inner(sch, ni, fused)
    _vectorize_inner(sch, sch.get_loops(cache)[-1], fused)
    sch.decompose_reduction(blk, reduce[0])
    _schedule_pack(sch)
    try:   # the popcount combination inside each tile, straight from the register accumulators
        y1 = sch.get_sblock("y1")
        sch.reverse_compute_at(y1, fused)
        sch.compute_inline(cache)
        _vectorize_inner(sch, sch.get_loops(y1)[-1], fused)
    except Exception:  # noqa: BLE001 - float activations have no y1 block
        pass
    try:
        y = sch.get_sblock("y")
    except Exception:  # noqa: BLE001 - the xnor kernel finishes inside the tiles
        return sch.mod["main"].with_attr("tirx.is_scheduled", True)
    ys = sch.get_loops(y)
    if len(ys) > 1:
        sch.parallel(sch.fuse(*ys[:-1]))
        if int(sch.get(ys[-1]).extent) <= 64:
            sch.vectorize(ys[-1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _vectorize_inner(sch, loop, tile_loop) -> None:
    """Vectorize a tile's innermost loop, unless the tile is one element wide: then the block's
    last loop is the parallel tile loop itself (unit loops vanish), and vectorizing that made a
    vector of every tile (10,296 lanes for a 33-output conv with 13 columns: LLVM ran for minutes)."""
    extent = int(sch.get(loop).extent)
    if sch.get(loop).same_as(sch.get(tile_loop)) or extent <= 1 or extent > 64:
        return
    sch.vectorize(loop)


def row_abs_sum(func):
    """XNOR-Net's row scale: 16 partial sums per row, vectorized across the partials (no
    decompose_reduction: its split init blocks vectorized badly), rows in parallel."""
    sch = tvm.s_tir.Schedule(func)
    blk = sch.get_sblock("beta_partial")
    r, lane, kq = sch.get_loops(blk)
    sch.reorder(r, kq, lane)
    sch.parallel(r)
    sch.vectorize(lane)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def xnor_window_sum(func):
    """The conv's XNOR-Net K kernel (stages "abs_sum" and "window_sum"): rows in parallel, the
    reduction (channels, window taps) outside a vectorized width loop, so each step is one vector
    op over a row."""
    sch = tvm.s_tir.Schedule(func)
    for blk in (sch.get_sblock("abs_sum"), sch.get_sblock("window_sum")):
        loops = sch.get_loops(blk)
        b, row, col, *red = loops
        sch.reorder(b, row, *red, col)
        sch.parallel(sch.fuse(b, row))
        extent = int(sch.get(col).extent)
        if extent > 64:
            col = sch.split(col, [None, divisor(extent)])[1]
        sch.vectorize(col)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _schedule_pack(sch) -> None:
    """packA: parallel over the leading spatial loops. Linear: the 64 bits of a word innermost, the
    word built in a register; conv: a row of words built at once from contiguous reads of x."""
    try:
        blk = sch.get_sblock("packA")
    except Exception:  # noqa: BLE001 - float activations: nothing to pack
        return
    loops = sch.get_loops(blk)
    if len(loops) == 6:                      # conv: i, b, hh, cw, ww, t
        i, b, hh, cw, ww, t = loops   # a row of words at once: contiguous x reads, vector ops
        sch.reorder(i, b, hh, cw, t, ww)
        sch.parallel(sch.fuse(i, b, hh))
        sch.vectorize(ww)             # (no decompose_reduction: its init block vectorized badly)
        pad = sch.get_sblock("padA")
        sch.parallel(sch.fuse(*sch.get_loops(pad)[:3]))
    else:                                    # linear: i, row, w, t
        i, row, w, t = loops
        sch.parallel(sch.fuse(i, row))
        sch.unroll(t)                        # constant shifts

