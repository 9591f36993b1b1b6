"""CUDA kernels that have been written and emulated here but not yet run on a GPU.

A hand-written CUDA kernel can pass every CPU-side check (lane-by-lane emulation of its index
arithmetic, ptxas without spills) and still be wrong on the device: a missing barrier, a shared
memory race. Such a kernel is chosen by a build only when ``SQUEEZER_CUDA_UNVERIFIED`` names it
(or is ``1``); otherwise the build keeps the kernel it used before, which a GPU run has checked.
``python -m benchmarks.gpu_check prepare`` sets it, so the next GPU run measures and checks them
against torch; once a row passes there, the kernel leaves ``UNVERIFIED``.
"""

from __future__ import annotations

import os

ENV = "SQUEEZER_CUDA_UNVERIFIED"
# Checked on an H200 on 2026-12-04 and since chosen by default: binary_conv2d_cuda (cuda_conv.py,
# every variant within 4e-5 of torch float64; benchmarks/results/gpu_kernels_bconv_lut.md) and
# lut_gemm (cuda_lut.py, batch 64 at 4096 and 8192).
# int_gemv_dp4a (cuda_int.py, int8 and grouped int4 Linears at batch <= 8): written and emulated
# 2026-12-06, no GPU lent yet.
UNVERIFIED: frozenset[str] = frozenset({"int_gemv_dp4a"})


def allowed(kernel: str) -> bool:
    """Whether a build may choose ``kernel`` (always, once it has been checked on a GPU)."""
    if kernel not in UNVERIFIED:
        return True
    wanted = os.environ.get(ENV, "")
    return wanted == "1" or kernel in {k.strip() for k in wanted.split(",")}
