"""``squeezer::hashed_linear``: a Linear whose weight matrix is virtual, drawn from a bucket array by a hash.

HashedNets (Chen, Wilson, Tyree, Weinberger & Chen, "Compressing Neural Networks with the Hashing
Trick", ICML 2015): the (out, in) weight ``V`` of a layer is never stored; entry ``V[i, j] =
ξ(i, j) · w[h(i, j)]`` reads one of the ``K`` shared buckets ``w`` through a hash ``h`` of its
position, with a second hash ``ξ(i, j) ∈ {+1, -1}`` for the sign (the paper's Section 4.3, which
removes the bias of the inner products). Only ``w`` (and the bias) is stored and trained; a bucket's
gradient is the sum of ``ξ · ∂L/∂V`` over the positions hashing to it (the paper's Eq. 12), which
autograd of the reference implementation gives.

The hash is a cheap, well-defined 32-bit integer hash that the compiled kernel evaluates too (the
model stores no index): with ``key = (i * in_features + j) mod 2**32``,
``mix(key, s) = lowbias32((key + s * 0x9E3779B9) mod 2**32)`` (Wellons' "lowbias32" integer
hash, ``x ^= x >> 16; x *= 0x21F0AAAD; x ^= x >> 15; x *= 0x735A2D97; x ^= x >> 15``, all mod 2**32),
``h(i, j) = mix(key, 2·seed) mod K`` and ``ξ(i, j) = +1`` if the top bit of
``mix(key, 2·seed + 1)`` is 0, else ``-1``. Both multipliers are below 2**31, so torch evaluates it
exactly in int64 (each product below 2**63, masked to 32 bits) and TVM in uint32 arithmetic.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .library import CompressedLayer, register_compressed_op

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9           # seed spreading: s * golden ratio (mod 2**32)
MUL1, MUL2 = 0x21F0AAAD, 0x735A2D97
SHIFTS = (16, 15, 15)
MAX_SEED = 2 ** 30            # 2·seed + 1 stays a small non-negative int
HASHED_LINEAR = register_compressed_op(
    "hashed_linear", "y = x @ V.T + bias, V[i, j] = xi(i, j) * buckets[h(i, j)] (hash computed, not stored)")


def seed_offset(stream: int) -> int:
    """``stream * 0x9E3779B9 mod 2**32`` (a Python int: exact for any stream)."""
    return (int(stream) * GOLDEN) & MASK32


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """The integer hash on int64 tensors holding values in [0, 2**32) (results in the same range)."""
    x = x ^ (x >> SHIFTS[0])
    x = (x * MUL1) & MASK32
    x = x ^ (x >> SHIFTS[1])
    x = (x * MUL2) & MASK32
    return x ^ (x >> SHIFTS[2])


def position_hash(keys: torch.Tensor, stream: int) -> torch.Tensor:
    """``mix(key, stream)`` for int64 keys in [0, 2**32)."""
    return lowbias32((keys + seed_offset(stream)) & MASK32)


@lru_cache(maxsize=64)
def hash_tables(out_features: int, in_features: int, buckets: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bucket index (out, in) int64, sign (out, in) float32) of every position (cached: a pure function)."""
    keys = (torch.arange(out_features, dtype=torch.int64)[:, None] * in_features
            + torch.arange(in_features, dtype=torch.int64)[None, :]) & MASK32
    idx = position_hash(keys, 2 * seed) % buckets
    sign = 1.0 - 2.0 * (position_hash(keys, 2 * seed + 1) >> 31).float()
    return idx, sign


def virtual_weight(buckets: torch.Tensor, seed: int, out_features: int, in_features: int) -> torch.Tensor:
    """``V[i, j] = ξ(i, j) · buckets[h(i, j)]`` (differentiable in ``buckets``)."""
    idx, sign = hash_tables(int(out_features), int(in_features), int(buckets.numel()), int(seed))
    return sign.to(buckets.device, buckets.dtype) * buckets[idx.to(buckets.device)]


