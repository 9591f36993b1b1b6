"""``squeezer::lut_linear``: a Linear whose weights are b-bit indices into a shared codebook.

This is the storage of weight sharing in Deep Compression (Han, Mao & Dally, ICLR 2016): each
weight is an index into ``2**bits`` centroids, indices bit-packed ``8 // bits`` per byte
(little-endian within a byte: index ``k`` lives in byte ``k*bits // 8`` at bit ``k*bits % 8``).
The op decodes indices on the fly, so a compiled kernel reads the packed bytes, never a dense
fp32 weight. Gradients flow to ``x``, ``bias`` and — as in the paper's centroid fine-tuning — to
the codebook as the sum of the gradients of all weights sharing a centroid.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .library import CompressedLayer, register_compressed_op

SUPPORTED_BITS = (1, 2, 4, 8)
LUT_LINEAR = register_compressed_op("lut_linear", "y = x @ codebook[unpack(indices)].T + bias")


def pack_indices(indices: np.ndarray | torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) integer indices < 2**bits -> (N, ceil(K*bits/8)) uint8, little-endian in each byte."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} not supported; allowed {SUPPORTED_BITS}")
    idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
    if idx.ndim != 2:
        raise ValueError(f"indices must be 2-D (out_features, in_features), got shape {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= 2 ** bits):
        raise ValueError(f"indices must lie in [0, {2 ** bits}) for bits={bits}")
    n, k = idx.shape
    per_byte = 8 // bits
    pad = (-k) % per_byte
    idx = F.pad(idx, (0, pad)).reshape(n, -1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int64) * bits
    return (idx << shifts).sum(-1).to(torch.uint8)


def lookup(codebook: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Centroid of each (row, column) index: one shared codebook (k,) or one per row (rows, k)."""
    if codebook.ndim == 1:
        return codebook[idx]
    return codebook.gather(1, idx.reshape(idx.shape[0], -1)).reshape(idx.shape)


def lookup_rows(codebook: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Centroids of entries with cluster index ``idx`` in rows ``rows`` (sparse storage)."""
    return codebook[idx] if codebook.ndim == 1 else codebook[rows, idx]


def codebook_grad(codebook: torch.Tensor, idx: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Deep Compression's centroid gradient: the sum of the gradients of each cluster's weights.
    ``idx``/``grad`` are (rows, cols) for dense storage; flat with ``rows`` for sparse."""
    if codebook.ndim == 1:
        return torch.zeros_like(codebook).index_add_(0, idx.reshape(-1), grad.reshape(-1))
    if rows is None:
        rows = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1).expand_as(idx)
    flat = rows.reshape(-1) * codebook.shape[1] + idx.reshape(-1)
    return torch.zeros_like(codebook).reshape(-1).index_add_(0, flat, grad.reshape(-1)).reshape(codebook.shape)


def check_codebook(name: str, codebook: torch.Tensor, rows: int, max_entries: int) -> None:
    ok = (codebook.ndim == 1 and codebook.numel() <= max_entries) or \
        (codebook.ndim == 2 and codebook.shape[0] == rows and codebook.shape[1] <= max_entries)
    if not ok:
        raise ValueError(f"{name}: codebook must be (k,) or per output channel ({rows}, k) with k <= {max_entries}, "
                         f"got {tuple(codebook.shape)}")


