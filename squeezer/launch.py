"""``--nproc N``: the same command re-run by ``torchrun`` as N worker processes (PyTorch's own
launcher and elastic agent: rendezvous, worker monitoring, ``--max-restarts``), on this machine or,
with ``--nnodes``/``--rdzv-endpoint``, as one node of a job across machines, as torchrun documents.
A command already running under torchrun (started by ``torchrun ... -m squeezer.cli ...`` directly,
or by this launcher) runs as one rank and is never launched again."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Sequence

from compiler.distributed import launched_by_torchrun
from compiler.errors import SqueezerError

# the launcher's own options: (flag, takes a value); they are not passed on to the workers
LAUNCH_FLAGS = {"--nproc": True, "--nnodes": True, "--rdzv-endpoint": True, "--max-restarts": True}


def add_launch_args(parser: argparse.ArgumentParser, integer, *, checkpoints: bool = True) -> None:
    """The torchrun options (and, for commands that fine-tune, the checkpoint options)."""
    g = parser.add_argument_group("distributed (torchrun)")
    g.add_argument("--nproc", type=integer(1), default=1,
                   help="worker processes on this machine (torchrun --nproc-per-node); gloo on CPU")
    g.add_argument("--nnodes", default=None, help="machines in the job, e.g. 2 or 1:4 (torchrun --nnodes)")
    g.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="the rendezvous endpoint every machine names (torchrun --rdzv-endpoint)")
    g.add_argument("--max-restarts", type=integer(0), default=0,
                   help="elastic restarts after a lost worker, each resuming from the last checkpoint (default 0, "
                        "as torchrun's: an error that would only repeat is not retried unless asked)")
    if not checkpoints:
        return
    g.add_argument("--checkpoint-dir", default=None,
                   help="where fine-tuning checkpoints are written and resumed from (on many machines: shared "
                        "storage); default with --nproc: a temporary directory kept for the job's restarts")
    g.add_argument("--checkpoint-every", type=integer(0), default=0, metavar="STEPS",
                   help="optimizer steps between checkpoints (default 0: at the end of each epoch)")


def wants_launch(args: argparse.Namespace) -> bool:
    return (args.nproc > 1 or args.nnodes is not None) and not launched_by_torchrun()


def _worker_argv(argv: Sequence[str], checkpoint_dir: str | None) -> list[str]:
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        flag = a.split("=", 1)[0]
        if flag in LAUNCH_FLAGS:
            skip = LAUNCH_FLAGS[flag] and "=" not in a
            continue
        out.append(a)
    if checkpoint_dir is not None and not any(a.split("=", 1)[0] == "--checkpoint-dir" for a in out):
        out += ["--checkpoint-dir", checkpoint_dir]
    return out


def torchrun_command(argv: Sequence[str], args: argparse.Namespace, checkpoint_dir: str | None) -> list[str]:
    """The torchrun command line running ``squeezer <argv>`` as this job's workers."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
           "--max-restarts", str(args.max_restarts)]
    if args.nnodes is not None:
        if not args.rdzv_endpoint:
            raise SqueezerError("--nnodes needs --rdzv-endpoint HOST:PORT (the same on every machine)")
        cmd += ["--nnodes", str(args.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint]
    elif args.rdzv_endpoint:
        raise SqueezerError("--rdzv-endpoint is for a job across machines: give --nnodes too")
    else:
        cmd.append("--standalone")
    return cmd + ["-m", "squeezer.cli", *_worker_argv(argv, checkpoint_dir)]


def relaunch(argv: Sequence[str], args: argparse.Namespace) -> int:
    """Run this command under torchrun and return its exit status. Each worker trains on its share of
    the cores; TVM keeps them all for rank 0's build and timing, which run after the others finish."""
    checkpoints = hasattr(args, "checkpoint_dir")
    temporary = checkpoints and args.checkpoint_dir is None
    checkpoint_dir = (args.checkpoint_dir or tempfile.mkdtemp(prefix="squeezer-checkpoints-")) if checkpoints else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, cores // args.nproc))),
           "TVM_NUM_THREADS": os.environ.get("TVM_NUM_THREADS", str(cores))}
    try:
        return subprocess.call(torchrun_command(argv, args, checkpoint_dir), env=env)
    finally:
        if temporary and checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
