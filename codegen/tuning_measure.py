"""What MetaSchedule measures with in ``codegen.tune``: an in-process builder, a local or RPC
runner, and the seeding of the database with our default schedules.

For CPU targets, the non-x86 tensor-intrinsic modules are stubbed before MetaSchedule imports
them (``import tvm.s_tir.tensor_intrin`` otherwise costs ~30-40 s, mostly CUDA), and candidates
are built in this process (the default LocalBuilder re-imports them in every worker and times out
after 30 s)."""

from __future__ import annotations

import errno
import functools
import os
import signal
import socket
import sys
import tempfile
import time
import types
from typing import Callable

from compiler.errors import BuildError, OptionError

from . import stack_buffers
from .schedules import default_rules

_NON_X86_INTRINSICS = ("cuda", "rocm", "arm_cpu", "hexagon", "riscv_cpu")
TRACKER_TIMEOUT_S = 10.0   # how long tune waits for an RPC tracker before giving up

# Runner workers share the terminal's process group, so Ctrl-C reaches them too: they ignore it and
# finish the measurement in hand (tune stops between candidates), instead of dying and leaving
# the candidate recorded as a failure
_IGNORE_SIGINT = functools.partial(signal.signal, signal.SIGINT, signal.SIG_IGN)


class TuneInterrupted(Exception):
    """Raised by the builder when tune was asked to stop (Ctrl-C): an ordinary exception, which
    TVM's FFI carries out of MetaSchedule's C++ frames, where a KeyboardInterrupt raised by Python's
    default handler at any bytecode crashed the process."""


def stop_if_asked(should_stop: Callable[[], bool]) -> None:
    """The check the builder, the runner, the cost model and the loop make: TuneInterrupted once
    Ctrl-C asked ``tune`` to stop."""
    if should_stop():
        raise TuneInterrupted("tune was interrupted")


