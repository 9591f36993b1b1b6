"""The Relax compilation pipeline per target: TVM's default passes plus what makes an untuned
build fast — NHWC/HWIO convolutions on CPU, our default schedules (schedules/), and tuning
records if given."""
# (cuda's backend module only lists passes; importing it needs no GPU)

from __future__ import annotations

from collections import Counter

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.relax.backend.cuda import pipeline as cuda_pipeline
from tvm.s_tir import dlight as dl

from compiler.errors import BuildError

from . import fast_math
from .activation_reshapes import activation_passes
from .batchnorm_affine import BatchNormAsScaleShift
from .database import open_database
from .int_epilogue import fold_into_integer_kernels
from .nan_semantics import nan_legalizations
from .norm_numerics import norm_legalizations
from .numpy_folding import numpy_fold_constants
from .options import BuildOptions
from .pad_columns import pad_matmul_columns
from .pool_before_conv import PoolBeforePointwiseConv
from .pool_layout import NHWCMaxPool
from .relax_fixes import layout_friendly_ops
from .schedules import default_rules
from .schedules.cpu import vector_lanes
from .schedules.cuda import check_gpu_kernels
from .transpose_sinking import transpose_sinking_passes
from .winograd import conv2d_legalization

CPU_CONV_LAYOUT = {"relax.nn.conv2d": ["NHWC", "HWIO"]}  # output channels innermost: vectorizable


@tvm.transform.module_pass(opt_level=0, name="FoldConstantOutsideOurKernels")
def _fold_outside_our_kernels(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """FoldConstant, after numpy_folding's exact folds (which spare it most of its kernel builds),
    with our hand-written kernels that call LLVM intrinsics (VNNI, AMX, popcount) out of its sight.
    FoldConstant evaluates a call whose inputs are all constants by building the kernel for a bare
    ``llvm`` target, and LLVM aborted the process on our AVX-512 intrinsics there (an int8 RNN's
    first step, whose state is zeros); such a call now runs at run time."""
    mod = numpy_fold_constants(mod)
    ours = {gv: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
            and "op_pattern" in f.attrs.keys() and int(f.attrs["op_pattern"]) == 8 and "call_llvm" in f.script()}
    if not ours:
        return relax.transform.FoldConstant()(mod)
    rest = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv not in ours}, attrs=mod.attrs)
    folded = relax.transform.FoldConstant()(rest)
    for gv, func in ours.items():
        folded[gv] = func
    return folded


def fold_constants() -> list:
    """FoldConstant, our kernels kept out of it (:func:`_fold_outside_our_kernels`)."""
    return [_fold_outside_our_kernels]


# BatchNorm folded into the preceding conv's weights where the pattern allows, the rest one
# multiply-add per element (batchnorm_affine.py) that fuses into the producer's epilogue instead of a
# separate pass over memory.
INFERENCE_SIMPLIFICATIONS = [relax.transform.FoldBatchnormToConv2D(), BatchNormAsScaleShift(),
                             relax.transform.DecomposeOpsForInference(), *fold_constants()]


def _backend(target: tvm.target.Target):
    kind = target.kind.name
    if kind not in ("llvm", "cuda"):
        raise BuildError(f"no pipeline for target kind {kind!r}")
    return cpu_pipeline if kind == "llvm" else cuda_pipeline


def fusion_passes(target: tvm.target.Target, *, winograd: bool = True) -> list:
    """Everything before scheduling: dispatch, inference simplifications, CPU layout, legalize,
    fuse. What MetaSchedule extracts its tasks from, too. ``winograd`` (CPU): stride-1 3x3 convs
    with constant weights as Winograd transforms + batched GEMM where that is faster (winograd.py);
    off for the stock-lowering baseline (``default_schedules=False``)."""
    cpu = target.kind.name == "llvm"
    # CPU only: on CUDA, dlight schedules convs fused with their BN epilogue badly (benchmarks/README.md)
    layout = [*INFERENCE_SIMPLIFICATIONS, *activation_passes(), layout_friendly_ops, PoolBeforePointwiseConv(),
              relax.transform.ConvertLayout(CPU_CONV_LAYOUT),
              NHWCMaxPool(), *transpose_sinking_passes(), fold_into_integer_kernels,
              *fold_constants(), pad_matmul_columns(vector_lanes(target))] if cpu else []
    conv = conv2d_legalization() if cpu and winograd else {}
    return [*_backend(target).library_dispatch_passes(target), *layout,
            relax.transform.LegalizeOps({**nan_legalizations(), **norm_legalizations(), **conv}), relax.transform.AnnotateTIROpPattern(),
            *fold_constants(), relax.transform.FuseOps(), relax.transform.FuseTIR()]


