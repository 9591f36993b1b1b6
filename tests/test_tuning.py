"""codegen.tune: MetaSchedule records in a database directory that build applies; resumable,
interrupt-safe, clear errors on a damaged database; remote measurement through an RPC tracker."""

import json

import numpy as np
import pytest
import torch

import codegen
import compiler
from squeezer import zoo
from squeezer.cli import main
from codegen.database import open_database


@pytest.fixture(scope="module")
def mlp():
    e = zoo.get("mlp")
    x = e.example_inputs(batch=4)
    return compiler.trace(e.build(), x), x


@pytest.mark.slow
def test_tune_then_build_applies_the_records_and_matches_torch(mlp, tmp_path):
    g, x = mlp
    result = codegen.tune(g, trials=16, database=tmp_path / "db", progress=False)
    assert result.tasks and result.trials_run >= 16 and result.records_total == result.trials_run
    # every task has a record: at least our default schedule, measured (so build never regresses)
    assert set(result.best_us) == set(result.tasks) and all(v > 0 for v in result.best_us.values())
    assert result.seconds_per_trial and result.to_dict()["stopped"] == "trials"
    compiled = codegen.build(g, database=tmp_path / "db")
    np.testing.assert_allclose(compiled(*x), g.run_example().numpy(), atol=1e-4)


@pytest.mark.slow
def test_tuning_from_scratch_against_the_stock_build(mlp, tmp_path):
    """default_schedules=False: the stock TVM lowering (no parallel or vector code) as the untuned
    build, and MetaSchedule without our schedules in its database; both still match torch."""
    g, x = mlp
    stock = codegen.build(g, default_schedules=False)
    # our rules parallelize every kernel; the stock lowering parallelizes none (LLVM's own loop
    # vectorizer may still vectorize its naive loops: it does for znver4, not for emeraldrapids)
    assert "TVMBackendParallelLaunch" not in stock.kernel_source()
    assert "TVMBackendParallelLaunch" in codegen.build(g).kernel_source()
    np.testing.assert_allclose(stock(*x), g.run_example().numpy(), atol=1e-4)
    result = codegen.tune(g, trials=8, trials_per_round=8, database=tmp_path, progress=False, default_schedules=False)
    assert result.records_total == result.trials_run == 8   # no seeded default schedules among the records
    tuned = codegen.build(g, database=tmp_path, default_schedules=False)
    np.testing.assert_allclose(tuned(*x), g.run_example().numpy(), atol=1e-4)


@pytest.mark.slow
def test_every_task_gets_tuned_across_rounds(mlp, tmp_path):
    """Rounds of one task each, every task first: MetaSchedule's own scheduler, restarted per
    round, used to spend every round on the first two tasks."""
    import collections

    g, _ = mlp
    first = codegen.tune(g, trials=8, trials_per_round=8, database=tmp_path, progress=False, default_schedules=False)
    n_tasks = len(first.tasks)
    codegen.tune(g, trials=8 * n_tasks, trials_per_round=8, database=tmp_path, progress=False,
                 default_schedules=False)
    per_workload = collections.Counter(json.loads(line)[0]
                                       for line in (tmp_path / "database_tuning_record.json").read_text().splitlines())
    assert len(per_workload) == n_tasks and min(per_workload.values()) >= 8


def test_next_task_goes_by_share_of_the_time_per_round():
    from types import SimpleNamespace

    from codegen.tuning import _next_task

    tasks = [SimpleNamespace(task_name=n, weight=w, dispatched=[SimpleNamespace(functions={"f": SimpleNamespace(attrs=None)})]) for n, w in
             (("a", 1), ("b", 2), ("c", 1))]
    best = {"a": 10.0, "b": 1.0}
    assert _next_task(tasks, best, {}).task_name == "c"                       # no record yet: first
    assert _next_task(tasks, best, {"c": 1}).task_name == "a"                 # then by weight x time
    assert _next_task(tasks, {**best, "c": 3.0}, {"a": 4, "b": 1, "c": 1}).task_name == "c"   # 3/1 > 10/4 > 2/1
    assert _next_task(tasks, best, {"a": 1, "b": 1, "c": 1}, failed={"a", "b", "c"}) is None
    # "c" still has no valid record after its round: it counts as the costliest measured task, not
    # as infinity, so it does not take every round from then on
    assert _next_task(tasks, best, {"a": 1, "b": 1, "c": 5}).task_name == "a"


