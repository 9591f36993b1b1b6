"""The CUDA C of one hand-written kernel, compiled without a GPU (shared by the CUDA kernel tests)."""

import tvm

from codegen.artifact import cuda_source
from codegen.schedules.cuda import check_gpu_kernels

CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_90", "max_threads_per_block": 1024,
                          "max_shared_memory_per_block": 49152, "thread_warp_size": 32})


def kernel_cuda_source(func) -> str:
    """``func`` (a scheduled PrimFunc) checked for GPU thread bindings and compiled for sm_90."""
    mod = tvm.IRModule({"main": func})
    check_gpu_kernels(mod)
    src = cuda_source(tvm.compile(mod, target=CUDA).mod)
    assert src is not None, "no CUDA module"
    return src
