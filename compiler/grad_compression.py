"""Gradient compression for distributed training: TernGrad (Wen, Xu, Yan, Wu, Wang, Chen & Li,
"TernGrad: Ternary Gradients to Reduce Communication in Distributed Deep Learning", NIPS 2017).

Each worker sends, per layer, the ternary gradient ``g̃ = s · sign(g) ∘ b`` with the scaler
``s = ||g||_∞ = max |g|`` and ``b_k ~ Bernoulli(|g_k| / s)`` drawn independently (Eq. 4), so
``E[g̃] = g``: an unbiased estimate whose values are in {-s, 0, s}. As in the paper's §3.3:

* *scaler sharing*: the workers first agree on ``s = max_i s_i`` (an all-reduce of one number per
  layer), so every worker's codes share it and the codes can be summed as integers — the
  all-reduce carries int8 codes (1 byte per gradient instead of 4; the paper's 2-bit packing would
  need an all-gather), and ``s / N · Σ codes`` is the averaged gradient;
* *gradient clipping* (``clip=c``, the paper uses 2.5): each layer's gradient is first clipped to
  ``[-cσ, cσ]`` (σ its standard deviation), which shrinks ``s`` and with it the variance.

Under DDP, :func:`terngrad_hook` is a communication hook (``DistributedDataParallel.
register_comm_hook``), applied per layer within each of DDP's buckets. In one process
:meth:`TernGrad.compress_local` ternarizes each parameter's gradient the same way (a world of one
has nothing to send, but trains on what one worker of the paper would).
"""


from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

GRAD_COMPRESSIONS = ("none", "terngrad")


def clip_gradient(g: torch.Tensor, c: float) -> torch.Tensor:
    """The paper's clipping: ``g`` limited to ``[-cσ, cσ]``, σ the standard deviation of ``g``."""
    bound = c * g.float().std(unbiased=False).to(g.dtype)
    return torch.maximum(torch.minimum(g, bound), -bound)


def ternary_codes(g: torch.Tensor, scaler: torch.Tensor, generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """``sign(g) ∘ b`` with ``b ~ Bernoulli(|g| / scaler)`` (codes in {-1, 0, 1}; all 0 when scaler is 0)."""
    p = (g.abs() / scaler).nan_to_num(0.0).clamp(max=1.0) if float(scaler) > 0 else torch.zeros_like(g)
    u = torch.rand(g.shape, generator=generator, device=g.device, dtype=g.dtype)
    return (torch.sign(g) * (u < p)).to(dtype)


def ternarize(g: torch.Tensor, *, clip: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """TernGrad's stochastic ternary estimate of ``g``: values in {-s, 0, s}, ``s = max |g|`` (after
    the optional ``c·σ`` clipping), unbiased over draws (for the clipped gradient when clipping)."""
    if clip is not None:
        g = clip_gradient(g, clip)
    s = g.abs().max() if g.numel() else g.new_zeros(())
    return ternary_codes(g, s, generator).to(g.dtype) * s


@dataclass
class TernGrad:
    """The state of one worker's TernGrad: the clipping constant and its own random stream."""

    clip: float | None = None
    seed: int = 0
    process_group: object = None
    _generators: dict = field(default_factory=dict, repr=False)

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def attach(self, ddp: nn.parallel.DistributedDataParallel) -> None:
        """Make ``ddp`` all-reduce ternary gradients."""
        ddp.register_comm_hook(self, terngrad_hook)

    @torch.no_grad()
    def compress_local(self, params: Iterable[torch.Tensor]) -> None:
        """One process: replace each parameter's gradient by its ternary estimate."""
        for p in params:
            if p.grad is not None:
                p.grad.copy_(ternarize(p.grad, clip=self.clip, generator=self.generator(p.grad.device)))


def _layer_spans(bucket: dist.GradBucket) -> list[tuple[int, int]]:
    """(offset, length) of each parameter's gradient in the bucket's flat buffer."""
    spans, offset = [], 0
    for g in bucket.gradients():
        spans.append((offset, g.numel()))
        offset += g.numel()
    return spans


def terngrad_hook(state: TernGrad, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: per layer of the bucket, share the scaler (max over workers), send
    the ternary codes (an integer all-reduce), decode the average ``s / N · Σ codes``."""
    group = state.process_group or dist.group.WORLD
    n = dist.get_world_size(group)
    buf = bucket.buffer()
    spans = _layer_spans(bucket) or [(0, buf.numel())]
    with torch.no_grad():
        pieces = [buf[a:a + k] for a, k in spans]
        if state.clip is not None:
            pieces = [clip_gradient(g, state.clip) for g in pieces]
        scalers = torch.stack([g.abs().max() if g.numel() else g.new_zeros(()) for g in pieces]).float()
        dist.all_reduce(scalers, op=dist.ReduceOp.MAX, group=group)   # scaler sharing
        dtype = torch.int8 if n <= 127 else torch.int32   # Σ codes lies in [-N, N]
        gen = state.generator(buf.device)
        codes = torch.cat([ternary_codes(g, s.to(g.dtype), gen, dtype) for g, s in zip(pieces, scalers)])
        scale = torch.repeat_interleave(scalers, torch.tensor([k for _, k in spans], device=scalers.device))
    fut = dist.all_reduce(codes, group=group, async_op=True).get_future()

    def decode(f: torch.futures.Future) -> torch.Tensor:
        summed = f.value()[0]
        buf.copy_((summed.to(scale.dtype) * scale / n).to(buf.dtype))
        return buf

    return fut.then(decode)
