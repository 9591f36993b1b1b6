"""Distributed recovery training: ``torchrun`` with 2 CPU workers (gloo over loopback) against one
process, and a killed worker resumed by torchrun's elastic restart from the checkpoint.

The 2-rank job runs once per module (a few seconds); the one-process references run here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.utils.data import TensorDataset

import distributed_cases as cases
from compiler.distributed import World
from compiler.errors import ArtifactError, OptionError
from compiler.finetune import TrainConfig, _Shards, train

ROOT = Path(__file__).resolve().parent.parent
CASES = ("kd", "kd-attention", "kd-fitnets", "iterative", "ste", "sparse-agp", "sparse-dns", "clustered", "batchnorm")


def _torchrun(out: Path, which: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *extra,
           str(ROOT / "tests" / "distributed_cases.py"), str(out), which]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    _torchrun(out, ",".join(CASES))
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("case", CASES)
def test_ranks_hold_identical_weights_and_masks(ranks, case):
    r0, _ = _read(ranks / f"{case}-rank0.safetensors")
    r1, _ = _read(ranks / f"{case}-rank1.safetensors")
    assert _max_diff(r0, r1) == 0.0
    if case.startswith("sparse"):
        masks = [k for k in r0 if k.endswith("mask")]
        assert masks and all(torch.equal(r0[k], r1[k]) for k in masks)
        assert 0.4 < 1 - float(sum(r0[k].sum() for k in masks) / sum(r0[k].numel() for k in masks)) < 0.95


@pytest.mark.parametrize("case", ["kd", "kd-attention", "kd-fitnets", "iterative", "sparse-agp", "sparse-dns",
                                  "clustered", "batchnorm"])
def test_ddp_matches_one_process_with_the_global_batch(ranks, case):
    """2 ranks × 16 samples reach the weights of one process × 32 within 1e-5 (BatchNorm over the
    global batch through the synchronized statistics)."""
    r0, meta = _read(ranks / f"{case}-rank0.safetensors")
    student, history = cases.run_case(case)
    assert _max_diff(r0, student.state_dict()) < 1e-5
    assert eval(meta["losses"]) == pytest.approx(history.losses, rel=1e-5, abs=1e-6)  # noqa: S307 - our own list


@pytest.mark.parametrize("case", ["kd", "kd-attention", "kd-fitnets", "iterative", "ste", "sparse-agp",
                                  "sparse-dns", "clustered"])
def test_ddp_equals_one_process_accumulating_the_rank_slices(ranks, case):
    """One process that slices its batch as the ranks do (micro_batches=2), on as many threads as each
    rank, computes every gradient bit for bit as 2 ranks do: exact, even for the STE-binarized net,
    where a plain batch-32 run drifts by ~1e-4 in 8 steps (a 1e-7 rounding difference flips a sign)."""
    r0, _ = _read(ranks / f"{case}-rank0.safetensors")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        student, _ = cases.run_case(case, micro_batches=2)
    finally:
        torch.set_num_threads(threads)
    assert _max_diff(r0, student.state_dict()) == 0.0


def test_killed_worker_resumes_from_the_checkpoint(ranks, tmp_path):
    """Rank 1 is SIGKILLed after step 7; torchrun restarts both workers, which resume mid-epoch from
    the step-6 checkpoint and end on exactly the uninterrupted 2-rank run's weights."""
    _torchrun(tmp_path, "fault", "--max-restarts", "1")
    uninterrupted, _ = _read(ranks / "kd-rank0.safetensors")
    for rank in (0, 1):
        state, meta = _read(tmp_path / f"fault-rank{rank}.safetensors")
        assert meta["restarts"] == "1" and meta["resumed_from_step"] == "6"
        assert _max_diff(state, uninterrupted) == 0.0


# ---- one process: checkpoints and bad input ----------------------------------------------------------
class _Interrupt(Exception):
    pass


def _stop_at(step: int):
    def callback(model, s):
        if s == step:
            raise _Interrupt
    return callback


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    reference, ref_history = cases.run_case("kd", lr_schedule="cosine")
    ckpt = dict(checkpoint_dir=str(tmp_path), checkpoint_every=2, lr_schedule="cosine")
    with pytest.raises(_Interrupt):
        cases.run_case("kd", step_callback=_stop_at(5), **ckpt)
    student, history = cases.run_case("kd", step_callback=_stop_at(-1), **ckpt)
    assert history.resumed_from_step == 4
    assert _max_diff(student.state_dict(), reference.state_dict()) == 0.0
    assert history.losses == ref_history.losses
    again, history = cases.run_case("kd", step_callback=_stop_at(-1), **ckpt)   # finished: loaded, not retrained
    assert history.resumed_from_step == 8 and _max_diff(again.state_dict(), reference.state_dict()) == 0.0


