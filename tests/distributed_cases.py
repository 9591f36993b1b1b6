"""Training runs the distributed tests repeat under ``torchrun``: each builds its student from the
same seed and trains it with :func:`compiler.finetune.train` on a TensorDataset, so one process and
N ranks can be compared weight for weight. Run as a script by torchrun (see test_distributed.py)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from compiler.feature_distillation import AttentionTransfer, HintLoss
from compiler.finetune import TrainConfig, TrainHistory, train
from compiler.tracing import trace
from passes import Binarize, ChannelPruning, Sparsify, WeightClustering, agp_callback, dns_callback, iterative_prune

GLOBAL_BATCH = 32


def dataset(n: int = 128) -> TensorDataset:
    gen = torch.Generator().manual_seed(5)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen))


def _lenet():
    from squeezer.zoo import LeNet5

    torch.manual_seed(0)
    model = LeNet5().eval()
    return model, trace(model, (torch.randn(1, 1, 28, 28),))


class _BnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1, bias=False)   # a bias before BN has no gradient: Adam would amplify its noise
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 14 * 14, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2), 1))


def terngrad_task() -> tuple[nn.Module, TensorDataset]:
    """A small MLP and a task it can learn: labels from a fixed random linear map of the inputs."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(128, 1, 8, 8, generator=gen)
    y = (x.reshape(128, -1) @ torch.randn(64, 4, generator=gen)).argmax(1)
    torch.manual_seed(2)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)), TensorDataset(x, y)


def config(**changes) -> TrainConfig:
    base = dict(epochs=2, lr=1e-3, batch_size=GLOBAL_BATCH, data_seed=3, progress=False)
    return TrainConfig(**{**base, **changes})


def run_case(name: str, **changes) -> tuple[nn.Module, TrainHistory]:
    """Train case ``name`` from scratch (the same start on every rank): the student and its history."""
    teacher, graph = _lenet()
    data = dataset()
    if name == "kd":        # Hinton distillation into a channel-pruned student
        student = ChannelPruning(ratio=0.5)(graph).module
        history = train(student, data, config(**changes), teacher=teacher)
    elif name == "kd-attention":   # Hinton + attention transfer on both conv stages
        student = ChannelPruning(ratio=0.5)(graph).module
        feature = AttentionTransfer(("conv1", "conv2"))
        history = train(student, data, config(feature_loss=feature, **changes), teacher=teacher)
    elif name == "kd-fitnets":     # Hinton + FitNets hints: the regressors' gradients are averaged too
        student = ChannelPruning(ratio=0.5)(graph).module
        feature = HintLoss.between(student, teacher, ("conv2", "fc1"), weight=0.5)
        history = train(student, data, config(feature_loss=feature, **changes), teacher=teacher)
        student.hint_regressors = feature.regressors   # compared with the weights
    elif name == "iterative":   # prune → distil twice; each cut decided on rank 0 and broadcast as a graph
        pruned = iterative_prune(graph, ChannelPruning(ratio=0.5), 2, data, config(epochs=1, **changes))
        student, history = pruned.module, TrainHistory()
    elif name == "ste":     # XNOR-Net STE layers, distilled
        student = Binarize(method="xnor", stage="train")(graph).module
        history = train(student, data, config(**changes), teacher=teacher)
    elif name == "sparse-agp":
        student = Sparsify(sparsity=0.5, stage="train")(graph).module
        history = train(student, data, config(step_callback=agp_callback(0.8, steps=6, every=2), **changes), teacher=teacher)
    elif name == "sparse-dns":
        student = Sparsify(sparsity=0.5, method="dns", stage="train")(graph).module
        history = train(student, data, config(step_callback=dns_callback(0.6, gamma=0.0, seed=1), **changes), teacher=teacher)
    elif name == "clustered":   # shared centroids: their gradients summed over the layer, averaged over ranks
        student = WeightClustering(bits=3)(graph).module
        history = train(student, data, config(**changes), teacher=teacher)
    elif name == "terngrad":    # TernGrad's ternary all-reduce (a DDP comm hook) on a learnable task
        student, data = terngrad_task()
        history = train(student, data, config(epochs=8, lr=1e-2, grad_compression="terngrad", **changes))
    elif name == "batchnorm":   # statistics over the global batch
        torch.manual_seed(1)
        student = _BnNet()
        history = train(student, data, config(**changes))
    else:
        raise ValueError(name)
    return student, history


class KillOnce:
    """A step callback that SIGKILLs rank ``rank`` at ``step`` on the job's first attempt only."""

    def __init__(self, step: int, rank: int = 1) -> None:
        self.step, self.rank = step, rank

    def __call__(self, model: nn.Module, step: int) -> None:
        import torch.distributed as dist

        if step == self.step and dist.get_rank() == self.rank and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
            os.kill(os.getpid(), signal.SIGKILL)


def main(out: str, cases: list[str]) -> None:
    from safetensors.torch import save_file

    from compiler.distributed import init_from_env

    w = init_from_env()
    for case in cases:
        if case == "fault":
            student, history = run_case("kd", checkpoint_dir=str(Path(out) / "ckpt"), checkpoint_every=3,
                               step_callback=KillOnce(step=7))
        else:
            student, history = run_case(case)
        state = {k: v.contiguous() for k, v in student.state_dict().items()}
        save_file(state, str(Path(out) / f"{case}-rank{w.rank}.safetensors"),
                  metadata={"restarts": os.environ.get("TORCHELASTIC_RESTART_COUNT", ""),
                            "resumed_from_step": str(history.resumed_from_step), "losses": repr(history.losses)})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","))
