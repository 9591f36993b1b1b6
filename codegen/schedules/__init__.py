"""Schedules: what turns an operator's loop nest into fast code on each target.

* :mod:`.cpu` — our default rules for every fused operator on llvm targets;
* :mod:`.row_reduction` — LayerNorm/RMSNorm/softmax rows with their sums and maxima in vector lanes;
* :mod:`.winograd_cpu` — the Winograd input/output transforms (codegen/winograd.py);
* :mod:`.bitserial_cpu` — the hand schedules of the TE bit-serial kernels (kernels/bitserial_te.py);
* :mod:`.cuda` — dlight's GPU rules, one-thread-per-output for the TE bit-serial kernels, and the
  check that every kernel of a CUDA build binds threads.

Hand-written TIR kernels (kernels/) carry their own schedule and are marked scheduled."""

from __future__ import annotations

import tvm

from . import cpu, cuda
from .row_reduction import RowReductionRule
from .winograd_cpu import WinogradTransformRule


def default_rules(target: tvm.target.Target) -> list:
    """Default schedules: ours on CPU; dlight's on CUDA, each guarded so a rule that crashes on one
    function (dlight's Matmul does on some fused epilogues) hands it to the next rule."""
    if target.kind.name == "llvm":
        return default_cpu_rules()
    return cuda.default_gpu_rules()


def default_cpu_rules() -> list:
    """Ours first, dlight's CPU rules for what ours decline; each guarded (cpu.SafeRule)."""
    from tvm.s_tir import dlight as dl

    rules = (WinogradTransformRule(), cpu.SpatialReductionRule(), RowReductionRule(), dl.cpu.Reduction(),
             cpu.ElementwiseRule(), dl.cpu.GEMV())
    return [cpu.SafeRule(r) for r in rules]
