"""``codegen.tune``: MetaSchedule over every task of a built model, records kept in a database
directory that ``codegen.build(..., database=)`` applies.

* Tuning runs in rounds against one JSON database (each measured record is appended to the files
  as it is committed), so a run stopped by Ctrl-C or a crash keeps everything it measured and the
  next run continues from those records; ``time_budget`` stops between rounds. Each round tunes
  one task, chosen by its share of the model's time (``_next_task``); one cost model learns
  across all rounds.
* The run holds the database directory (database.lock_database): a second tuner on it fails at
  once. Ctrl-C only sets a flag (``_SigintStop``), checked before each candidate is built, before
  each is measured and between rounds; the run then ends with ``stopped="interrupted"``.
* Candidates are built in this process and measured on the local CPU/GPU, or on another machine
  through a TVM RPC tracker (``rpc=("host", port, "device-key")``): tuning_measure.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compiler.errors import BuildError, OptionError, last_line
from compiler.graph import Graph

from .options import BuildOptions
from .tuning_measure import TuneInterrupted, hand_scheduled, stop_if_asked


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


def _open_tasks(extracted, failed) -> list:
    """The tasks MetaSchedule may still tune: not hand-scheduled, not failed in this run."""
    return [t for t in extracted if t.task_name not in failed and not hand_scheduled(t)]


def _next_task(extracted, best_us: dict[str, float], rounds_spent: dict[str, int], failed=frozenset()):
    """The task the next round tunes (each round tunes one task: see benchmarks/README.md,
    "Measurement notes moved from the code"). First every task once, those without a measured
    record first, then by share of the model's time (weight × best record);
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
    from tvm.s_tir.meta_schedule import TuneContext
    from tvm.s_tir.meta_schedule.utils import fork_seed

    (rand_state,) = fork_seed(seed, n=1)
    return TuneContext(mod=task.dispatched[0], target=task.target, space_generator="post-order-apply",
                       search_strategy="evolutionary", task_name=task.task_name,
                       logger=logging.getLogger("squeezer.tune"), rand_state=rand_state,
                       num_threads="physical").clone()


def _message(exc: BaseException) -> str:
    return last_line(exc)[:300] or type(exc).__name__



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
    _check_budget(trials, time_budget)
    options = BuildOptions.create(target, default_schedules=default_schedules)
    from . import tuning_measure as measure
    from .database import lock_database, open_database

    if rpc is not None:
        measure.check_tracker(rpc)   # a bounded wait, not MetaSchedule's retries per candidate
        rpc = measure.parse_rpc(rpc)
    if options.cpu:   # before anything imports MetaSchedule
        measure.stub_non_x86_intrinsics()
    with lock_database(database), _SigintStop() as stop:
        run = _Rounds(stop, trials, time_budget, default_schedules)
        run.db = open_database(database, create=True)   # repaired under the lock, before any append
        run.records_before = len(run.db.get_all_tuning_records())
        try:
            _start(run, graph, options, rpc, trials_per_round)
            run.start = time.perf_counter()   # the budget and the timing count the rounds, as before
            with _quiet_metaschedule_logs(), _progress_bar(progress, trials) as bar:
                run.run(str(Path(database)), seed, bar)
        except (TuneInterrupted, KeyboardInterrupt):
            run.stopped = "interrupted"   # every committed record is already on disk
        except Exception:
            if not stop():
                raise
            run.stopped = "interrupted"   # what Ctrl-C broke (a runner worker) is no task failure
        return run.result(str(database))


