"""The Relax compilation pipeline per target: TVM's default passes plus what makes an untuned
build fast — NHWC/HWIO convolutions on CPU, our CPU schedule rules, and tuning records if given."""
# (cuda's backend module only lists passes; importing it needs no GPU)

from __future__ import annotations

import json
from pathlib import Path

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.relax.backend.cuda import pipeline as cuda_pipeline
from tvm.s_tir import dlight as dl

from compiler.errors import BuildError

from . import fast_math
from .cpu_schedule import SafeRule, default_cpu_rules, vector_lanes
from .pad_columns import pad_matmul_columns

CPU_CONV_LAYOUT = {"relax.nn.conv2d": ["NHWC", "HWIO"]}  # output channels innermost: vectorizable


def open_database(database, *, create: bool = False):
    """A MetaSchedule database from a directory path (JSON records) or a Database object.

    ``create`` (tuning, the writer): make the directory if missing and drop a torn last line left by
    a run killed mid-append. Otherwise (build, a reader) the files must exist and be whole. Any
    other damage is a BuildError naming the file and line."""
    if database is None:
        return None
    from tvm.s_tir import meta_schedule as ms

    if isinstance(database, ms.database.Database):
        return database
    path = Path(database)
    if path.exists() and not path.is_dir():
        raise BuildError(f"tuning database {path} is a file; give a directory")
    wl, rec = path / "database_workload.json", path / "database_tuning_record.json"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    elif not wl.exists() or not rec.exists():
        raise BuildError(f"tuning database {path} has no {wl.name}/{rec.name}; run codegen tuning first")
    for f in (wl, rec):
        if f.exists():
            _check_json_lines(f, repair_torn_tail=create)
    try:
        return ms.database.JSONDatabase(path_workload=str(wl), path_tuning_record=str(rec), allow_missing=create)
    except Exception as exc:  # noqa: BLE001
        raise BuildError(f"tuning database {path} is corrupt or unreadable ({type(exc).__name__}: {exc}); "
                         "move it aside to start over") from exc


def _check_json_lines(f: Path, *, repair_torn_tail: bool) -> None:
    """Each line of a MetaSchedule JSON database is one JSON value. A truncated last line (a run
    killed mid-write) is dropped when ``repair_torn_tail``; other damage is reported by line."""
    lines = f.read_text().splitlines()
    good = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            json.loads(line)
            good.append(line)
        except json.JSONDecodeError as exc:
            if repair_torn_tail and i == len(lines):  # interrupted while appending: keep what was complete
                f.write_text("\n".join(good) + ("\n" if good else ""))
                return
            raise BuildError(f"tuning database file {f} is corrupt at line {i}: {exc.msg}; "
                             "move the directory aside to start over") from None


# BatchNorm folded into the preceding conv's weights where the pattern allows, the rest decomposed
# into elementwise ops that fuse into the producer's epilogue instead of a separate pass over memory.
INFERENCE_SIMPLIFICATIONS = [relax.transform.FoldBatchnormToConv2D(), relax.transform.DecomposeOpsForInference(),
                             relax.transform.FoldConstant()]


def schedule_rules(target: tvm.target.Target) -> list:
    """Default schedules: ours on CPU; dlight's on CUDA, each guarded so a rule that crashes on one
    function (dlight's Matmul does on some fused epilogues) hands it to the next rule."""
    if target.kind.name == "llvm":
        return default_cpu_rules()
    return [SafeRule(dl.gpu.Matmul()), SafeRule(dl.gpu.GEMV()), SafeRule(dl.gpu.Reduction()),
            SafeRule(dl.gpu.GeneralReduction()), dl.gpu.Fallback()]


def _backend(target: tvm.target.Target):
    kind = target.kind.name
    if kind not in ("llvm", "cuda"):
        raise BuildError(f"no pipeline for target kind {kind!r}")
    return cpu_pipeline if kind == "llvm" else cuda_pipeline


def fusion_passes(target: tvm.target.Target) -> list:
    """Everything before scheduling: dispatch, inference simplifications, CPU layout, legalize,
    fuse. What MetaSchedule extracts its tasks from, too."""
    # CPU only: on CUDA, dlight schedules a depthwise conv fused with its BN epilogue ~9x slower
    # than the two apart (measured on an H200, benchmarks/results/gpu_check.md)
    cpu = [*INFERENCE_SIMPLIFICATIONS, relax.transform.ConvertLayout(CPU_CONV_LAYOUT), relax.transform.FoldConstant(),
           pad_matmul_columns(vector_lanes(target))] if target.kind.name == "llvm" else []
    return [*_backend(target).library_dispatch_passes(target), *cpu,
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]


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


def pipeline_for(target: tvm.target.Target, database=None, *, default_schedules: bool = True) -> tvm.transform.Pass:
    """TVM's default Relax pipeline for the target's backend, with our layout change (CPU),
    tuning records applied first, and our default schedule rules for the rest.

    ``default_schedules=False`` (CPU): operators without a record keep TVM's stock lowering, the
    naive loop nests of an untuned TVM build; what tuning alone finds is measured against that.
    CUDA always gets dlight's rules, which are TVM's stock GPU schedules (a kernel without thread
    bindings cannot run)."""
    rules = schedule_rules(target) if default_schedules or target.kind.name != "llvm" else []
    backend = _backend(target)
    db = open_database(database)
    if target.kind.name == "llvm":
        fast_math.install()

    @tvm.transform.module_pass(opt_level=0, name="SqueezerPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            mod = tvm.transform.Sequential(fusion_passes(target))(mod)
            if db is not None:
                with db:
                    mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
            if rules:
                mod = dl.ApplyDefaultSchedule(*rules)(mod)
            if target.kind.name == "cuda":
                check_gpu_kernels(mod)
            return tvm.transform.Sequential([*backend.dataflow_lower_passes(target),
                                             *backend.finalize_passes(target)])(mod)

    return _pipeline
