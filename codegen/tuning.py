"""``codegen.tune``: MetaSchedule over every task of a built model, records kept in a database
directory that ``codegen.build(..., database=)`` applies.

What makes it usable on a small machine (see DESIGN.md / the cookbook):

* For CPU targets, the non-x86 tensor-intrinsic modules are stubbed before MetaSchedule imports
  them (``import tvm.s_tir.tensor_intrin`` otherwise costs ~30-40 s, mostly CUDA), and candidates
  are built in this process (the default LocalBuilder re-imports them in every worker and times
  out after 30 s).
* Tuning runs in rounds against one JSON database (each measured record is appended to the files
  as it is committed), so a run stopped by Ctrl-C or a crash keeps everything it measured and the
  next run continues from those records; ``time_budget`` stops between rounds. Each round tunes
  one task, chosen by its share of the model's time (``_next_task``); one cost model learns
  across all rounds.
* Measurements go to the local CPU/GPU, or to another machine through a TVM RPC tracker
  (``rpc=("host", port, "device-key")``).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compiler.errors import BuildError, OptionError, last_line
from compiler.graph import Graph

_NON_X86_INTRINSICS = ("cuda", "rocm", "arm_cpu", "hexagon", "riscv_cpu")


def _stub_non_x86_intrinsics() -> None:
    """Keep MetaSchedule from importing GPU/ARM tensor intrinsics (CPU tuning needs none of them)."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return  # already imported for real: nothing to save
    for name in _NON_X86_INTRINSICS:
        sys.modules.setdefault(f"tvm.s_tir.tensor_intrin.{name}", types.ModuleType(name))


@dataclass
class TuneResult:
    """What a tuning run did: tasks, trials measured (this run / in the database), best latencies."""

    database: str
    tasks: list[str]
    trials_run: int                 # records measured by this run
    records_total: int              # records in the database now
    best_us: dict[str, float] = field(default_factory=dict)   # task -> best measured µs
    seconds: float = 0.0
    stopped: str = "trials"     # trials | time_budget | interrupted | no_tunable_task (all failed or hand-written)
    failed: dict[str, str] = field(default_factory=dict)        # task -> why MetaSchedule could not tune it

    @property
    def seconds_per_trial(self) -> float | None:
        return self.seconds / self.trials_run if self.trials_run else None

    def to_dict(self) -> dict[str, Any]:
        return {"database": self.database, "tasks": self.tasks, "trials_run": self.trials_run,
                "records_total": self.records_total, "best_us": self.best_us, "seconds": round(self.seconds, 2),
                "seconds_per_trial": self.seconds_per_trial, "stopped": self.stopped, "failed": self.failed}


def _in_process_builder():
    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    from tvm.support.tar import tar

    @derived_object
    class InProcessBuilder(PyBuilder):
        """Builds candidates in this process: no worker re-importing the tensor intrinsics."""

        def build(self, build_inputs):
            results = []
            for bi in build_inputs:
                try:
                    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(bi.mod)
                    path = os.path.join(tempfile.mkdtemp(prefix="squeezer-tune-"), "cand." + tar.output_format)
                    tvm.compile(mod, target=bi.target).mod.export_library(path, fcompile=tar)
                    results.append(BuilderResult(path, None))
                except Exception as exc:  # noqa: BLE001 - a failed candidate must not stop tuning
                    results.append(BuilderResult(None, f"{type(exc).__name__}: {exc}"))
            return results

    return InProcessBuilder()


def _runner(rpc, target_kind: str):
    from tvm.s_tir import meta_schedule as ms

    # enough repeats that µs-scale kernels are ranked by their latency, not by timer noise
    evaluator = ms.runner.EvaluatorConfig(number=10, repeat=3, min_repeat_ms=5, enable_cpu_cache_flush=False)
    if rpc is None:
        return ms.runner.LocalRunner(evaluator_config=evaluator)
    host, port, key = _parse_rpc(rpc)
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key, session_timeout_sec=120)
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=1)