def test_dns_splicing_resumes_its_random_stream(tmp_path):
    reference, _ = cases.run_case("sparse-dns")
    with pytest.raises(_Interrupt):
        cases.run_case("sparse-dns", checkpoint_dir=str(tmp_path), regularizer=_raise_at_call(6))
    student, history = cases.run_case("sparse-dns", checkpoint_dir=str(tmp_path), checkpoint_every=1,
                                      regularizer=_raise_at_call(-1))
    assert _max_diff(student.state_dict(), reference.state_dict()) == 0.0


def _raise_at_call(n: int):
    count = [0]

    def regularizer(model):
        count[0] += 1
        if count[0] == n:
            raise _Interrupt
        return torch.zeros(())
    return regularizer


def test_a_run_with_other_data_does_not_resume_anothers_checkpoint(tmp_path):
    model = torch.nn.Linear(4, 3)
    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,)))
    train(model, data, TrainConfig(batch_size=8, progress=False, checkpoint_dir=str(tmp_path)))
    other = TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,)))
    history = train(torch.nn.Linear(4, 3), other, TrainConfig(batch_size=8, progress=False,
                                                               checkpoint_dir=str(tmp_path)))
    assert history.resumed_from_step is None and len(list(tmp_path.iterdir())) == 2


def test_damaged_checkpoint_is_named(tmp_path):
    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,)))
    config = TrainConfig(batch_size=8, progress=False, checkpoint_dir=str(tmp_path))
    torch.manual_seed(0)
    train(torch.nn.Linear(4, 3), data, config)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"not a checkpoint")
    torch.manual_seed(0)
    with pytest.raises(ArtifactError, match="unreadable.*delete it"):
        train(torch.nn.Linear(4, 3), data, config)


def test_bad_distributed_settings_are_named():
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
    with pytest.raises(OptionError, match="batch_size=33 does not split evenly over 2"):
        _Shards.of(data, TrainConfig(batch_size=33), World(0, 2))
    with pytest.raises(OptionError, match="pass a Dataset"):
        _Shards.of([(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))], TrainConfig(), World(0, 2))
    with pytest.raises(OptionError, match="micro_batches"):
        train(torch.nn.Linear(4, 3), data, TrainConfig(micro_batches=0))
    with pytest.raises(OptionError, match="lr_schedule"):
        train(torch.nn.Linear(4, 3), data, TrainConfig(lr_schedule="linear"))


def test_a_rerun_recipe_skips_finished_stages_and_resumes_the_interrupted_one(tmp_path):
    """A two-stage recipe (prune → distil, sparsify → distil) interrupted in its second stage: run
    again with the same checkpoint directory, the first stage's training is loaded as finished and
    the second resumes, ending on the uninterrupted run's weights."""
    from compiler.finetune import TrainConfig
    from passes import ChannelPruning, Sparsify
    from squeezer.recipes.stages import Recipe, Stage

    _, graph = cases._lenet()
    data = (cases.dataset().tensors[0], cases.dataset().tensors[1])

    def recipe(callback, checkpoint_dir=None):
        tune = TrainConfig(epochs=1, progress=False, checkpoint_dir=checkpoint_dir, checkpoint_every=1)
        return Recipe((Stage((ChannelPruning(ratio=0.5),), tune),
                       Stage((Sparsify(sparsity=0.5, stage="train"),), TrainConfig(**{**tune.__dict__,
                                                                                       "step_callback": callback}))))

    reference = recipe(_stop_at(-1)).run(graph, data, batch=32)
    with pytest.raises(_Interrupt):
        recipe(_stop_at(3), str(tmp_path)).run(graph, data, batch=32)
    resumed = recipe(_stop_at(-1), str(tmp_path)).run(graph, data, batch=32)
    assert _max_diff(resumed.module.state_dict(), reference.module.state_dict()) == 0.0
    assert len(list(tmp_path.glob("train-*.safetensors"))) == 2


def test_a_generator_of_batches_trains_and_cosine_needs_a_length():
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    history = train(torch.nn.Linear(4, 3), (b for b in [batch, batch]), TrainConfig(progress=False))
    assert len(history.losses) == 2
    with pytest.raises(OptionError, match="unknown length"):
        train(torch.nn.Linear(4, 3), (b for b in [batch]), TrainConfig(progress=False, lr_schedule="cosine"))
