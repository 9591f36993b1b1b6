"""Schedules: what turns an operator's loop nest into fast code on each target.

* :mod:`.cpu` — our default rules for every fused operator on llvm targets;
* :mod:`.bitserial_cpu` — the hand schedules of the TE bit-serial kernels (kernels/bitserial_te.py);
* :mod:`.cuda` — dlight's GPU rules, one-thread-per-output for the TE bit-serial kernels, and the
  check that every kernel of a CUDA build binds threads.

Hand-written TIR kernels (kernels/) carry their own schedule and are marked scheduled."""

from __future__ import annotations

import tvm

from . import cpu, cuda


def default_rules(target: tvm.target.Target) -> list:
    """Default schedules: ours on CPU; dlight's on CUDA, each guarded so a rule that crashes on one
    function (dlight's Matmul does on some fused epilogues) hands it to the next rule."""
    if target.kind.name == "llvm":
        return cpu.default_cpu_rules()
    return cuda.default_gpu_rules()