@torch.library.custom_op("squeezer::hashed_linear", mutates_args=())
def hashed_linear(x: torch.Tensor, buckets: torch.Tensor, bias: Optional[torch.Tensor], seed: int,
                  out_features: int, in_features: int) -> torch.Tensor:
    return F.linear(x, virtual_weight(buckets, seed, out_features, in_features), bias)


@hashed_linear.register_fake
def _hashed_linear_fake(x, buckets, bias, seed, out_features, in_features):
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output):
    x, buckets, bias, seed, out_features, in_features = inputs
    ctx.save_for_backward(x, buckets)
    ctx.conf = (seed, out_features, in_features)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    x, buckets = ctx.saved_tensors
    seed, n, k = ctx.conf
    idx, sign = hash_tables(int(n), int(k), int(buckets.numel()), int(seed))
    grad_x = grad_out @ virtual_weight(buckets, seed, n, k)
    g2 = grad_out.reshape(-1, n)
    grad_v = g2.T @ x.reshape(-1, k)                                   # dL/dV, (out, in)
    grad_b = torch.zeros_like(buckets).index_add_(0, idx.reshape(-1).to(buckets.device),
                                                  (sign.to(grad_v.device) * grad_v).reshape(-1))
    return grad_x, grad_b, (g2.sum(0) if ctx.has_bias else None), None, None, None


hashed_linear.register_autograd(_backward, setup_context=_setup_context)


class HashedLinear(CompressedLayer):
    """Drop-in for ``nn.Linear`` storing ``K`` buckets (HashedNets); the weight is hashed on the fly."""

    op = HASHED_LINEAR

    def __init__(self, buckets: torch.Tensor, bias: torch.Tensor | None, seed: int, out_features: int,
                 in_features: int) -> None:
        super().__init__()
        if buckets.ndim != 1 or buckets.numel() < 1:
            raise ValueError(f"HashedLinear: buckets must be 1-D and non-empty, got shape {tuple(buckets.shape)}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
            raise ValueError(f"HashedLinear: seed must be an integer in [0, {MAX_SEED}), got {seed!r}")
        if out_features < 1 or in_features < 1 or out_features * in_features > 2 ** 32:
            raise ValueError(f"HashedLinear: ({out_features}, {in_features}) positions must number 1 .. 2**32")
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"HashedLinear: bias must have shape ({out_features},), got {tuple(bias.shape)}")
        self.seed, self.out_features, self.in_features = int(seed), int(out_features), int(in_features)
        self.buckets = nn.Parameter(buckets.detach().clone().float())
        self.bias = nn.Parameter(bias.detach().clone().float()) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, buckets: int, seed: int = 0) -> "HashedLinear":
        """The bucket array closest to ``linear.weight`` in least squares: each bucket the mean of
        ``ξ · W`` over the positions hashing to it (0 for a bucket no position reaches)."""
        n, k = linear.out_features, linear.in_features
        idx, sign = hash_tables(n, k, int(buckets), int(seed))
        w = (sign * linear.weight.detach().float().cpu()).reshape(-1)
        sums = torch.zeros(buckets).index_add_(0, idx.reshape(-1), w)
        counts = torch.bincount(idx.reshape(-1), minlength=buckets).clamp_min(1)
        return cls(sums / counts, linear.bias, seed, n, k)

    @property
    def num_buckets(self) -> int:
        return int(self.buckets.numel())

    def decoded_weight(self) -> torch.Tensor:
        return virtual_weight(self.buckets, self.seed, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hashed_linear(x, self.buckets, self.bias, self.seed, self.out_features, self.in_features)

    def dense_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def macs(self, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> int:
        return math.prod(output_shape) * self.in_features

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, buckets={self.num_buckets}, "
                f"seed={self.seed}, bias={self.bias is not None}")
