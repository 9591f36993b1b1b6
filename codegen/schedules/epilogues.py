"""Epilogues of a scheduled CPU kernel: which elementwise blocks fold into their producer, which
are computed tile by tile under it, and which stay as their own loop nest. Split from cpu.py,
whose rules call these."""

from __future__ import annotations

import math

from tvm import s_tir, tirx


def _output_elems(sch: s_tir.Schedule, block) -> int:
    shape = sch.get(block).writes[0].source.shape
    return math.prod(int(d) for d in shape) if all(isinstance(d, tirx.IntImm) for d in shape) else -1


def reverse_inline_epilogue(sch: s_tir.Schedule, block) -> bool:
    """Fold an elementwise consumer into its producer, only where it covers the producer's whole
    output: TVM 0.27's reverse_compute_inline accepts a consumer that reads part of it (the
    strided_slice after a column-padded conv, pad_columns.py) and then writes the producer's
    whole domain into the smaller buffer, out of bounds (a 64->53 1x1 conv at 13x13 went wrong).
    Returns whether it was inlined."""
    size = _output_elems(sch, block)
    producers = sch.get_producers(block)
    if size <= 0 or not producers or any(_output_elems(sch, p) != size for p in producers):
        return False
    if any(len(sch.get_consumers(p)) > 1 for p in producers):
        # another block reads the producer's result too (SiLU's x * sigmoid(x)): TVM 0.27 folds the
        # consumer in anyway, the result is never written and the build fails ("used before its
        # definition") - inline_into_consumers first makes such a chain one block
        return False
    try:
        sch.reverse_compute_inline(block)
    except Exception:  # noqa: BLE001 - not an elementwise consumer: it keeps its own loop nest
        return False
    return True


def inline_without_recompute(sch: s_tir.Schedule, infos: list) -> list:
    """Like dlight's try_inline, but an elementwise block is folded into its consumers only when
    none of them is larger: inlining a sigmoid over (N, C) into a broadcast multiply over
    (N, H, W, C) would recompute it H*W times."""
    remaining = [info for info in infos if reduces(sch, info) or not inline_into_consumers(sch, info.block_rv)]
    kept = []
    for info in reversed(remaining):  # epilogues into their (non-reduction) producers
        producers = sch.get_producers(info.block_rv)
        if not reduces(sch, info) and producers and not any(_has_init(sch, p) for p in producers) \
                and reverse_inline_epilogue(sch, info.block_rv):
            continue
        kept.append(info)
    return list(reversed(kept))


def inline_into_consumers(sch: s_tir.Schedule, block) -> bool:
    """Fold an elementwise block into its consumers where none of them is larger (no recompute
    per broadcast element). Returns whether it was inlined."""
    size = _output_elems(sch, block)
    consumers = sch.get_consumers(block)
    if not consumers or size <= 0 or not all(0 < _output_elems(sch, c) <= size for c in consumers):
        return False
    try:
        sch.compute_inline(block)
    except Exception:  # noqa: BLE001 - not inlinable: keeps its own loop nest
        return False
    return True


def _has_init(sch: s_tir.Schedule, block) -> bool:
    return sch.get(block).init is not None


def reduces(sch: s_tir.Schedule, info) -> bool:
    """A reduction block. One whose reduction has length 1 (a Linear or conv with one input
    feature) loses its reduction loop in ``normalize_prim_func`` and looks injective, but it
    still has an init: inlining an epilogue into it puts the epilogue into the init and into the
    update, so a bias is added twice. Such a block is scheduled as the reduction it is."""
    return not info.is_injective() or _has_init(sch, info.block_rv)


def pads_nothing(sch: s_tir.Schedule, block) -> bool:
    """A padding block of a window without padding (every 1x1 conv, a stride-2 1x1 shortcut):
    a plain copy of its input, which materialized is one more pass over memory per conv."""
    stmt = sch.get(block)
    return len(stmt.reads) == 1 and _output_elems(sch, block) > 0 and \
        list(stmt.reads[0].source.shape) == list(stmt.writes[0].source.shape) and \
        all(isinstance(d, tirx.IntImm) for d in stmt.reads[0].source.shape)


def epilogues_at_tiles(sch: s_tir.Schedule, blocks: list, loop, result) -> list:
    """Epilogues that cover only part of the result (the slice after a column-padded conv,
    pad_columns.py) cannot fold into its write-back; computed under the tile loop instead, they
    read each tile while it is in cache and the full padded result is never stored (16 MB for
    mobilenet_v3's 72-channel conv at batch 16). One larger than ``result`` (an SE gate broadcast
    over the feature map) keeps its own loop nest: under a small conv's serial tile loop it would
    run on one thread. Returns the blocks that stay where they are."""
    left = []
    most = _output_elems(sch, result)
    for block in blocks:
        if not 0 < _output_elems(sch, block) <= most:
            left.append(block)
            continue
        try:
            sch.reverse_compute_at(block, loop)
        except Exception:  # noqa: BLE001 - not a consumer of this tile: keeps its own loop nest
            left.append(block)
            continue
        try:
            sch.vectorize(sch.get_loops(block)[-1])
        except Exception:  # noqa: BLE001 - a predicated column tail stays scalar
            pass
    return left


def upstream_names(sch: s_tir.Schedule, block) -> set[str]:
    """Names of the blocks whose results flow into ``block``."""
    seen: set[str] = set()
    todo = list(sch.get_producers(block))
    while todo:
        b = todo.pop()
        name = sch.get(b).name_hint
        if name not in seen:
            seen.add(name)
            todo += list(sch.get_producers(b))
    return seen
