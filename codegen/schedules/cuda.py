"""CUDA schedules: dlight's GPU rules for the fused operators, one thread per output for the TE
bit-serial kernels, and the check that a CUDA build has no kernel scheduled for the CPU."""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm.s_tir import dlight as dl

from compiler.errors import BuildError

from .cpu import SafeRule

GPU_THREADS = 256


def default_gpu_rules() -> list:
    return [SafeRule(dl.gpu.Matmul()), SafeRule(dl.gpu.GEMV()), SafeRule(dl.gpu.Reduction()),
            SafeRule(dl.gpu.GeneralReduction()), dl.gpu.Fallback()]


def one_thread_per_output(func):
    """One thread per output element of every stage (bit-packing, popcount sums, epilogue), each
    stage its own kernel, reductions (words, bits, taps) serial inside the thread. dlight's
    generic rules turn these integer reductions into one serial block (see benchmarks/README.md)."""
    sch = tvm.s_tir.Schedule(func)
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(blk)
        kinds = [iv.iter_type for iv in sch.get(blk).iter_vars]
        n_spatial = kinds.count(tvm.tirx.IterVar.DataPar)
        if len(kinds) != len(loops) or kinds[:n_spatial] != [tvm.tirx.IterVar.DataPar] * n_spatial:
            raise BuildError(f"the GPU schedule expects spatial loops outside the reductions in {sch.get(blk).name_hint}")
        spatial = loops[:n_spatial] or [sch.add_unit_loop(blk)]
        fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        extent = int(sch.get(fused).extent)
        bx, tx = sch.split(fused, [None, min(GPU_THREADS, extent)])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _binds_threads(func: tvm.tirx.PrimFunc) -> bool:
    found = []
    tvm_ffi.structural_walk(func.body, [(tvm.tirx.For, lambda loop: found.append(
        loop.thread_binding is not None and str(loop.thread_binding.thread_tag).startswith("threadIdx")))])
    return any(found)


def check_gpu_kernels(mod: tvm.IRModule) -> None:
    """Every kernel of a GPU build must bind threads: one scheduled for the CPU (parallel/vector
    loops) would be compiled as host code reading device memory, and crash at run time."""
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and not _binds_threads(func):
            raise BuildError(f"kernel {gv.name_hint!r} has no GPU thread binding in a CUDA build "
                             "(scheduled for the CPU?); it would run on the host against device memory")
