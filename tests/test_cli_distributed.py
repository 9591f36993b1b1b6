"""Fine-tuning from the command line, in one process and under torchrun (``--nproc``)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from squeezer.cli import main
from squeezer.launch import torchrun_command

ROOT = Path(__file__).resolve().parent.parent


def _data(path: Path, n: int = 256, shape=(1, 28, 28)) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.standard_normal((n, *shape)).astype(np.float32), y=rng.integers(0, 10, n))
    return path


def test_compress_finetunes_with_distillation(tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["compress", "lenet5", "--pass", "channel-pruning:ratio=0.5", "--finetune", "1", "--data",
                 str(_data(tmp_path / "d.npz")), "--train-batch", "32", "--quiet", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fine-tuned 1 epoch(s) with distillation" in text and (out / "manifest.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--finetune", "1"], "--finetune EPOCHS and --data go together"),
    (["--finetune", "1", "--data", "nope.npz"], "no such file"),
    (["--finetune", "1", "--data", "{bad}"], "unreadable"),
    (["--finetune", "1", "--data", "{wide}"], "inputs of shape (1, 32, 32), but the model takes (1, 28, 28)"),
])
def test_compress_finetune_bad_input_is_one_line(tmp_path, capsys, argv, message):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    wide = _data(tmp_path / "wide.npz", 8, (1, 32, 32))
    argv = [a.replace("{bad}", str(bad)).replace("{wide}", str(wide)) for a in argv]
    assert main(["compress", "lenet5", "--out", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_torchrun_command_line():
    args = argparse.Namespace(nproc=2, nnodes=None, rdzv_endpoint=None, max_restarts=3)
    cmd = torchrun_command(["demo", "--nproc", "2", "--quiet", "--max-restarts=3"], args, "/ck")
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "3", "--standalone",
                       "-m", "squeezer.cli", "demo", "--quiet", "--checkpoint-dir", "/ck"]
    args = argparse.Namespace(nproc=1, nnodes="2", rdzv_endpoint="head:29400", max_restarts=0)
    cmd = torchrun_command(["search", "--nnodes", "2", "--rdzv-endpoint", "head:29400"], args, None)
    assert cmd[cmd.index("--nnodes"):cmd.index("-m", 3)] == ["--nnodes", "2", "--rdzv-backend", "c10d",
                                                             "--rdzv-endpoint", "head:29400"]
    assert cmd[-2:] == ["squeezer.cli", "search"]


def test_rdzv_endpoint_without_nnodes_is_refused():
    from compiler.errors import SqueezerError

    args = argparse.Namespace(nproc=2, nnodes=None, rdzv_endpoint="head:29400", max_restarts=0)
    with pytest.raises(SqueezerError, match="give --nnodes too"):
        torchrun_command(["demo"], args, None)
    args = argparse.Namespace(nproc=2, nnodes="2", rdzv_endpoint=None, max_restarts=0)
    with pytest.raises(SqueezerError, match="needs --rdzv-endpoint"):
        torchrun_command(["demo"], args, None)


@pytest.mark.slow
def test_compress_finetune_on_two_processes(tmp_path):
    """`--nproc 2`: torchrun runs two workers; rank 0 exports, with one copy of every log line."""
    out = tmp_path / "pruned"
    cmd = [sys.executable, "-m", "squeezer.cli", "compress", "lenet5", "--pass", "channel-pruning:ratio=0.5",
           "--finetune", "2", "--data", str(_data(tmp_path / "d.npz")), "--train-batch", "32", "--quiet",
           "--nproc", "2", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("fine-tuned 2 epoch(s)") == 1 and done.stdout.count("exported to") == 1
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["params"] < report["before"]["params"]


@pytest.mark.slow
def test_demo_on_two_processes(tmp_path):
    """`squeezer demo --nproc 2`: the recovery fine-tune runs on two DDP workers; one table comes back."""
    cmd = [sys.executable, "-m", "squeezer.cli", "demo", "--nproc", "2", "--quiet", "--max-restarts", "1",
           "--out", str(tmp_path / "demo")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test accuracy (1,000 images)") == 1
    assert done.stdout.count("fine-tuned 3 epoch(s) with distillation") == 1
    assert (tmp_path / "demo" / "manifest.json").exists()