def _parse_rpc(rpc) -> tuple[str, int, str]:
    if isinstance(rpc, str):
        addr, _, key = rpc.partition("@")
        host, _, port = addr.rpartition(":")
        rpc = (host, port, key)
    try:
        host, port, key = rpc
        port = int(port)
    except (TypeError, ValueError):
        raise OptionError(f"tune: rpc must be (tracker_host, tracker_port, device_key) or 'host:port@key', got {rpc!r}") from None
    if not host or not key:
        raise OptionError(f"tune: rpc needs a tracker host and a device key, got {rpc!r}")
    return host, port, key


def _best(db, tasks) -> dict[str, float]:
    best = {}
    for task in tasks:
        try:
            records = db.get_top_k(db.commit_workload(task.dispatched[0]), 1)
        except Exception:  # noqa: BLE001
            records = []
        if records and records[0].run_secs:
            best[task.task_name] = float(records[0].run_secs[0]) * 1e6
    return best


def _hand_scheduled(task) -> bool:
    """Kernels already scheduled by hand (our bit-serial ones) keep their schedule."""
    func = next(iter(task.dispatched[0].functions.values()))   # the flag sits on the PrimFunc
    return bool(func.attrs and func.attrs.get("tirx.is_scheduled", False))


def _open_tasks(extracted, failed) -> list:
    """The tasks MetaSchedule may still tune: not hand-scheduled, not failed in this run."""
    return [t for t in extracted if t.task_name not in failed and not _hand_scheduled(t)]


def _next_task(extracted, best_us: dict[str, float], rounds_spent: dict[str, int], failed=frozenset()):
    """The task the next round tunes. Each round tunes one task (MetaSchedule's own scheduler
    restarts with every ``tune_tasks`` call and hands out its first rounds in task order, so
    rounds over all tasks tuned only the first two, forever). First every task once, those
    without a measured record first, then by share of the model's time (weight × best record);
    after that the task whose share per round already spent on it is largest. A failure that hits
    every task after a good round (the RPC server gone) marks each failed in turn and ends the
    run with them listed in ``TuneResult.failed``."""
    open_tasks = _open_tasks(extracted, failed)
    if not open_tasks:
        return None

    def share(t) -> float:
        b = best_us.get(t.task_name)
        return float("inf") if b is None else t.weight * b

    fresh = [t for t in open_tasks if not rounds_spent.get(t.task_name)]
    if fresh:
        return max(fresh, key=share)
    # a task still without a valid record after its first round counts as much as the costliest
    # measured one (as infinity it would take every round from then on)
    known = [share(t) for t in open_tasks if t.task_name in best_us]
    costliest = max(known, default=1.0)
    return max(open_tasks, key=lambda t: min(share(t), costliest) / rounds_spent[t.task_name])


def _context(task, seed: int):
    """The TuneContext of ``task``, logging to one plain logger (MetaSchedule's own helper
    configures file loggers per work directory and breaks when a process tunes into a second one)."""
    import logging

    from tvm.s_tir.meta_schedule import TuneContext
    from tvm.s_tir.meta_schedule.utils import fork_seed

    (rand_state,) = fork_seed(seed, n=1)
    return TuneContext(mod=task.dispatched[0], target=task.target, space_generator="post-order-apply",
                       search_strategy="evolutionary", task_name=task.task_name,
                       logger=logging.getLogger("squeezer.tune"), rand_state=rand_state,
                       num_threads="physical").clone()


def _default_schedule(func, target):
    """Our default schedule of one task (the rules ``build`` uses without records), or None."""
    from .relax_pipeline import schedule_rules

    for rule in schedule_rules(target):
        try:
            sch = rule.apply(func, target, False)
        except Exception:  # noqa: BLE001
            sch = None
        if isinstance(sch, list):
            sch = sch[0] if sch else None
        if sch is not None:
            return sch
    return None


