"""Weight prepacking evaluated in numpy. Our conv and matmul schedules store their constant weights
in a blocked layout; TVM splits each layout change into a ``*_weight_prepack`` PrimFunc that
FoldConstant then builds with LLVM and runs, one kernel per weight (a second or more of a
resnet18 build). Each of those functions is one scatter, ``out[f(i)] = w[i]`` over the weight's
indices, with ``f`` made of integer + - × // %: numpy does it with fancy indexing, bit for bit.
Anything else (several blocks, a condition, arithmetic on the value) is left to FoldConstant."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import tirx
from tvm.s_tir import SBlockRealize

_OPS = {tirx.Add: np.add, tirx.Sub: np.subtract, tirx.Mul: np.multiply,
        tirx.FloorDiv: np.floor_divide, tirx.FloorMod: np.mod}


def _index(expr, grids: dict) -> np.ndarray | None:
    """An index expression over the loop variables, as a broadcastable numpy array."""
    if isinstance(expr, tirx.IntImm):
        return np.int64(expr.value)
    if isinstance(expr, tirx.Var):
        return grids.get(expr)
    op = _OPS.get(type(expr))
    if op is None:
        return None
    a, b = _index(expr.a, grids), _index(expr.b, grids)
    return None if a is None or b is None else op(a, b)


def _is_true(predicate) -> bool:
    return isinstance(predicate, tirx.IntImm) and predicate.value == 1


def _nested_loops(stmt) -> tuple[list, object]:
    loops = []
    while isinstance(stmt, tirx.For):
        if not isinstance(stmt.min, tirx.IntImm) or stmt.min.value != 0 or not isinstance(stmt.extent, tirx.IntImm):
            return [], None
        loops.append(stmt)
        stmt = stmt.body
    return loops, stmt


def scatter(func: tirx.PrimFunc) -> tuple | None:
    """(the loop extents, the output's index arrays) of a single-block scatter ``out[f(i)] = w[i]``
    whose loops run over all of ``w`` in order; None for any other function."""
    root = func.body
    if not isinstance(root, SBlockRealize) or len(func.params) != 2 or len(root.block.alloc_buffers):
        return None
    loops, inner = _nested_loops(root.block.body)
    if not loops or not isinstance(inner, SBlockRealize) or not _is_true(inner.predicate):
        return None
    block = inner.block
    store = block.body
    if not isinstance(store, tirx.BufferStore) or not isinstance(store.value, tvm.ir.TensorLoad) \
            or block.init is not None or len(block.iter_vars) != len(loops):
        return None
    if any(not binding.same_as(loop.loop_var) for binding, loop in zip(inner.iter_values, loops)):
        return None
    iters = [iv.var for iv in block.iter_vars]
    load = store.value
    in_buf, out_buf = func.params   # a parameter is its buffer here
    if not load.source.same_as(in_buf) or not store.buffer.same_as(out_buf) \
            or len(load.indices) != len(iters) or any(not i.same_as(v) for i, v in zip(load.indices, iters)):
        return None
    extents = [int(loop.extent.value) for loop in loops]
    if extents != [int(d) for d in in_buf.shape]:
        return None
    grids = {v: np.arange(n, dtype=np.int64).reshape([-1 if k == d else 1 for k in range(len(extents))])
             for d, (v, n) in enumerate(zip(iters, extents))}
    indices = [_index(e, grids) for e in store.indices]
    if any(i is None for i in indices):
        return None
    return extents, indices


def evaluate_scatter(func: tirx.PrimFunc, weight: np.ndarray, out_shape: list[int], out_dtype: str
                     ) -> np.ndarray | None:
    """The function's output for ``weight``, or None if it is not a scatter this module reads or
    does not write every element of its output exactly once (TVM would leave the rest unset)."""
    found = scatter(func)
    if found is None or list(weight.shape) != found[0] or str(weight.dtype) != out_dtype:
        return None
    indices = [np.broadcast_to(i, weight.shape) for i in found[1]]
    if any(i.min(initial=0) < 0 or i.max(initial=0) >= n for i, n in zip(indices, out_shape)):
        return None
    if weight.size != int(np.prod(out_shape)):
        return None
    out = np.zeros(out_shape, weight.dtype)
    hit = np.zeros(out_shape, np.bool_)
    out[tuple(indices)] = weight
    hit[tuple(indices)] = True
    return out if hit.all() else None