def pipeline_for(options: BuildOptions) -> tvm.transform.Pass:
    """TVM's default Relax pipeline for the target's backend, with our layout change (CPU),
    tuning records (``options.database``) applied first, and our default schedule rules for the rest.

    ``options.default_schedules=False`` (CPU): operators without a record keep TVM's stock
    lowering, the naive loop nests of an untuned TVM build; what tuning alone finds is measured
    against that. CUDA always gets dlight's rules, which are TVM's stock GPU schedules (a kernel
    without thread bindings cannot run)."""
    target = options.target
    backend = _backend(target)
    db, rules = _scheduling_inputs(options)

    @tvm.transform.module_pass(opt_level=0, name="SqueezerPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            mod = _schedule(mod, options, db, rules)
            return tvm.transform.Sequential([*backend.dataflow_lower_passes(target),
                                             *backend.finalize_passes(target)])(mod)

    return _pipeline


def scheduled_module(mod: tvm.IRModule, options: BuildOptions) -> tvm.IRModule:
    """The Relax module as the pipeline leaves it before lowering: fused, every PrimFunc
    scheduled. What a per-kernel profile times (benchmarks/kernel_profile.py)."""
    db, rules = _scheduling_inputs(options)
    with options.target:
        return _schedule(mod, options, db, rules)


def _scheduling_inputs(options: BuildOptions) -> tuple:
    """The tuning database and the schedule rules a build uses (fast math installed for CPU)."""
    if options.cpu:
        fast_math.install()
    rules = default_rules(options.target) if options.default_schedules or not options.cpu else []
    return open_database(options.database), rules


def _schedule(mod: tvm.IRModule, options: BuildOptions, db, rules: list) -> tvm.IRModule:
    mod = tvm.transform.Sequential(fusion_passes(options.target, winograd=options.default_schedules))(mod)
    if db is not None:
        with db:
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    if options.cpu:
        # after the records, so tuning tasks stay as extracted (MetaSchedule would add its own
        # layout rewrite on top of ours): only our default schedules prepack weights
        mod = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
    if rules:
        mod = dl.ApplyDefaultSchedule(*rules)(mod)
    if options.cpu:  # weights a schedule stored blocked (cpu.prepack_weights): repacked here, once
        mod = tvm.transform.Sequential(fold_constants())(_split_weight_prepacking(mod))
    if options.cuda:
        check_gpu_kernels(mod)
    return mod


def kernel_call_sequence(mod: tvm.IRModule) -> list[str]:
    """The PrimFuncs ``main`` calls, by name, in call order (one entry per call): two builds of one
    graph (dense and pruned) line up call by call."""
    calls: list[str] = []

    @relax.expr_functor.visitor
    class _Calls(relax.expr_functor.PyExprVisitor):
        def visit_call_(self, call) -> None:  # noqa: N802 - TVM's visitor naming
            if getattr(call.op, "name", "") == "relax.call_tir":
                calls.append(call.args[0].name_hint)
            for arg in call.args:
                self.visit_expr(arg)

    _Calls().visit_expr(mod["main"])
    return calls


def kernel_calls(mod: tvm.IRModule) -> Counter:
    """How often ``main`` calls each PrimFunc (by name): what a fusion or layout change saves."""
    return Counter(kernel_call_sequence(mod))


def _unsplittable(f: tvm.tirx.PrimFunc) -> bool:
    """A kernel SplitLayoutRewritePreproc would reject and that repacks nothing: no root block or
    no block under it, or weights marked layout-free (constant) but no repacking block of ours (``cpu.prepack_weights``)."""
    if not isinstance(f.body, tvm.s_tir.SBlockRealize):
        return True
    script = f.script()
    if script.count("T.sblock(") <= 1:   # a hand-written kernel under a bare root block (int_im2col)
        return True
    marked = f.attrs is not None and "layout_free_buffers" in f.attrs
    return marked and "meta_schedule.layout_rewrite_preproc" not in script


def _split_weight_prepacking(mod: tvm.IRModule) -> tvm.IRModule:
    """TVM's SplitLayoutRewritePreproc (each weight-repacking block into a function of its own,
    called on the weight in ``main``), on the kernels that repack a weight: it rejects a func
    without a root block (our hand-written CSR, LUT, bit-serial kernels) and one whose root holds a
    single opaque block (TVM's own cumsum, which Llama's mask needs); those repack nothing and are
    set aside meanwhile."""
    aside = {gv: f for gv, f in mod.functions.items()
             if isinstance(f, tvm.tirx.PrimFunc) and _unsplittable(f)}
    if not aside:
        return relax.transform.SplitLayoutRewritePreproc()(mod)
    rest = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv not in aside}, attrs=mod.attrs)
    out = relax.transform.SplitLayoutRewritePreproc()(rest)
    for gv, f in aside.items():
        out[gv] = f
    return relax.transform.DeadCodeElimination(["main"])(out)   # the kernels the split replaced
