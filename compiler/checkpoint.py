"""Training checkpoints that survive a lost worker, with no pickle: one safetensors file per training
run holding the model, the optimizer's moments, the step callback's state (DNS's generator) and
every rank's RNG state as tensors, and in its metadata, as JSON, where the run stands (epoch, batch,
step, losses), the optimizer's hyper-parameters and the learning-rate schedule's state.

A run is named by a fingerprint of what it starts from (the model's weights, the training settings,
the data size), so re-running a script after a crash — or ``torchrun --max-restarts`` restarting the
workers — finds the checkpoint of exactly this run and resumes it; a finished run is kept (marked
done) so a multi-stage recipe skips the stages it already trained. The file is replaced atomically
(written beside, then renamed), so a worker killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ArtifactError

FORMAT = "squeezer-train-state/1"


def save_whole(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written beside ``path`` and renamed into place: a reader (a restarted
    worker, another process sharing a cache) finds the old file or the new one, never half of one."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


@dataclass
class Position:
    """Where a run stands: ``batch`` batches of ``epoch`` done, ``step`` optimizer steps in all."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    losses: list[float] = field(default_factory=list)
    done: bool = False


def hash_tensor(h: Any, t: torch.Tensor) -> None:
    """Feed ``t``'s bytes (a CPU copy where it lives elsewhere) to the hash ``h``."""
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def fingerprint(model: nn.Module, settings: dict[str, Any]) -> str:
    """sha256 of the model's state (names, shapes, values) and the run's ``settings`` (JSON-able)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        hash_tensor(h, t)
    return h.hexdigest()


def _part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors saved under ``prefix.``, by their own names."""
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _optimizer_parts(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in _part(tensors, "optimizer").items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = t
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


@dataclass
class Checkpoint:
    """The checkpoint file of one training run in ``directory``."""

    directory: Path
    run: str                                   # the run's fingerprint

    @property
    def path(self) -> Path:
        return Path(self.directory) / f"train-{self.run[:20]}.safetensors"

    def save(self, position: Position, *, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any, callback: Any, rng_states: list[torch.Tensor]) -> None:
        """Write the run's state (call on rank 0 only; ``rng_states`` holds every rank's)."""
        opt_tensors, opt_meta = _optimizer_parts(optimizer)
        cb_state = callback.state_dict() if hasattr(callback, "state_dict") else {}
        tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()}, **opt_tensors,
                   **{f"rng.{r}": s for r, s in enumerate(rng_states)},
                   **{f"callback.{k}": v for k, v in cb_state.items()}}
        tensors = {k: v.detach().cpu().clone() for k, v in tensors.items()}   # own storage: tied weights too
        meta = {"format": FORMAT, "run": self.run, "position": asdict(position), "optimizer": opt_meta,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "ranks": len(rng_states)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_whole(tensors, self.path, {"squeezer": json.dumps(meta)})

    def restore(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, callback: Any,
                rank: int, ranks: int) -> Position | None:
        """Load the run's state into the given objects (``None`` when there is no checkpoint yet)."""
        if not self.path.exists():
            return None
        tensors, meta = self._read()
        model.load_state_dict(_part(tensors, "model"))
        optimizer.load_state_dict(_optimizer_state(tensors, meta["optimizer"]))
        if scheduler is not None and meta["scheduler"] is not None:
            scheduler.load_state_dict(meta["scheduler"])
        if hasattr(callback, "load_state_dict"):
            callback.load_state_dict(_part(tensors, "callback"))
        if meta["ranks"] == ranks and f"rng.{rank}" in tensors:   # same world: each rank resumes its stream
            torch.set_rng_state(tensors[f"rng.{rank}"])
        return Position(**meta["position"])

    def _read(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("squeezer", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - a damaged file is named, not a safetensors traceback
            raise ArtifactError(f"training checkpoint {self.path} is unreadable ({exc}); delete it to start "
                                "this run afresh") from None
        if meta.get("format") != FORMAT or meta.get("run") != self.run:
            raise ArtifactError(f"training checkpoint {self.path} is not a {FORMAT} file of this run; delete it "
                                "to start this run afresh")
        return tensors, meta
