"""Concatenations along the vector axis: one input read per vector, not every input.

TVM lowers ``concatenate`` along an axis to a chain of ``if_then_else`` on that axis' index
(``176 <= c ? x4[c - 176] : (160 <= c ? x3[c - 160] : ...)``). When that axis is the vectorized
one (NHWC channels), every vector evaluates the whole chain: it loads from every input and
selects. DenseNet's pre-activation (BatchNorm + ReLU over the concatenation of all earlier
layers, up to 31 inputs) then ran at 0.6 ms per 14x14 kernel, half of pruned densenet121's
time. With the loop over vectors unrolled, each vector's index is a constant, the chain folds
to the one input it reads (the same kernels: 0.01-0.03 ms)."""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx

MAX_UNROLLED_BRANCH_VECTORS = 64   # densenet121's widest concatenation: 1024 channels in 16 lanes
_IF_THEN_ELSE = tvm.ir.Op.get("prim.if_then_else")


def branches_on_axis(block: tirx.SBlock, axis: int) -> bool:
    """Whether the block picks between inputs by its ``axis`` index (a concatenation along it:
    ``if_then_else(176 <= c, x4[c - 176], if_then_else(160 <= c, x3[c - 160], ...))``)."""
    var = block.iter_vars[axis].var
    found: list[bool] = []

    def uses_var(expr) -> bool:
        hits: list[bool] = []
        tvm_ffi.structural_walk(expr, [(tirx.Var, lambda v: hits.append(v.same_as(var)))])
        return any(hits)

    def visit(call) -> None:   # a choice between two inputs, not an input and a constant (padding)
        if call.op.same_as(_IF_THEN_ELSE) and uses_var(call.args[0]) and \
                not any(isinstance(a, (tirx.IntImm, tirx.FloatImm)) for a in call.args[1:]):
            found.append(True)

    tvm_ffi.structural_walk(block.body, [(tvm.ir.Call, visit)])
    return bool(found)
