"""Accuracy-recovery helpers passes share: a plain training loop with optional knowledge distillation.

Distillation follows Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015):
the student matches the teacher's softened distribution ``softmax(z / T)``; the soft-target loss is
multiplied by ``T**2`` so its gradient scale stays comparable to the hard-label loss as T changes.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset
from tqdm.auto import tqdm

from .distributed import World
from .errors import OptionError


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seeded torch RNG and deterministic kernels inside; the caller's RNG state and
    determinism setting are restored afterwards."""
    previous = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                      temperature: float = 4.0, alpha: float = 0.9) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels)``."""
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation alpha must be in [0, 1], got {alpha}")
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                    reduction="batchmean", log_target=True) * (t * t)
    if labels is None:  # soft targets only
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, a dict's (or Hugging Face output's)
    ``"logits"``, or a tuple's first item."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the logits in a model output of type {type(output).__name__}: return a tensor, "
                    "a tuple whose first item is the logits, or a dict with key 'logits'")


LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    epochs: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    temperature: float = 4.0
    alpha: float = 0.9
    seed: int = 0
    progress: bool = True
    regularizer: Callable[[nn.Module], torch.Tensor] | None = None  # added to the loss (e.g. Network Slimming's L1 on γ)
    step_callback: Callable[[nn.Module, int], None] | None = None   # after each optimizer step (AGP / DNS masks)
    batch_size: int = 64            # the global batch, when train() is given a Dataset (split over the ranks)
    micro_batches: int = 1          # slices of each rank's batch whose gradients accumulate into one step
    data_seed: int = 0              # the DistributedSampler's shuffle seed (reshuffled each epoch)
    lr_schedule: str = "constant"   # or "cosine" (annealed to 0 over the run's steps)
    checkpoint_dir: str | None = None   # where the run's state is saved and resumed from (see compiler.checkpoint)
    checkpoint_every: int = 0       # optimizer steps between checkpoints; 0: at the end of each epoch only
    feature_loss: Any = None        # a compiler.feature_distillation loss (FitNets hints, attention transfer)
    grad_compression: str = "none"  # "terngrad": ternary gradients (Wen et al. 2017, compiler.grad_compression)
    terngrad_clip: float | None = None   # TernGrad's gradient clipping at c·σ (the paper: c = 2.5)

    def validate(self) -> None:
        for name, least in (("epochs", 0), ("batch_size", 1), ("micro_batches", 1), ("checkpoint_every", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise OptionError(f"TrainConfig.{name}={value!r}: expected an integer >= {least}")
        if not self.lr > 0:
            raise OptionError(f"TrainConfig.lr={self.lr!r}: expected a number > 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise OptionError(f"TrainConfig.lr_schedule={self.lr_schedule!r}: expected one of {LR_SCHEDULES}")
        from .grad_compression import GRAD_COMPRESSIONS

        if self.grad_compression not in GRAD_COMPRESSIONS:
            raise OptionError(f"TrainConfig.grad_compression={self.grad_compression!r}: expected one of {GRAD_COMPRESSIONS}")
        if self.terngrad_clip is not None and (isinstance(self.terngrad_clip, bool) or not self.terngrad_clip > 0):
            raise OptionError(f"TrainConfig.terngrad_clip={self.terngrad_clip!r}: expected None or a number > 0 "
                              "(the paper clips at 2.5 standard deviations)")


@dataclass
class TrainHistory:
    losses: list[float] = field(default_factory=list)
    resumed_from_step: int | None = None   # the checkpoint's step when the run resumed one


def train(model: nn.Module, data: Dataset | Iterable[tuple[torch.Tensor, torch.Tensor]],
          config: TrainConfig = TrainConfig(), *, teacher: nn.Module | None = None) -> TrainHistory:
    """Train ``model`` in place with Adam; with ``teacher``, the loss is :func:`distillation_loss`
    (plus ``config.feature_loss`` when given).

    ``data`` is a map-style ``Dataset`` of (x, y) — read in global batches of ``config.batch_size``
    through a ``DistributedSampler`` — or, in a single process, ready-made batches re-iterated each
    epoch (a list or a DataLoader). Under ``torchrun`` the model is wrapped in
    DistributedDataParallel: each rank reads its shard of every global batch, DDP averages the
    gradients, BatchNorm normalizes over the global batch, so the weights follow the one-process run
    with the same global batch. The batches go to the device the student's parameters are on (on GPUs
    under torchrun: each rank's model on ``cuda:LOCAL_RANK``, reduced over NCCL; the teacher on the
    same device). Runs under :func:`deterministic`, so the same seed gives the same
    weights and the caller's RNG is untouched; with ``config.checkpoint_dir`` it resumes a run
    that was interrupted (see :mod:`compiler.checkpoint`)."""
    from .distributed import init_from_env

    config.validate()
    w = init_from_env()
    with deterministic(config.seed + w.rank):
        return TrainingRun(model, _Shards.of(data, config, w), config, teacher, w).run()


class _Shards:
    """This rank's batches of each epoch."""

    def __init__(self, loader: Any, sampler: DistributedSampler | None) -> None:
        self.loader, self.sampler = loader, sampler

    @classmethod
    def of(cls, data: Any, config: TrainConfig, w: World) -> _Shards:
        if isinstance(data, Dataset):
            if config.batch_size % w.size:
                raise OptionError(f"TrainConfig.batch_size={config.batch_size} does not split evenly over {w.size} "
                                  "processes: give a global batch that is a multiple of the process count")
            sampler = DistributedSampler(data, num_replicas=w.size, rank=w.rank, shuffle=True, seed=config.data_seed)
            return cls(DataLoader(data, batch_size=config.batch_size // w.size, sampler=sampler), sampler)
        if w.distributed:
            raise OptionError("distributed training reads each rank's shard through a DistributedSampler: pass a "
                              "Dataset (e.g. torch.utils.data.TensorDataset(x, y)) and TrainConfig.batch_size, not "
                              "ready-made batches")
        return cls(data, None)

    def identity(self) -> str:
        """What names the data in a run's fingerprint: a TensorDataset's values, else its size."""
        data = getattr(self.loader, "dataset", None)
        if isinstance(data, TensorDataset):
            from .checkpoint import hash_tensor

            h = hashlib.sha256()
            for t in data.tensors:
                hash_tensor(h, t)
            return h.hexdigest()
        return f"{type(data or self.loader).__name__}:{len(data) if data is not None else self.count()}"

    def epoch(self, epoch: int) -> Any:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        return self.loader

    def count(self) -> int | None:
        """Batches per epoch (None for an iterable that cannot tell)."""
        try:
            return len(self.loader)
        except TypeError:
            return None


class TrainingRun:
    """One call of :func:`train`: the optimizer, the schedule, the checkpoint and the loop."""

    def __init__(self, model: nn.Module, shards: _Shards, config: TrainConfig, teacher: nn.Module | None,
                 w: World) -> None:
        self.model, self.shards, self.config, self.teacher, self.world = model, shards, config, teacher, w
        # the student and the feature loss's regressors: what DDP averages, the optimizer steps and a checkpoint holds
        self.student = _Student(model, teacher, config.feature_loss)
        self.device = _device_of(model)   # where the batches go: a rank's GPU, or the CPU
        params = [p for p in self.student.parameters() if p.requires_grad]
        # a regularizer that learns (soft weight-sharing's mixture prior) adds its own parameter groups
        learned = getattr(config.regularizer, "param_groups", None)
        if callable(learned):   # (its groups may take some of the student's parameters, at their own rates)
            groups = list(learned(config.lr))
            taken = {id(p) for g in groups for p in g["params"]}
            params = [{"params": [p for p in params if id(p) not in taken]}, *groups]
        self.opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = None
        if config.lr_schedule == "cosine":
            if shards.count() is None:
                raise OptionError("lr_schedule='cosine' anneals over the run's steps: give a Dataset or a list of "
                                  "batches, not an iterable of unknown length")
            total = max(config.epochs * shards.count(), 1)
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=total)
        self.compression = None   # TernGrad: a DDP communication hook, or the local gradients in one process
        if config.grad_compression == "terngrad":
            from .grad_compression import TernGrad

            self.compression = TernGrad(clip=config.terngrad_clip, seed=config.seed * 7919 + w.rank)
        self.checkpoint = None
        if config.checkpoint_dir is not None:
            from .checkpoint import Checkpoint, fingerprint

            self.checkpoint = Checkpoint(Path(config.checkpoint_dir), fingerprint(self.student, self._settings()))

    def _settings(self) -> dict[str, Any]:
        c = self.config
        return {"epochs": c.epochs, "lr": c.lr, "weight_decay": c.weight_decay, "temperature": c.temperature,
                "alpha": c.alpha, "seed": c.seed, "batch_size": c.batch_size, "data_seed": c.data_seed,
                "micro_batches": c.micro_batches, "lr_schedule": c.lr_schedule, "teacher": self.teacher is not None,
                "data": self.shards.identity(), "callback": type(c.step_callback).__name__,
                "feature_loss": repr(c.feature_loss),
                **({"grad_compression": c.grad_compression, "terngrad_clip": c.terngrad_clip}
                   if c.grad_compression != "none" else {})}   # (earlier runs keep their fingerprints)

    def run(self) -> TrainHistory:
        from .checkpoint import Position

        resumed = self._resume()
        position = resumed or Position()
        resumed_from = position.step if resumed is not None else None   # before the loop moves it on
        if not position.done:
            self._loop(position)
            position.done = True
            self._save(position)
        self.model.eval()
        return TrainHistory(list(position.losses), resumed_from)

    def _resume(self):
        if self.checkpoint is None:
            return None
        c = self.config
        return self.checkpoint.restore(model=self.student, optimizer=self.opt, scheduler=self.scheduler,
                                       callback=c.step_callback, rank=self.world.rank, ranks=self.world.size)

    def _save(self, position) -> None:
        from .distributed import barrier, gather_tensors

        if self.checkpoint is None:
            return
        rng = gather_tensors(torch.get_rng_state())
        if self.world.is_main:
            self.checkpoint.save(position, model=self.student, optimizer=self.opt, scheduler=self.scheduler,
                                 callback=self.config.step_callback, rng_states=rng)
        barrier()

    def _loop(self, position) -> None:
        from .distributed import broadcast_buffers, global_batchnorm

        c, w = self.config, self.world
        if self.teacher is not None:
            self.teacher.eval()
        with global_batchnorm(self.model):
            net: nn.Module = self.student
            if w.distributed:
                net = nn.parallel.DistributedDataParallel(
                    net, device_ids=[self.device] if self.device.type == "cuda" else None, static_graph=True)
                if self.compression is not None:
                    self.compression.attach(net)
            net.train()
            for epoch in range(position.epoch, c.epochs):
                bar = tqdm(total=self.shards.count(), initial=position.batch, desc=f"epoch {epoch + 1}/{c.epochs}",
                           disable=not (c.progress and w.is_main), leave=False)
                for i, (x, y) in enumerate(self.shards.epoch(epoch)):
                    if i < position.batch:          # resumed mid-epoch: the batches already trained
                        continue
                    loss = self._step(net, x, y)
                    position.step += 1
                    position.batch = i + 1
                    if c.step_callback is not None:
                        c.step_callback(self.model, position.step)
                        broadcast_buffers(self.model)   # the masks of every rank are rank 0's
                    position.losses.append(loss)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                    if c.checkpoint_every and position.step % c.checkpoint_every == 0:
                        self._save(position)
                bar.close()
                position.epoch, position.batch = epoch + 1, 0
                self._save(position)

    def _step(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer step on this rank's batch, in ``micro_batches`` interleaved slices whose
        gradients accumulate: one process with k slices computes exactly what k ranks compute."""
        m, n = self.config.micro_batches, len(x)
        slices = range(min(m, n))
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for j in slices:
            last = j == slices[-1]
            sync = net.no_sync() if isinstance(net, nn.parallel.DistributedDataParallel) and not last \
                else contextlib.nullcontext()
            xs, ys = x[j::m], y[j::m]
            with sync:
                loss = self._loss(net, xs, ys)
                (loss * (len(xs) / n)).backward()    # one slice: × 1.0, exact
            total += float(loss.detach()) * len(xs) / n
        if self.compression is not None and not isinstance(net, nn.parallel.DistributedDataParallel):
            self.compression.compress_local(p for group in self.opt.param_groups for p in group["params"])
        self.opt.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return _mean_over_ranks(torch.tensor(total), self.world)

    def _loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.config
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        logits, t_logits, extra = net(x)
        loss = F.cross_entropy(logits, y) if t_logits is None else \
            distillation_loss(logits, t_logits, y, c.temperature, c.alpha)
        if extra is not None:
            loss = loss + extra
        if c.regularizer is not None:
            loss = loss + c.regularizer(self.model)
        return loss


class _Student(nn.Module):
    """What one step runs, as one module so DDP averages every learned gradient: the student, the
    feature loss's own parameters (FitNets regressors), and the frozen teacher (held, not registered:
    it has nothing to average)."""

    def __init__(self, model: nn.Module, teacher: nn.Module | None, feature_loss: Any) -> None:
        super().__init__()
        self.model, self.feature = model, feature_loss
        self._teacher = [teacher]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        teacher = self._teacher[0]
        recording = self.feature.recording(self.model, teacher) if self.feature is not None \
            else contextlib.nullcontext()
        with recording:
            logits = logits_of(self.model(x))
            t_logits = None
            if teacher is not None:
                with torch.no_grad():
                    t_logits = logits_of(teacher(x))
            return logits, t_logits, (self.feature.loss() if self.feature is not None else None)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _mean_over_ranks(loss: torch.Tensor, w: World) -> float:
    """The global batch's loss (every rank's shard loss averaged), as one process would report it."""
    if w.distributed:
        import torch.distributed as dist

        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= w.size
    return float(loss)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy in [0, 1]."""
    model.eval()
    correct = total = 0
    for x, y in batches:
        correct += int((logits_of(model(x)).argmax(-1) == y).sum())
        total += len(y)
    return correct / max(total, 1)


def batches_of(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = False,
               seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split tensors into a list of (x, y) mini-batches (shuffled deterministically if asked)."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(x))
    return [(x[order[i:i + batch_size]], y[order[i:i + batch_size]]) for i in range(0, len(x), batch_size)]