def seed_with_default_schedules(db, extracted, target, builder, runner) -> int:
    """Measure our default schedule of every task not in the database yet and commit it as a
    record: ``build(database=)`` then never picks a tuned schedule slower than the default, and the
    evolutionary search starts from it. Returns the number of records added."""
    from tvm.s_tir import meta_schedule as ms

    added = 0
    for task in extracted:
        mod = task.dispatched[0]
        if _hand_scheduled(task):
            continue
        func = next(iter(mod.functions.values()))
        workload = db.commit_workload(mod)
        if db.get_top_k(workload, 1):
            continue
        sch = _default_schedule(func, target)
        if sch is None:
            continue
        args = ms.arg_info.ArgInfo.from_prim_func(func)
        (built,) = builder.build([ms.builder.BuilderInput(sch.mod, target)])
        if built.error_msg:
            continue
        device = "cpu" if target.kind.name == "llvm" else target.kind.name
        (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, device, args)])
        result = future.result()
        if result.error_msg or not result.run_secs:
            continue
        db.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [float(t) for t in result.run_secs],
                                                         target, args))
        added += 1
    return added


def tune(graph: Graph, target: Any = "llvm", *, trials: int = 64, time_budget: float | None = None,
         database: str | os.PathLike = "tuning_db", trials_per_round: int | None = None,
         rpc: Any = None, progress: bool = True, seed: int = 0, default_schedules: bool = True) -> TuneResult:
    """Tune every task of ``graph`` compiled for ``target`` with MetaSchedule.

    ``trials``: measured candidates in this run (across all tasks); ``time_budget``: seconds, checked
    between rounds (a round is cut to what fits at its task's last cost per trial, or the costliest
    task's); ``database``: directory of JSON records (resumed if it exists); ``rpc``:
    ``(tracker_host, tracker_port, device_key)`` to measure on a remote device. Then
    ``codegen.build(graph, target, database=database)`` compiles with the best records.

    ``default_schedules``: seed the database with our default schedule of every task (measured),
    so the search starts from it and no kernel's record measures slower than its default.
    ``False`` tunes from scratch, as stock MetaSchedule does (compare against
    ``build(..., default_schedules=False)``)."""
    if not isinstance(graph, Graph):
        raise BuildError(f"tune() needs a compiler.Graph (from compiler.trace), got {type(graph).__name__}")
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise OptionError(f"tune: trials must be a positive integer, got {trials!r}")
    if not isinstance(default_schedules, bool):
        raise OptionError(f"tune: default_schedules must be True or False, got {default_schedules!r}")
    if time_budget is not None and not (isinstance(time_budget, (int, float)) and time_budget > 0):
        raise OptionError(f"tune: time_budget must be a positive number of seconds, got {time_budget!r}")
    from .target import resolve_target

    tgt = resolve_target(target)
    if tgt.kind.name == "llvm":
        _stub_non_x86_intrinsics()
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from .frontend import import_graph
    from .relax_pipeline import fusion_passes, open_database

    if tgt.kind.name == "llvm":   # candidates must use the same exp/erf lowering that build uses
        from . import fast_math

        fast_math.install()
    db = open_database(database, create=True)
    records_before = len(db.get_all_tuning_records())
    with tgt:
        mod, _, _ = import_graph(graph)
        mod = tvm.transform.Sequential(fusion_passes(tgt))(mod)
    extracted = ms.relax_integration.extract_tasks(mod, tgt)
    if not extracted:
        raise BuildError("tune: the model has no operator to tune")
    work_dir = str(Path(database))
    builder, runner = _in_process_builder(), _runner(rpc, tgt.kind.name)
    try:
        import xgboost  # noqa: F401 - MetaSchedule's default cost model
        cost_model = "xgb"
    except ImportError:
        import warnings

        warnings.warn("xgboost is not installed: tuning with a random cost model (pip install xgboost-cpu)")
        cost_model = "random"
    if default_schedules:
        seed_with_default_schedules(db, extracted, tgt, builder, runner)
    # trials per round (one task each): small budgets spread over the tasks, at most 32 a round
    per_round = trials_per_round or min(32, max(8, -(-trials // len(extracted))))
    start, done, stopped = time.perf_counter(), 0, "trials"
    import logging

    quiet = [logging.getLogger(n) for n in ("tvm.s_tir.meta_schedule", "tvm.meta_schedule")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:   # MetaSchedule's per-round task tables and cost-model logs: progress bar instead
        lg.setLevel(logging.WARNING)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=trials, desc="tuning", unit="trial", file=sys.stderr)
    failed: dict[str, str] = {}
    rounds_spent: dict[str, int] = {}
    round_cost: dict[str, float] = {}   # seconds per trial of each task's last good round
    # one cost model for the whole run, so it keeps learning across rounds (a fresh one per
    # round would start every round from random candidates)
    model = ms.cost_model.CostModel.create(cost_model, num_tuning_cores=ms.utils.cpu_count(logical=False),
                                           tree_method="auto")

    try:
        while done < trials:
            if time_budget is not None and time.perf_counter() - start >= time_budget:
                stopped = "time_budget"
                break
            n = min(per_round, trials - done)
            task = _next_task(extracted, _best(db, extracted), rounds_spent, frozenset(failed))
            if task is None:   # nothing MetaSchedule can tune: the default schedules (already measured) stay
                stopped = "no_tunable_task"
                break
            cost = round_cost.get(task.task_name, max(round_cost.values(), default=None))
            if time_budget is not None and cost:
                # a round of this task's candidates (a task not yet timed: the costliest one's) must
                # fit in what is left of the budget
                fits = int((time_budget - (time.perf_counter() - start)) / cost)
                if fits < min(4, n):   # not even a short round fits
                    stopped = "time_budget"
                    break
                n = min(n, fits)
            ctx = _context(task, seed + done)
            round_start = time.perf_counter()
            rounds_spent[task.task_name] = rounds_spent.get(task.task_name, 0) + 1
            try:
                ms.tune_tasks(tasks=[ctx], task_weights=[task.weight], work_dir=work_dir, max_trials_global=n,
                              num_trials_per_iter=min(n, 16), builder=builder, runner=runner, database=db,
                              cost_model=model)
            except Exception as exc:  # noqa: BLE001 - TVM raises plain RuntimeError/ValueError
                # MetaSchedule stops when a task's candidates crash it (on CUDA: "blockIdx is bound
                # but threadIdx is not" in its feature extraction): that task keeps its (measured)
                # default schedule and the others go on
                failed[task.task_name] = f"{type(exc).__name__}: {_message(exc)}"
                import warnings

                warnings.warn(f"tune: MetaSchedule cannot tune {task.task_name} ({failed[task.task_name]}): "
                              + ("it keeps its default schedule" if default_schedules else "it keeps TVM's stock lowering"))
                if not _open_tasks(extracted, failed) and not round_cost:   # every task failed, none ever ran
                    raise BuildError(f"tune: MetaSchedule failed on every task; the first: "
                                     f"{next(iter(failed.values()))}") from exc
            else:
                round_cost[task.task_name] = (time.perf_counter() - round_start) / n
            done += n
            if bar is not None:
                best = _best(db, extracted)
                bar.update(n)
                if best:
                    bar.set_postfix(best_total_us=f"{sum(best.values()):.1f}")
    except KeyboardInterrupt:
        stopped = "interrupted"   # every committed record is already on disk
    finally:
        if bar is not None:
            bar.close()
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    best = _best(db, extracted)
    total = len(db.get_all_tuning_records())
    return TuneResult(str(database), [t.task_name for t in extracted], total - records_before, total, best,
                      time.perf_counter() - start, stopped, failed)


def _message(exc: BaseException) -> str:
    return last_line(exc)[:300] or type(exc).__name__
