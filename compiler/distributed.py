"""The process group training runs in: PyTorch's own ``torch.distributed``, as ``torchrun`` sets it up.

Launched by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ... in the environment), a
Squeezer process joins the group once (gloo on CPU, NCCL when it trains on a GPU); launched plainly,
it is a world of one and nothing here costs anything. Gradient all-reduce is DDP's; what lives here
is what DDP leaves to the user: the rank-0-only chores (logs, progress, files), decisions made once
and broadcast (a pruned architecture), and BatchNorm statistics over the whole global batch on CPU,
where ``nn.SyncBatchNorm`` refuses to run.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn



@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` (a world of one when not distributed)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(backend: str | None = None) -> World:
    """Join the process group ``torchrun`` describes in the environment (once; later calls return
    the same world). ``backend``: by default gloo, and NCCL for CUDA tensors where torch sees a GPU."""
    if dist.is_available() and dist.is_initialized():
        return world()
    if not launched_by_torchrun():
        return World()
    # one group for both devices where there is a GPU: CPU tensors over gloo, CUDA tensors over NCCL
    backend = backend or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    # torchrun's agent keeps its store across elastic restarts, so a restarted worker could read the
    # dead attempt's gloo addresses and fail to connect: every attempt gets its own key prefix
    from torch.distributed.rendezvous import rendezvous

    store, rank, size = next(rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"squeezer/attempt{attempt}/", store),
                            rank=rank, world_size=size)
    # a gloo group left to the interpreter's teardown can abort the process at exit (SIGABRT,
    # "terminate called without an active exception"): it is destroyed first
    atexit.register(_leave)
    return world()


LEAVE_TIMEOUT = datetime.timedelta(seconds=30)


def _leave() -> None:
    """Tear the group down at exit, on gloo only once every rank has got here: a rank that closes
    its connections while a peer's gloo threads still use them can abort that peer (SIGABRT,
    "terminate called without an active exception", seen on rank 1 of a two-rank CI run). The
    barrier is bounded: a peer that already left makes it fail, and the teardown goes on."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=LEAVE_TIMEOUT)
        except RuntimeError:   # a rank is gone (crashed or killed): nothing left to wait for
            pass
    dist.destroy_process_group()


def world() -> World:
    """The current world: the initialized process group's rank and size, else a world of one."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def barrier() -> None:
    if world().distributed:
        dist.barrier()


def main_only(log: Callable[..., Any]) -> Callable[..., Any]:
    """``log`` on rank 0, a no-op elsewhere: one copy of every line, not one per process."""
    return log if world().is_main else (lambda *_a, **_k: None)


# ---- broadcasting what rank 0 decided ---------------------------------------------------------------------
def _as_tensor(payload: bytes) -> torch.Tensor:
    """Bytes as the uint8 tensor a collective sends (no pickle crosses the wire)."""
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8)


def broadcast_bytes(payload: bytes | None, src: int = 0) -> bytes:
    """``payload`` from rank ``src`` on every rank."""
    w = world()
    if not w.distributed:
        assert payload is not None
        return payload
    size = torch.tensor([len(payload) if w.rank == src else 0], dtype=torch.int64)
    dist.broadcast(size, src)
    data = _as_tensor(payload) if w.rank == src else torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(data, src)
    return payload if w.rank == src else data.numpy().tobytes()


def all_gather_json(value: Any) -> list[Any]:
    """A JSON-able value from every rank, in rank order, on every rank: what each rank worked out
    on its share of a job (a search's candidates), put together identically everywhere."""
    w = world()
    if not w.distributed:
        return [value]
    data = _as_tensor(json.dumps(value).encode())
    sizes = gather_tensors(torch.tensor([len(data)], dtype=torch.int64))
    longest = int(max(sizes))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:len(data)] = data
    return [json.loads(t[:int(n)].numpy().tobytes().decode()) for t, n in zip(gather_tensors(padded), sizes)]


