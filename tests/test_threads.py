"""Compiled CPU modules use the cores this process may run on, out of the box; ``num_threads``
changes it. TVM sizes a pool once per calling thread, so each case runs in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import codegen
import compiler
from compiler.errors import BuildOptionError, OptionError

ROOT = Path(__file__).resolve().parents[1]


def _fresh(script: str, env: dict | None = None) -> dict:
    """Run ``script`` (which prints one JSON line last) in a new process without TVM_NUM_THREADS."""
    base = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                         timeout=300, cwd=str(ROOT), env={**base, **(env or {})})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


BUILD_AND_CALL = """
    import json, os, sys
    {restrict}
    import numpy as np, torch, tvm
    import codegen, compiler
    torch.manual_seed(0)
    x = torch.randn(64, 256)
    g = compiler.trace(torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU()), (x,))
    m = codegen.build(g, "llvm")
    y = m(x)
    pool = tvm.get_global_func("runtime.NumThreads")()
    print(json.dumps({{"pool": pool, "cores": len(os.sched_getaffinity(0)), "err": float(np.abs(y - g.module(x).detach().numpy()).max())}}))
"""


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs sched_getaffinity (Linux)")
def test_a_module_uses_every_core_the_process_may_run_on():
    """TVM alone takes half the logical cores (one on a 2-vCPU VM) and then pins the caller to
    core 0; the default is now the process's CPU affinity, and the caller stays unpinned."""
    got = _fresh(BUILD_AND_CALL.format(restrict=""))
    assert got["pool"] == len(os.sched_getaffinity(0)) and got["cores"] == len(os.sched_getaffinity(0))
    assert got["err"] < 1e-4


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs sched_getaffinity (Linux)")
def test_the_default_follows_a_restricted_affinity_and_the_users_env_wins():
    one = next(iter(os.sched_getaffinity(0)))
    restricted = _fresh(BUILD_AND_CALL.format(restrict=f"os.sched_setaffinity(0, {{{one}}})"))
    assert restricted["pool"] == 1 and restricted["err"] < 1e-4
    if len(os.sched_getaffinity(0)) > 1:   # the user's own setting, below the default
        assert _fresh(BUILD_AND_CALL.format(restrict=""), env={"TVM_NUM_THREADS": "1"})["pool"] == 1


def test_num_threads_uses_fewer_of_the_pools_threads_and_the_same_numbers():
    got = _fresh("""
        import json
        import numpy as np, torch, tvm
        import codegen, compiler
        torch.manual_seed(0)
        x = torch.randn(64, 256)
        g = compiler.trace(torch.nn.Linear(256, 512), (x,))
        every = codegen.build(g, "llvm")
        one = codegen.build(g, "llvm", num_threads=1)
        threads = tvm.get_global_func("runtime.NumThreads")
        a = every(x); n_every = threads()
        b = one(x); n_one = threads()
        every(x); n_back = threads()
        one.benchmark(x, number=1, repeat=1, min_repeat_ms=0); n_bench = threads()
        import threading
        other = {}
        def worker():   # a thread has its own pool: num_threads is applied there too
            one(x); other["one"] = threads()
            every(x); other["every"] = threads()
        t = threading.Thread(target=worker); t.start(); t.join()
        print(json.dumps({"every": n_every, "one": n_one, "back": n_back, "bench": n_bench,
                          "same": bool(np.array_equal(a, b)), "other_thread": other, "main_after": threads()}))
    """, env={"TVM_NUM_THREADS": "2"})
    assert got == {"every": 2, "one": 1, "back": 2, "bench": 1, "same": True,
                   "other_thread": {"one": 1, "every": 2}, "main_after": 1}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A linear layer's graph and the directory its module was exported to."""
    g = compiler.trace(torch.nn.Linear(4, 4), (torch.randn(1, 4),))
    directory = tmp_path_factory.mktemp("threads") / "m"
    codegen.build(g, "llvm").export(directory)
    return g, directory


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "2", 10_000])
def test_bad_num_threads_is_a_clear_error(bad, exported):
    g, directory = exported
    with pytest.raises(BuildOptionError, match=r"build: num_threads="):
        codegen.build(g, "llvm", num_threads=bad)
    with pytest.raises(OptionError, match=r"load: num_threads="):
        codegen.load(directory, num_threads=bad)
    loaded = codegen.load(directory)
    loaded.num_threads = bad
    with pytest.raises(OptionError, match=r"CompiledModule: num_threads="):
        loaded(torch.randn(1, 4))
