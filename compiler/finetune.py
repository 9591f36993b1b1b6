"""Accuracy-recovery helpers passes share: a plain training loop with optional knowledge distillation.

Distillation follows Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015):
the student matches the teacher's softened distribution ``softmax(z / T)``; the soft-target loss is
multiplied by ``T**2`` so its gradient scale stays comparable to the hard-label loss as T changes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


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


@dataclass
class TrainHistory:
    losses: list[float] = field(default_factory=list)


def train(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], config: TrainConfig = TrainConfig(),
          *, teacher: nn.Module | None = None) -> TrainHistory:
    """Train ``model`` in place with Adam; with ``teacher``, the loss is :func:`distillation_loss`.

    ``batches`` is re-iterated each epoch (a list or a DataLoader). Runs under
    :func:`deterministic`, so the same seed gives the same weights and the caller's RNG is untouched."""
    with deterministic(config.seed):
        return _train(model, batches, config, teacher)


def _train(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], config: TrainConfig,
           teacher: nn.Module | None) -> TrainHistory:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                           weight_decay=config.weight_decay)
    if teacher is not None:
        teacher.eval()
    history = TrainHistory()
    step = 0
    model.train()
    for epoch in range(config.epochs):
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not config.progress, leave=False)
        for x, y in bar:
            logits = logits_of(model(x))
            if teacher is not None:
                with torch.no_grad():
                    t_logits = logits_of(teacher(x))
                loss = distillation_loss(logits, t_logits, y, config.temperature, config.alpha)
            else:
                loss = F.cross_entropy(logits, y)
            if config.regularizer is not None:
                loss = loss + config.regularizer(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if config.step_callback is not None:
                config.step_callback(model, step)
            history.losses.append(loss.item())
            bar.set_postfix(loss=f"{history.losses[-1]:.4f}", refresh=False)
    model.eval()
    return history


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