def send_bytes(payload: bytes, dst: int) -> None:
    """``payload`` to rank ``dst`` alone (which calls :func:`recv_bytes`): an artifact for the one rank
    that needs it, not a broadcast to all. Both sides must take their sends and receives in the same
    order."""
    dist.send(torch.tensor([len(payload)], dtype=torch.int64), dst)
    if payload:
        dist.send(_as_tensor(payload), dst)


def recv_bytes(src: int) -> bytes:
    """What rank ``src`` sent with :func:`send_bytes`."""
    size = torch.empty(1, dtype=torch.int64)
    dist.recv(size, src)
    if not int(size):
        return b""
    data = torch.empty(int(size), dtype=torch.uint8)
    dist.recv(data, src)
    return data.numpy().tobytes()


def decided_on_main(decide: Callable[[], Any]) -> Any:
    """Run ``decide()`` (a pass pipeline: pruning, splitting) on rank 0 only and give every rank its
    Graph, sent in Squeezer's pickle-free graph format, so every rank holds the same architecture
    and weights even where a decision depends on data or timing."""
    from .serialization import load, save

    w = world()
    if not w.distributed:
        return decide()
    graph = decide() if w.is_main else None
    with tempfile.TemporaryDirectory(prefix="squeezer-bcast-") as tmp:
        path = os.path.join(tmp, "graph.safetensors")
        payload = None
        if w.is_main:
            save(graph, path)
            with open(path, "rb") as f:
                payload = f.read()
        payload = broadcast_bytes(payload)
        if w.is_main:
            return graph
        with open(path, "wb") as f:
            f.write(payload)
        return load(path)


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Every rank gets rank ``src``'s buffers (masks, BatchNorm statistics) in place."""
    if world().distributed:
        for buf in module.buffers():
            dist.broadcast(buf.data, src)


def gather_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """``t`` of every rank (same shape and dtype everywhere), in rank order."""
    w = world()
    if not w.distributed:
        return [t]
    out = [torch.empty_like(t) for _ in range(w.size)]
    dist.all_gather(out, t.contiguous())
    return out


# ---- BatchNorm over the global batch ----------------------------------------------------------------------
def _global_batchnorm_forward(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """A training-mode BatchNorm whose mean and variance cover every rank's shard (Ioffe & Szegedy's
    batch is the global batch), through torch.distributed's differentiable all-reduce, in two passes
    (mean, then centred squares) so it is as accurate as the local kernel."""
    import torch.distributed._functional_collectives as funcol

    def all_reduce(t: torch.Tensor) -> torch.Tensor:   # differentiable: gradients reach every shard
        return funcol.all_reduce(t, "sum", dist.group.WORLD)

    if not bn.training:
        return type(bn).forward(bn, x)
    dims = [d for d in range(x.dim()) if d != 1]
    c = x.shape[1]
    shape = [1, c] + [1] * (x.dim() - 2)
    local = x.new_tensor([float(x.numel() // c)])
    sums = all_reduce(torch.cat([x.sum(dims), local]))
    n = sums[-1]
    mean = sums[:c] / n
    centered = x - mean.reshape(shape)
    var = all_reduce((centered * centered).sum(dims)) / n
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            bn.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)).detach(), alpha=m)
    y = centered * torch.rsqrt(var.reshape(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.reshape(shape) + bn.bias.reshape(shape)
    return y


@contextlib.contextmanager
def global_batchnorm(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every BatchNorm of ``model`` normalizes over the global batch of a distributed run
    (a no-op in a world of one). Each BatchNorm keeps its place, names and tensors (checkpoints and
    DDP see the model as it is); only its forward is replaced, and restored on exit."""
    if not world().distributed:
        yield model
        return
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.forward = functools.partial(_global_batchnorm_forward, bn)
    try:
        yield model
    finally:
        for bn in norms:
            del bn.forward