@pytest.mark.slow
def test_a_second_run_resumes_from_the_records(mlp, tmp_path):
    g, _ = mlp
    first = codegen.tune(g, trials=8, database=tmp_path, progress=False)
    second = codegen.tune(g, trials=8, database=tmp_path, progress=False)
    assert second.records_total == first.records_total + second.trials_run and second.trials_run > 0


@pytest.mark.slow
def test_an_interrupted_run_keeps_what_it_measured(mlp, tmp_path, monkeypatch):
    from tvm.s_tir import meta_schedule as ms

    g, _ = mlp
    real, calls = ms.tune_tasks, []

    def interrupted(**kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(**kw)

    monkeypatch.setattr(ms, "tune_tasks", interrupted)
    result = codegen.tune(g, trials=32, trials_per_round=8, database=tmp_path, progress=False)
    assert result.stopped == "interrupted" and result.records_total >= 8
    assert len(open_database(tmp_path, create=True).get_all_tuning_records()) == result.records_total


@pytest.mark.slow
def test_time_budget_stops_between_rounds(mlp, tmp_path):
    g, _ = mlp
    result = codegen.tune(g, trials=1000, time_budget=0.5, trials_per_round=8, database=tmp_path, progress=False)
    assert result.stopped == "time_budget" and result.trials_run < 1000


@pytest.mark.slow
def test_a_round_is_cut_to_what_fits_in_the_time_budget(mlp, tmp_path, monkeypatch):
    """A virtual clock: each trial costs 0.01 s. Six full rounds of 16 leave 0.065 s of a 1.025 s
    budget; the seventh round is cut to 6 trials instead of running 16 past the budget."""
    from types import SimpleNamespace

    from tvm.s_tir import meta_schedule as ms

    import codegen.tuning as tuning

    g, _ = mlp
    clock, rounds = [0.0], []

    def costs_a_hundredth_per_trial(**kw):
        rounds.append(kw["max_trials_global"])
        clock[0] += 0.01 * kw["max_trials_global"]

    monkeypatch.setattr(ms, "tune_tasks", costs_a_hundredth_per_trial)
    monkeypatch.setattr(tuning, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    result = codegen.tune(g, trials=1000, time_budget=1.025, trials_per_round=16, database=tmp_path, progress=False)
    assert len(result.tasks) < 7 and result.stopped == "time_budget"
    assert rounds == [16] * 6 + [6] and clock[0] <= 1.025


def test_damaged_database_is_a_clear_error_and_a_torn_last_line_is_dropped(tmp_path):
    (tmp_path / "database_workload.json").write_text('["a", 1]\nnot json at all\n["b", 2]\n')
    with pytest.raises(compiler.BuildError, match="corrupt at line 2"):
        open_database(tmp_path, create=True)
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "database_tuning_record.json").write_text('[0, {"trace": ')
    open_database(torn, create=True)      # the interrupted append is dropped (the rest, none here, kept)
    assert (torn / "database_tuning_record.json").read_text() == ""
    (tmp_path / "file").write_text("x")
    with pytest.raises(compiler.BuildError, match="is a file"):
        open_database(tmp_path / "file", create=True)


def test_bad_arguments(mlp, tmp_path):
    g, _ = mlp
    for bad in (dict(trials=0), dict(trials=2.5), dict(time_budget=-1), dict(rpc="nohost"), dict(rpc=("h", "x", "k")),
                dict(default_schedules="no")):
        with pytest.raises(compiler.OptionError):
            codegen.tune(g, database=tmp_path, progress=False, **{"trials": 4, **bad})
    with pytest.raises(compiler.BuildError):
        codegen.tune(object(), database=tmp_path)
    with pytest.raises(compiler.OptionError, match="default_schedules"):
        codegen.build(g, default_schedules=None)


@pytest.mark.slow
def test_cli_tune(tmp_path, capsys):
    db = tmp_path / "db"
    assert main(["tune", "mlp", "--trials", "8", "--database", str(db), "--quiet"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[: out.rindex("}") + 1])
    assert summary["records_total"] >= 8 and (db / "database_tuning_record.json").exists()
    assert main(["tune", "mlp", "--rpc", "127.0.0.1:9190", "--database", str(db)]) == 2


@pytest.mark.slow
def test_remote_measurement_through_an_rpc_tracker_and_two_servers(mlp, tmp_path):
    """A tracker and two servers on loopback, started here; tuning measures through them."""
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    g, _ = mlp
    tracker = Tracker(host="127.0.0.1", port=9190, port_end=9290, silent=True)
    servers = [rpc.Server(host="127.0.0.1", port=9300 + 10 * i, port_end=9400, key="squeezer-test",
                          tracker_addr=("127.0.0.1", tracker.port), silent=True) for i in range(2)]
    try:
        result = codegen.tune(g, trials=8, database=tmp_path, progress=False,
                              rpc=("127.0.0.1", tracker.port, "squeezer-test"))
        assert result.trials_run >= 8 and result.best_us and max(result.best_us.values()) < 1e5  # real runs
    finally:
        for s in servers:
            s.terminate()
        tracker.terminate()


@pytest.mark.slow
def test_a_task_metaschedule_cannot_tune_keeps_its_default_and_the_others_are_tuned(mlp, tmp_path, monkeypatch):
    """On CUDA, MetaSchedule's feature extraction crashes on some tasks' candidates and stops the
    whole round; tuning must isolate the task, keep its default schedule and tune the rest."""
    from tvm.s_tir import meta_schedule as ms

    g, x = mlp
    real, bad = ms.tune_tasks, []

    def crashes_on_one_task(**kw):
        names = [t.task_name for t in kw["tasks"]]
        bad.append(bad[0] if bad else names[0])
        if bad[0] in names:
            raise RuntimeError("parallel_for_dynamic error with Check failed: (false) is false: Unsupported case, "
                               "where blockIdx is bound but threadIdx is not")
        return real(**kw)

    monkeypatch.setattr(ms, "tune_tasks", crashes_on_one_task)
    with pytest.warns(UserWarning, match="cannot tune"):
        result = codegen.tune(g, trials=24, trials_per_round=8, database=tmp_path, progress=False)
    assert list(result.failed) == [bad[0]] and "threadIdx" in result.failed[bad[0]]
    assert result.trials_run > len(result.tasks)          # the other tasks were tuned, beyond the seeds
    assert set(result.best_us) == set(result.tasks)       # the failed one keeps its measured default
    np.testing.assert_allclose(codegen.build(g, database=tmp_path)(*x), g.run_example().numpy(), atol=1e-4)


@pytest.mark.slow
def test_metaschedule_failing_on_every_task_is_a_clear_error(mlp, tmp_path, monkeypatch):
    from tvm.s_tir import meta_schedule as ms

    g, _ = mlp

    def always_fails(**kw):
        raise RuntimeError("builder is broken")

    monkeypatch.setattr(ms, "tune_tasks", always_fails)
    with pytest.warns(UserWarning, match="cannot tune"), \
            pytest.raises(compiler.BuildError, match="failed on every task.*builder is broken"):
        codegen.tune(g, trials=64, trials_per_round=8, database=tmp_path, progress=False)


# ---------------------------------------------------------------- Ctrl-C reaches tune promptly

def test_ctrl_c_is_seen_by_the_watcher_and_a_second_one_ends_the_process(tmp_path):
    """The flag is set by a thread reading signal.set_wakeup_fd's pipe, which Python's C-level
    handler writes the moment the signal arrives (Python's own handler waits for the main thread,
    which MetaSchedule's C++ held for minutes), and, should the pipe be taken away, by Python's
    handler; a second Ctrl-C exits with 130 at once; on exit the previous handler and wakeup fd
    are back."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = textwrap.dedent("""
        import os, signal, sys, time
        from codegen.tuning import _SigintStop

        before = signal.getsignal(signal.SIGINT)
        with _SigintStop() as stop:
            ours = signal.signal(signal.SIGINT, lambda *a: None)   # only the watcher can see it
            os.kill(os.getpid(), signal.SIGINT)
            deadline = time.monotonic() + 10
            while not stop() and time.monotonic() < deadline:
                time.sleep(0.01)
            print("flag", stop())
            signal.signal(signal.SIGINT, ours)
        print("restored", signal.getsignal(signal.SIGINT) is before, signal.set_wakeup_fd(-1) == -1, flush=True)
        with _SigintStop() as stop:   # the pipe taken away: Python's handler still sees it
            saved = signal.set_wakeup_fd(-1)
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                if stop():
                    break
                time.sleep(0.01)
            print("handler", stop(), flush=True)
            signal.set_wakeup_fd(saved)
        with _SigintStop() as stop:
            signal.signal(signal.SIGINT, lambda *a: None)   # only the watcher can end it
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)   # a main thread that never looks
        print("not reached")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert run.returncode == 130, run.stderr[-2000:]
    assert run.stdout.split() == ["flag", "True", "restored", "True", "True", "handler", "True"]
    assert run.stderr.count("tune: interrupted") == 3 and run.stderr.endswith("tune: stopping now\n")


def test_the_runner_and_the_cost_model_stop_between_candidates():
    """MetaSchedule hands a runner 16 candidates at once (the local runner measures them all
    before returning) and scores thousands with the cost model between batches: both now raise
    TuneInterrupted at the next candidate or score once the flag is set."""
    from codegen.tuning_measure import interruptible_runner, stub_non_x86_intrinsics

    stub_non_x86_intrinsics()   # as tune does: MetaSchedule's import skips the GPU intrinsics
    from tvm.s_tir import meta_schedule as ms

    from codegen.tuning import _stoppable

    measured, stop = [], {"now": False}

    class Inner:
        def run(self, inputs):
            measured.extend(inputs)
            stop["now"] = len(measured) == 2   # Ctrl-C while the second candidate is measured
            return []

    runner = interruptible_runner(Inner(), lambda: stop["now"])
    inputs = [ms.runner.RunnerInput(f"/nonexistent/{i}.tar", "cpu", []) for i in range(5)]
    with pytest.raises(Exception, match="tune was interrupted"):
        runner.run(inputs)
    assert len(measured) == 2

    class Model:
        updates = 0

        def update(self, context, candidates, results):
            Model.updates += 1

    stop["now"] = False
    model = _stoppable(Model(), lambda: stop["now"])
    context = ms.TuneContext()
    model.update(context, [], [])
    assert Model.updates == 1
    stop["now"] = True
    with pytest.raises(Exception, match="tune was interrupted"):
        model.update(context, [], [])
    assert Model.updates == 1


def test_candidates_failed_by_ctrl_c_are_not_recorded(mlp, tmp_path, monkeypatch):
    """Ctrl-C reaches the runner's worker too; one caught while it starts (before it ignores
    SIGINT) fails the candidate in hand. Such failures, seen after the stop request, are dropped:
    the database holds only measured records (stock AddToDatabase wrote them as 1e10 s runs)."""
    import os
    import signal

    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner, PyRunnerFuture, RunnerResult

    from codegen import tuning_measure

    real_make_runner = tuning_measure.make_runner

    @derived_object
    class KilledWorker(PyRunnerFuture):
        def done(self):
            return True

        def result(self):
            return RunnerResult(None, "ChildProcessError: Subprocess terminated")

    def runner_killed_in_the_first_round(rpc, kind, should_stop):
        inner, calls = real_make_runner(rpc, kind, should_stop), []

        @derived_object
        class Runner(PyRunner):
            def run(self, inputs):
                calls.append(len(inputs))
                if len(inputs) == 1:   # the default schedules are measured one at a time
                    return inner.run(inputs)
                os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C while the round's batch is measured
                return [KilledWorker() for _ in inputs]

        return Runner()

    monkeypatch.setattr(tuning_measure, "make_runner", runner_killed_in_the_first_round)
    g, _ = mlp
    db = tmp_path / "db"
    result = codegen.tune(g, trials=32, database=db, progress=False)
    assert result.stopped == "interrupted" and result.records_total == len(result.tasks)   # the defaults
    lines = (db / "database_tuning_record.json").read_text().splitlines()
    assert len(lines) == len(result.tasks)
    assert all(max(json.loads(line)[1][1]) < 1.0 for line in lines)
