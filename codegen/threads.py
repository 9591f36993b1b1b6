"""How many threads a compiled CPU module runs on.

TVM's runtime gives each calling thread its own thread pool, sized when that thread first runs
a kernel from ``TVM_NUM_THREADS``, else ``OMP_NUM_THREADS``, else half the logical cores (it
assumes hyper-threading): one thread on a 2-vCPU VM, and a one-thread pool also pins the calling
thread to core 0, so every thread torch creates from it later shares that core. We set the
default to the cores this process may run on (its CPU affinity) before any pool exists; a
user's ``TVM_NUM_THREADS`` (or ``OMP_NUM_THREADS``) wins. A module's ``num_threads`` then uses
fewer of the calling thread's pool (a pool cannot grow once made)."""

from __future__ import annotations

import os
import threading

from compiler.errors import OptionError

ENV = "TVM_NUM_THREADS"

_in_use = threading.local()   # .threads: what this thread's pool was last set to (unset: as made)


def _affinity() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # no sched_getaffinity on this OS
        return list(range(os.cpu_count() or 1))


def available_cores() -> int:
    """The cores this process may run on (``taskset``, cgroups' cpusets), not all of the machine's."""
    return len(_affinity())


def set_default() -> None:
    """Before TVM's pool is made (``import codegen`` does this): one thread per available core. TVM
    pins its threads to cores counted from 0; when this process may use other cores, it must not."""
    cores = _affinity()
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    os.environ.setdefault(ENV, omp if omp.isdigit() and int(omp) > 0 else str(len(cores)))
    if cores != list(range(len(cores))):
        os.environ.setdefault("TVM_BIND_THREADS", "0")


def _max_threads() -> int:
    value = os.environ.get(ENV, "")
    return int(value) if value.strip().isdigit() and int(value) > 0 else available_cores()


def check(num_threads: int | None, where: str, error: type = OptionError) -> int | None:
    """``num_threads`` as given to build/load: None (all the pool's threads) or 1..the pool's size."""
    if num_threads is None:
        return None
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise error(f"{where}: num_threads={num_threads!r} must be a positive integer (or None for "
                    f"all {_max_threads()} available)")
    if num_threads > _max_threads():
        raise error(f"{where}: num_threads={num_threads} is more than the {_max_threads()} threads of "
                    f"TVM's pool ({ENV}={os.environ.get(ENV)}; a pool cannot grow once made)")
    return num_threads


def use_for(target_kind: str, num_threads: int | None) -> None:
    """Before a module's call: its ``num_threads`` (checked) on the calling thread's pool; CPU only."""
    if target_kind == "llvm":
        use(check(num_threads, "CompiledModule"))


def use(num_threads: int | None) -> None:
    """Run the calling thread's next kernels on ``num_threads`` of its pool (None: all of them)."""
    current = getattr(_in_use, "threads", None)
    if num_threads is None and current is None:   # the pool as it was made
        return
    wanted = num_threads or _max_threads()
    if wanted == current:
        return
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(1, wanted)   # 1: TVM's default affinity mode
    _in_use.threads = wanted
