"""The Relax compilation pipeline per target: TVM's default passes plus what makes an untuned
build fast — NHWC/HWIO convolutions on CPU, our CPU schedule rules, and tuning records if given."""

from __future__ import annotations

from pathlib import Path

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.s_tir import dlight as dl

from compiler.errors import BuildError

from .cpu_schedule import default_cpu_rules

CPU_CONV_LAYOUT = {"relax.nn.conv2d": ["NHWC", "HWIO"]}  # output channels innermost: vectorizable


def open_database(database):
    """A MetaSchedule database from a directory path (JSON records) or a Database object."""
    if database is None:
        return None
    from tvm.s_tir import meta_schedule as ms

    if isinstance(database, ms.database.Database):
        return database
    path = Path(database)
    wl, rec = path / "database_workload.json", path / "database_tuning_record.json"
    if not wl.exists() or not rec.exists():
        raise BuildError(f"tuning database {path} has no {wl.name}/{rec.name}; run codegen tuning first")
    try:
        return ms.database.JSONDatabase(path_workload=str(wl), path_tuning_record=str(rec), allow_missing=False)
    except Exception as exc:  # noqa: BLE001
        raise BuildError(f"tuning database {path} is corrupt: {exc}") from exc


def cpu_pipeline_pass(target: tvm.target.Target, database=None) -> tvm.transform.Pass:
    db = open_database(database)

    @tvm.transform.module_pass(opt_level=0, name="SqueezerCPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            passes = [*cpu_pipeline.library_dispatch_passes(target),
                      relax.transform.ConvertLayout(CPU_CONV_LAYOUT),
                      *cpu_pipeline.legalize_passes(target)]
            mod = tvm.transform.Sequential(passes)(mod)
            if db is not None:
                with db:
                    mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
            mod = dl.ApplyDefaultSchedule(*default_cpu_rules())(mod)
            rest = [*cpu_pipeline.dataflow_lower_passes(target), *cpu_pipeline.finalize_passes(target)]
            return tvm.transform.Sequential(rest)(mod)

    return _pipeline


def pipeline_for(target: tvm.target.Target, database=None):
    if target.kind.name == "llvm":
        return cpu_pipeline_pass(target, database)
    if target.kind.name == "cuda":
        db = open_database(database)
        default = relax.get_default_pipeline(target)
        if db is None:
            return default

        @tvm.transform.module_pass(opt_level=0, name="SqueezerCUDAPipeline")
        def _cuda(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
            with target:  # fuse as the default pipeline would, then take tuned schedules first
                mod = tvm.transform.Sequential([
                    relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                    relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
                with db:
                    mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
            return default(mod)  # dlight schedules whatever the database did not cover

        return _cuda
    raise BuildError(f"no pipeline for target kind {target.kind.name!r}")
