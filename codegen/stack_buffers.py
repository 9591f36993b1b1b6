"""Keep a kernel's small scratch buffers (register-tile accumulators, a padded input row) on the
stack instead of TVM's heap workspace.

TVM 0.27's LowerTVMBuiltin turns every CPU allocation that is not "global"-scoped and under
1 KB into a ``TVMBackendAllocWorkspace``/``FreeWorkspace`` pair. Our schedules keep each register
tile's accumulators in a "local" buffer allocated inside the parallel tile loop, so a conv paid
two runtime calls per register tile: thousands per inference, 4-5 % of mobilenet_v2's samples in
``perf``. Marked ``disable_lower_builtin`` (TVM's own escape hatch), such a buffer stays an
``alloca``, which LLVM places once at the entry of the parallel body and promotes to registers.

Only floating-point buffers: our AMX kernels' tile configuration and int32 tile accumulators
crashed the process as allocas (a jump to address 0 in the AMX binary conv; not investigated), so
integer buffers keep TVM's workspace.

The build compiles with the TIR pipeline registered here ("squeezer"): TVM's default one plus
this pass at its end, before the host finalization that runs LowerTVMBuiltin."""

from __future__ import annotations

import math

import tvm
import tvm_ffi
from tvm import tirx

PIPELINE = "squeezer"
STACK_BYTES_MAX = 16 << 10   # per buffer; larger ones stay on the heap (worker stacks are finite)
DISABLE_LOWER_BUILTIN = "disable_lower_builtin"


def _static_bytes(buf) -> int | None:
    if not all(isinstance(d, tirx.IntImm) for d in buf.shape):
        return None
    dtype = tvm.runtime.DataType(str(buf.dtype))
    return math.prod(int(d) for d in buf.shape) * dtype.bits * dtype.lanes // 8


def _on_stack(node, _mutator):
    buf = node.buffer
    size = _static_bytes(buf)
    if buf.scope() != "local" or size is None or size > STACK_BYTES_MAX or DISABLE_LOWER_BUILTIN in node.annotations \
            or not str(buf.dtype).startswith("float"):
        return node
    return tirx.AllocBuffer(buf, {**node.annotations, DISABLE_LOWER_BUILTIN: tirx.IntImm("int32", 1)}, node.span)


@tirx.transform.prim_func_pass(opt_level=0, name="squeezer.SmallBuffersOnStack")
def small_buffers_on_stack(func: tirx.PrimFunc, _mod, _ctx) -> tirx.PrimFunc:
    """Mark the CPU function's small local allocations to stay allocas."""
    target = func.attrs.get("target") if func.attrs else None
    if target is None or target.kind.name != "llvm":
        return func
    return func.with_body(tvm_ffi.structural_mutate(func.body, [(tirx.AllocBuffer, _on_stack)]))


def _pipeline(**kwargs):
    base, finalize_host, finalize_device = tvm.tirx.get_tir_pipeline("s_tir", **kwargs)
    return tvm.transform.Sequential([base, small_buffers_on_stack]), finalize_host, finalize_device


def register() -> str:
    """The pipeline's name for ``tvm.compile(..., tir_pipeline=...)``; registered once."""
    tvm.tirx.register_tir_pipeline(PIPELINE, _pipeline)
    return PIPELINE