def _start(run: "_Rounds", graph: Graph, options: BuildOptions, rpc, trials_per_round) -> None:
    """Extract the tasks, make the builder and runner, seed the default schedules."""
    from . import tuning_measure as measure

    run.extracted = _extract_tasks(graph, options)
    # trials per round (one task each): small budgets spread over the tasks, at most 32 a round
    run.per_round = trials_per_round or min(32, max(8, -(-run.trials // len(run.extracted))))
    run.builder = measure.in_process_builder(run.stop)
    run.runner = measure.make_runner(rpc, options.target.kind.name, run.stop)
    run.callbacks = measure.measure_callbacks(run.stop)
    stop_if_asked(run.stop)
    if run.default_schedules:
        measure.seed_with_default_schedules(run.db, run.extracted, options.target, run.builder, run.runner)


class _SigintStop:
    """Ctrl-C during ``tune`` sets a flag instead of raising KeyboardInterrupt. Python's default
    handler raises it at whatever bytecode runs next, often a callback inside MetaSchedule's C++
    frames, which crashed the process or was taken for a task failure. The builder, the runner and
    the cost model check the flag before each candidate or batch of scores, the loop between
    rounds; the old handler is restored afterwards.

    The signal is taken two ways, each counting it once: from a wakeup pipe
    (``signal.set_wakeup_fd``), which Python's C-level handler writes the moment the signal
    arrives, by a watcher thread blocked on it; and by the Python-level handler, which runs only
    when the main thread next looks (inside MetaSchedule's C++ that once took minutes: CI's test
    of Ctrl-C timed out). Either sets the flag; a Ctrl-C that either path sees twice ends the
    process at once with exit code 130 (a killed run loses at most the record being written,
    which the next run's repair drops). Only the main thread can install handlers: elsewhere
    Ctrl-C raises KeyboardInterrupt as before, which ``tune`` also ends as ``interrupted``."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._previous_wakeup = -1
        self._pipe: tuple[int, int] | None = None
        self._watcher: threading.Thread | None = None
        self._seen = {"pipe": 0, "handler": 0}
        self._lock = threading.RLock()   # re-entrant: a handler may run inside the handler

    def __call__(self) -> bool:
        return self.requested

    def __enter__(self) -> "_SigintStop":
        if threading.current_thread() is threading.main_thread():
            self._pipe = os.pipe()
            os.set_blocking(self._pipe[1], False)   # the C handler must never block on it
            self._watcher = threading.Thread(target=self._watch, args=(self._pipe[0],), daemon=True,
                                             name="squeezer-tune-sigint")
            self._watcher.start()
            try:
                # the handler first: a Ctrl-C between the two is seen by it (the other order left
                # Python's pending default handler to raise KeyboardInterrupt in here)
                self._previous = signal.signal(signal.SIGINT, self._handle)
                self._previous_wakeup = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
            except BaseException:   # a KeyboardInterrupt before our handler was in: leave nothing behind
                if self._previous is not None:
                    signal.signal(signal.SIGINT, self._previous)
                self._close_pipe()
                raise
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._previous_wakeup)   # the reverse order: the handler sees the last
        signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
        self._close_pipe()

    def _close_pipe(self) -> None:
        os.close(self._pipe[1])   # the watcher reads the end of the pipe and returns
        self._watcher.join(timeout=5)
        os.close(self._pipe[0])
        self._pipe = None

    def _handle(self, signum, frame) -> None:
        self._arrived("handler")

    def _arrived(self, path: str) -> None:
        with self._lock:
            self._seen[path] += 1
            if self._seen[path] >= 2:
                os.write(2, b"tune: stopping now\n")
                os._exit(130)
            if not self.requested:
                self.requested = True
                # os.write, not print: the main thread may be in the middle of a print to stderr
                os.write(2, b"\ntune: interrupted; stopping after the current candidate, keeping what was "
                            b"measured (Ctrl-C again stops at once)\n")

    def _watch(self, read_fd: int) -> None:
        while True:
            try:
                arrived = os.read(read_fd, 64)
            except OSError:
                return
            if not arrived:
                return
            for _ in range(arrived.count(bytes([signal.SIGINT]))):
                self._arrived("pipe")


def _check_budget(trials, time_budget) -> None:
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise OptionError(f"tune: trials must be a positive integer, got {trials!r}")
    if time_budget is not None and not (isinstance(time_budget, (int, float)) and time_budget > 0):
        raise OptionError(f"tune: time_budget must be a positive number of seconds, got {time_budget!r}")


def _extract_tasks(graph: Graph, options: BuildOptions) -> list:
    """MetaSchedule's tasks of the model as ``build`` would compile it (same fusion, same exp/erf)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from .frontend import import_graph
    from .relax_pipeline import fusion_passes

    if options.cpu:   # candidates must use the same exp/erf lowering that build uses
        from . import fast_math

        fast_math.install()
    mod, _, _ = import_graph(graph, options)
    with options.target:
        mod = tvm.transform.Sequential(fusion_passes(options.target, winograd=options.default_schedules))(mod)
    extracted = ms.relax_integration.extract_tasks(mod, options.target)
    if not extracted:
        raise BuildError("tune: the model has no operator to tune")
    return extracted


@contextlib.contextmanager
def _quiet_metaschedule_logs():
    """MetaSchedule's per-round task tables and cost-model logs: the progress bar instead."""
    quiet = [logging.getLogger(n) for n in ("tvm.s_tir.meta_schedule", "tvm.meta_schedule")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _progress_bar(progress: bool, trials: int):
    if not progress:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=trials, desc="tuning", unit="trial", file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()


def _cost_model():
    """One cost model for the whole run, so it keeps learning across rounds (a fresh one per round
    would start every round from random candidates)."""
    from tvm.s_tir import meta_schedule as ms

    try:
        import xgboost  # noqa: F401 - MetaSchedule's default cost model
        kind = "xgb"
    except ImportError:
        warnings.warn("xgboost is not installed: tuning with a random cost model (pip install xgboost-cpu)")
        kind = "random"
    return ms.cost_model.CostModel.create(kind, num_tuning_cores=ms.utils.cpu_count(logical=False),
                                          tree_method="auto")


def _stoppable(model, should_stop):
    """``model``, raising TuneInterrupted from ``predict``/``update`` once ``should_stop()``: the
    evolutionary search between two batches asks it for scores many times and took up to ~20 s
    on a busy machine, all of it deaf to Ctrl-C otherwise."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.cost_model import PyCostModel

    @derived_object
    class StoppableCostModel(PyCostModel):
        """Delegates to ``model``; checks the stop flag first."""

        def load(self, path: str) -> None:
            model.load(path)

        def save(self, path: str) -> None:
            model.save(path)

        def update(self, context, candidates, results) -> None:
            stop_if_asked(should_stop)
            model.update(context, candidates, results)

        def predict(self, context, candidates):
            stop_if_asked(should_stop)
            return model.predict(context, candidates)

    return StoppableCostModel()


class _Rounds:
    """The tuning loop's state: trials done, rounds and seconds per trial per task, failures."""

    def __init__(self, stop: _SigintStop, trials: int, time_budget, default_schedules: bool) -> None:
        self.stop, self.trials, self.time_budget, self.default_schedules = stop, trials, time_budget, default_schedules
        self.db: Any = None
        self.extracted: list = []
        self.builder = self.runner = None
        self.callbacks: list = []
        self.per_round, self.records_before = 0, 0
        self.start, self.done, self.stopped = time.perf_counter(), 0, "trials"
        self.failed: dict[str, str] = {}
        self.rounds_spent: dict[str, int] = {}
        self.round_cost: dict[str, float] = {}   # seconds per trial of each task's last good round

    def run(self, work_dir: str, seed: int, bar) -> None:
        model = _stoppable(_cost_model(), self.stop)
        while self.done < self.trials and not self.stop():
            planned = self._plan()
            if planned is None:
                break
            task, n = planned
            self._round(task, n, work_dir, model, seed + self.done)
            self.done += n
            if bar is not None:
                best = _best(self.db, self.extracted)
                bar.update(n)
                if best:
                    bar.set_postfix(best_total_us=f"{sum(best.values()):.1f}")
        if self.stop():
            self.stopped = "interrupted"

    def result(self, database: str) -> TuneResult:
        total = len(self.db.get_all_tuning_records())
        return TuneResult(database, [t.task_name for t in self.extracted], total - self.records_before, total,
                          _best(self.db, self.extracted), time.perf_counter() - self.start, self.stopped,
                          self.failed)

    def _plan(self):
        """(task, trials) of the next round, or None with ``stopped`` saying why."""
        if self.time_budget is not None and time.perf_counter() - self.start >= self.time_budget:
            self.stopped = "time_budget"
            return None
        n = min(self.per_round, self.trials - self.done)
        task = _next_task(self.extracted, _best(self.db, self.extracted), self.rounds_spent, frozenset(self.failed))
        if task is None:   # nothing MetaSchedule can tune: the default schedules (already measured) stay
            self.stopped = "no_tunable_task"
            return None
        cost = self.round_cost.get(task.task_name, max(self.round_cost.values(), default=None))
        if self.time_budget is not None and cost:
            # a round of this task's candidates (a task not yet timed: the costliest one's) must
            # fit in what is left of the budget
            fits = int((self.time_budget - (time.perf_counter() - self.start)) / cost)
            if fits < min(4, n):   # not even a short round fits
                self.stopped = "time_budget"
                return None
            n = min(n, fits)
        return task, n

    def _round(self, task, n: int, work_dir: str, model, seed: int) -> None:
        from tvm.s_tir import meta_schedule as ms

        ctx = _context(task, seed)
        round_start = time.perf_counter()
        self.rounds_spent[task.task_name] = self.rounds_spent.get(task.task_name, 0) + 1
        try:
            ms.tune_tasks(tasks=[ctx], task_weights=[task.weight], work_dir=work_dir, max_trials_global=n,
                          num_trials_per_iter=min(n, 16), builder=self.builder, runner=self.runner,
                          database=self.db, cost_model=model, measure_callbacks=self.callbacks)
        except Exception as exc:  # noqa: BLE001 - TVM raises plain RuntimeError/ValueError
            if self.stop():   # the builder's TuneInterrupted, as TVM's FFI hands it back
                raise TuneInterrupted("tune was interrupted") from None
            # MetaSchedule stops when a task's candidates crash it (on CUDA: "blockIdx is bound
            # but threadIdx is not" in its feature extraction): that task keeps its (measured)
            # default schedule and the others go on
            self.failed[task.task_name] = f"{type(exc).__name__}: {_message(exc)}"
            warnings.warn(f"tune: MetaSchedule cannot tune {task.task_name} ({self.failed[task.task_name]}): "
                          + ("it keeps its default schedule" if self.default_schedules
                             else "it keeps TVM's stock lowering"))
            if not _open_tasks(self.extracted, self.failed) and not self.round_cost:   # every task failed
                raise BuildError(f"tune: MetaSchedule failed on every task; the first: "
                                 f"{next(iter(self.failed.values()))}") from exc
        else:
            self.round_cost[task.task_name] = (time.perf_counter() - round_start) / n