def unpack_indices(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: (N, bytes) uint8 -> (N, in_features) int64."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int64, device=packed.device) * bits
    vals = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    return vals.reshape(packed.shape[0], -1)[:, :in_features]


@torch.library.custom_op("squeezer::lut_linear", mutates_args=())
def lut_linear(x: torch.Tensor, packed: torch.Tensor, codebook: torch.Tensor,
               bias: Optional[torch.Tensor], bits: int, in_features: int) -> torch.Tensor:
    weight = lookup(codebook, unpack_indices(packed, bits, in_features))
    return F.linear(x, weight, bias)


@lut_linear.register_fake
def _lut_linear_fake(x, packed, codebook, bias, bits, in_features):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _setup_context(ctx, inputs, output):
    x, packed, codebook, bias, bits, in_features = inputs
    ctx.save_for_backward(x, packed, codebook)
    ctx.bits, ctx.in_features, ctx.has_bias = bits, in_features, bias is not None


def _backward(ctx, grad_out):
    x, packed, codebook = ctx.saved_tensors
    idx = unpack_indices(packed, ctx.bits, ctx.in_features)
    weight = lookup(codebook, idx)
    grad_x = grad_out @ weight
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    grad_w = g2.T @ x.reshape(-1, x.shape[-1])                      # (N, K) dense weight gradient
    grad_cb = codebook_grad(codebook, idx, grad_w)
    grad_b = g2.sum(0) if ctx.has_bias else None
    return grad_x, None, grad_cb, grad_b, None, None


lut_linear.register_autograd(_backward, setup_context=_setup_context)


class LutLinear(CompressedLayer):
    """Drop-in replacement for ``nn.Linear`` storing packed b-bit indices and a codebook."""

    op = LUT_LINEAR

    def __init__(self, packed: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor | None,
                 bits: int, in_features: int) -> None:
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"LutLinear: bits={bits} not supported; allowed {SUPPORTED_BITS}")
        check_codebook("LutLinear", codebook, packed.shape[0] if packed.ndim == 2 else -1, 2 ** bits)
        expected = -(-in_features * bits // 8)
        if packed.dtype != torch.uint8 or packed.ndim != 2 or packed.shape[1] != expected:
            raise ValueError(f"LutLinear: packed must be uint8 of shape (out, {expected}), got "
                             f"{packed.dtype} {tuple(packed.shape)}")
        if bias is not None and tuple(bias.shape) != (packed.shape[0],):
            raise ValueError(f"LutLinear: bias must have shape ({packed.shape[0]},), got {tuple(bias.shape)}")
        used = int(unpack_indices(packed, bits, in_features).max()) if packed.numel() else -1
        if used >= codebook.shape[-1]:
            raise ValueError(f"LutLinear: indices reach {used} but the codebook has {codebook.shape[-1]} entries")
        self.bits, self.in_features, self.out_features = bits, in_features, packed.shape[0]
        self.register_buffer("packed", packed.contiguous())
        self.codebook = nn.Parameter(codebook.detach().clone().float())
        self.bias = nn.Parameter(bias.detach().clone().float()) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, codebook: torch.Tensor | None = None) -> "LutLinear":
        """Quantize ``linear`` to the nearest entry of ``codebook`` (default: ``2**bits`` centroids
        spaced linearly over [min, max] of the weights — the paper's linear initialization)."""
        w = linear.weight.detach().float()
        if codebook is None:
            codebook = torch.linspace(float(w.min()), float(w.max()), 2 ** bits)
        codebook = codebook.detach().float()
        idx = (w.unsqueeze(-1) - codebook).abs().argmin(-1)
        return cls(pack_indices(idx, bits), codebook, linear.bias, bits, linear.in_features)

    def decoded_weight(self) -> torch.Tensor:
        return lookup(self.codebook, unpack_indices(self.packed, self.bits, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lut_linear(x, self.packed, self.codebook, self.bias, self.bits, self.in_features)

    def dense_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def macs(self, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> int:
        return int(np.prod(output_shape)) * self.in_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, bias={self.bias is not None}"


# ---- the conv form: rows are output channels, columns the flattened (in, kh, kw) window ---------------
LUT_CONV2D = register_compressed_op("lut_conv2d", "y = conv2d(x, codebook[unpack(indices)] as (Co,Ci,kh,kw)) + bias")


@torch.library.custom_op("squeezer::lut_conv2d", mutates_args=())
def lut_conv2d(x: torch.Tensor, packed: torch.Tensor, codebook: torch.Tensor, bias: Optional[torch.Tensor],
               bits: int, weight_shape: list[int], stride: list[int], padding: list[int],
               dilation: list[int]) -> torch.Tensor:
    k = int(np.prod(weight_shape[1:]))
    weight = lookup(codebook, unpack_indices(packed, bits, k)).reshape(weight_shape)
    return F.conv2d(x, weight, bias, stride, padding, dilation)


@lut_conv2d.register_fake
def _lut_conv2d_fake(x, packed, codebook, bias, bits, weight_shape, stride, padding, dilation):
    oh = (x.shape[2] + 2 * padding[0] - dilation[0] * (weight_shape[2] - 1) - 1) // stride[0] + 1
    ow = (x.shape[3] + 2 * padding[1] - dilation[1] * (weight_shape[3] - 1) - 1) // stride[1] + 1
    return x.new_empty((x.shape[0], weight_shape[0], oh, ow))


def _conv_setup(ctx, inputs, output):
    x, packed, codebook, bias, bits, weight_shape, stride, padding, dilation = inputs
    ctx.save_for_backward(x, packed, codebook)
    ctx.conf = (bits, list(weight_shape), list(stride), list(padding), list(dilation))
    ctx.has_bias = bias is not None


def _conv_backward(ctx, g):
    x, packed, codebook = ctx.saved_tensors
    bits, shape, stride, padding, dilation = ctx.conf
    idx = unpack_indices(packed, bits, int(np.prod(shape[1:])))
    weight = lookup(codebook, idx).reshape(shape)
    grad_x = torch.nn.grad.conv2d_input(x.shape, weight, g, stride, padding, dilation)
    grad_w = torch.nn.grad.conv2d_weight(x, shape, g, stride, padding, dilation)
    grad_cb = codebook_grad(codebook, idx, grad_w.reshape(shape[0], -1))
    return grad_x, None, grad_cb, (g.sum((0, 2, 3)) if ctx.has_bias else None), None, None, None, None, None


lut_conv2d.register_autograd(_conv_backward, setup_context=_conv_setup)


class LutConv2d(CompressedLayer):
    """Drop-in for a dense (groups=1) ``nn.Conv2d`` storing packed b-bit indices and a codebook."""

    op = LUT_CONV2D

    def __init__(self, packed: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor | None, bits: int,
                 weight_shape, stride, padding, dilation) -> None:
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"LutConv2d: bits={bits} not supported; allowed {SUPPORTED_BITS}")
        self.weight_shape = tuple(int(d) for d in weight_shape)
        if len(self.weight_shape) != 4:
            raise ValueError(f"LutConv2d: weight_shape must be (out, in, kh, kw), got {self.weight_shape}")
        k = int(np.prod(self.weight_shape[1:]))
        expected = (self.weight_shape[0], -(-k * bits // 8))
        if packed.dtype != torch.uint8 or tuple(packed.shape) != expected:
            raise ValueError(f"LutConv2d: packed must be uint8 of shape {expected}, got {packed.dtype} {tuple(packed.shape)}")
        check_codebook("LutConv2d", codebook, self.weight_shape[0], 2 ** bits)
        if bias is not None and tuple(bias.shape) != (self.weight_shape[0],):
            raise ValueError(f"LutConv2d: bias must have shape ({self.weight_shape[0]},)")
        if packed.numel() and int(unpack_indices(packed, bits, k).max()) >= codebook.shape[-1]:
            raise ValueError(f"LutConv2d: indices reach past the codebook's {codebook.shape[-1]} entries")
        self.bits, self.in_features = bits, k
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.out_channels, self.in_channels, self.kernel_size = self.weight_shape[0], self.weight_shape[1], self.weight_shape[2:]
        self.register_buffer("packed", packed.contiguous())
        self.codebook = nn.Parameter(codebook.detach().clone().float())
        self.bias = nn.Parameter(bias.detach().clone().float()) if bias is not None else None

    def decoded_weight(self) -> torch.Tensor:
        return lookup(self.codebook, unpack_indices(self.packed, self.bits, self.in_features)).reshape(self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lut_conv2d(x, self.packed, self.codebook, self.bias, self.bits, list(self.weight_shape),
                          list(self.stride), list(self.padding), list(self.dilation))

    def dense_params(self) -> int:
        return int(np.prod(self.weight_shape)) + (self.weight_shape[0] if self.bias is not None else 0)

    def macs(self, input_shape, output_shape) -> int:
        return int(np.prod(output_shape)) * self.in_features

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, bits={self.bits}")