def stub_non_x86_intrinsics() -> None:
    """Keep MetaSchedule from importing GPU/ARM tensor intrinsics (CPU tuning needs none of them)."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return  # already imported for real: nothing to save
    for name in _NON_X86_INTRINSICS:
        sys.modules.setdefault(f"tvm.s_tir.tensor_intrin.{name}", types.ModuleType(name))


def in_process_builder(should_stop: Callable[[], bool] = lambda: False):
    """The builder of candidates; raises TuneInterrupted before a candidate once ``should_stop()``."""
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
                stop_if_asked(should_stop)
                try:
                    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(bi.mod)
                    path = os.path.join(tempfile.mkdtemp(prefix="squeezer-tune-"), "cand." + tar.output_format)
                    tvm.compile(mod, target=bi.target, tir_pipeline=stack_buffers.register()).mod.export_library(
                        path, fcompile=tar)
                    results.append(BuilderResult(path, None))
                except Exception as exc:  # noqa: BLE001 - a failed candidate must not stop tuning
                    results.append(BuilderResult(None, f"{type(exc).__name__}: {exc}"))
            return results

    return InProcessBuilder()


def make_runner(rpc, target_kind: str, should_stop: Callable[[], bool] = lambda: False):
    """The local (or RPC) runner, wrapped so that a stop request is seen between candidates."""
    from tvm.s_tir import meta_schedule as ms

    # enough repeats that µs-scale kernels are ranked by their latency, not by timer noise
    evaluator = ms.runner.EvaluatorConfig(number=10, repeat=3, min_repeat_ms=5, enable_cpu_cache_flush=False)
    if rpc is None:
        runner = ms.runner.LocalRunner(evaluator_config=evaluator, initializer=_IGNORE_SIGINT)
    else:
        host, port, key = parse_rpc(rpc)
        config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key, session_timeout_sec=120)
        runner = ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=1,
                                     initializer=_IGNORE_SIGINT)
    return interruptible_runner(runner, should_stop)


def interruptible_runner(runner, should_stop: Callable[[], bool]):
    """``runner``, handed the batch one candidate at a time; raises TuneInterrupted before the next
    candidate once ``should_stop()``. MetaSchedule gives a runner a whole batch (16 candidates),
    which the local runner measures before it returns: on a busy machine that took minutes after
    Ctrl-C (CI's test of it timed out). The candidates of the interrupted batch are dropped, not
    recorded as failures."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner

    @derived_object
    class InterruptibleRunner(PyRunner):
        """Measures with ``runner``; checks ``should_stop`` between candidates."""

        def run(self, runner_inputs):
            futures = []
            for runner_input in runner_inputs:
                stop_if_asked(should_stop)
                futures.extend(runner.run([runner_input]))
            return futures

    return InterruptibleRunner()


def measure_callbacks(should_stop: Callable[[], bool]) -> list:
    """MetaSchedule's default callbacks, with the database's one deaf to failures once
    ``should_stop()``: Ctrl-C reaches the whole process group, and a runner worker it caught while
    starting (before its initializer ignores SIGINT) fails the candidate in hand, which
    AddToDatabase would record as a 1e10 s run. After a stop request a failed candidate is dropped,
    not recorded; before it, failures are recorded as stock MetaSchedule does."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import AddToDatabase, MeasureCallback, PyMeasureCallback

    stock = AddToDatabase()

    @derived_object
    class AddMeasuredToDatabase(PyMeasureCallback):
        """AddToDatabase of what was measured; failures after a stop request are left out."""

        def apply(self, task_scheduler, task_id, candidates, builds, runs) -> None:
            if should_stop():
                kept = [i for i, r in enumerate(runs) if r.error_msg is None and r.run_secs]
                candidates, builds, runs = ([xs[i] for i in kept] for xs in (candidates, builds, runs))
            if candidates:
                stock.apply(task_scheduler, task_id, candidates, builds, runs)

    return [AddMeasuredToDatabase() if isinstance(c, AddToDatabase) else c for c in MeasureCallback.create("default")]


def check_tracker(rpc, timeout: float | None = None) -> None:
    """Fail in ``timeout`` seconds (default ``TRACKER_TIMEOUT_S``), naming host:port, unless an RPC
    tracker answers there and has a server with the device key: MetaSchedule's runner would retry
    the connection for a minute per candidate, or wait in the tracker's queue for a key no server
    has, without end. A refused connection and a missing key are asked again until then (a
    tracker or its servers may be starting)."""
    host, port, key = parse_rpc(rpc)
    timeout = TRACKER_TIMEOUT_S if timeout is None else timeout
    where = f"the RPC tracker at {host}:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic())) as sock:
                keys = _tracker_keys(sock, max(0.1, deadline - time.monotonic()))
        except OSError as exc:
            if exc.errno == errno.ECONNREFUSED and time.monotonic() + 0.5 < deadline:
                time.sleep(0.5)
                continue
            what = "no answer from" if isinstance(exc, TimeoutError) or exc.errno is None else "cannot reach"
            raise BuildError(f"tune: {what} {where} within {timeout:g} s "
                             f"({exc.strerror or str(exc) or type(exc).__name__})") from None
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise BuildError(f"tune: {where} did not answer as a TVM RPC tracker ({type(exc).__name__}: {exc})") from None
        if key in keys:
            return
        if time.monotonic() + 0.5 >= deadline:
            raise BuildError(f"tune: {where} has no RPC server with device key {key!r} "
                             f"(registered: {', '.join(sorted(keys)) or 'none'})")
        time.sleep(0.5)


def _tracker_keys(sock: socket.socket, timeout: float) -> set[str]:
    """The device keys registered at the tracker on ``sock``: its handshake, then a summary."""
    import struct

    from tvm.rpc import base

    sock.settimeout(timeout)
    sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
    if struct.unpack("<i", base.recvall(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
        raise ValueError("wrong handshake")
    base.sendjson(sock, [base.TrackerCode.SUMMARY])
    code, summary = base.recvjson(sock)
    if code != base.TrackerCode.SUCCESS:
        raise ValueError(f"summary refused ({code})")
    servers = {s["key"].partition(":")[2] for s in summary["server_info"] if s.get("key", "").startswith("server:")}
    return servers | {k for k, q in summary["queue_info"].items() if q.get("free")}


def parse_rpc(rpc) -> tuple[str, int, str]:
    """``(host, port, key)`` from a tuple or ``'host:port@key'``; an OptionError otherwise."""
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


def hand_scheduled(task) -> bool:
    """Kernels already scheduled by hand (our bit-serial ones) keep their schedule."""
    func = next(iter(task.dispatched[0].functions.values()))   # the flag sits on the PrimFunc
    return bool(func.attrs and func.attrs.get("tirx.is_scheduled", False))


def _default_schedule(func, target):
    """Our default schedule of one task (the rules ``build`` uses without records), or None."""
    for rule in default_rules(target):
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
        if hand_scheduled(task):
            continue
        func = next(iter(mod.functions.values()))
        workload = db.commit_workload(mod)
        if db.get_top_k(workload, 1):
            continue
        sch = _default_schedule(func, target)
        if sch is None:
            continue
        # the arguments of the kernel as built: a weight the schedule stores blocked arrives prepacked
        args = ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)
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

