"""``squeezer::int4_linear`` / ``squeezer::int4_conv2d``: 4-bit (or narrower) weights packed two
to a byte with one scale per *group* of input channels — the weight-only grouping of GPTQ/AWQ and
llama.cpp's Q4 formats, which per-output-channel scales cannot match at 4 bits — and activations
quantized per tensor inside the op exactly as ``squeezer::int_linear`` does (compiler/ops/integer.py).

Groups. The weight is read as ``(N, T, C)``: N outputs, T taps (1 for a Linear, ``kh·kw`` for a
conv, tap ``ky·kw + kx``) and C input channels per tap. Each tap's channels are cut into
``G = ceil(C / group_size)`` groups (the last may be short); ``w_scale`` is ``(N, T·G)``, the
scale of group ``g`` of tap ``t`` at ``[n, t·G + g]``.

Storage. The codes ``c ∈ [-(2^(b-1) - 1), 2^(b-1) - 1]`` in torch's weight order (a conv's
``(c, ky, kx)``), flattened per output and padded to an even count, stored as ``c + 8`` in 4-bit
nibbles, the even element in the low nibble: ``w_packed`` is ``(N, ceil(K / 2))`` uint8.

Arithmetic. Each group's integer core ``core[g] = Σ_{k∈g} (q_k − z) · c[n, k]`` is exact (int32);
the output is ``y = bias[n] + Σ_g float32(core[g]) · float32(x_scale · w_scale[n, g])``, the
float sum over groups in float32 (the kernels and this reference add the terms in different
orders, so they agree to float32 rounding, not bit for bit).
"""

from __future__ import annotations

import math
from typing import List

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .integer import _check_groups, output_scale, quantize_codes
from .library import CompressedLayer, register_compressed_op

INT4_LINEAR = register_compressed_op("int4_linear", "4-bit weights in groups, uint8 activations: VNNI dense")
INT4_CONV2D = register_compressed_op("int4_conv2d", "4-bit weights in groups, uint8 activations: VNNI conv")
OFFSET = 8          # a stored nibble is code + 8
WORD_CODES = 8      # codes per 32-bit word of the kernels' packed weights: group sizes are multiples


def groups_per_tap(channels: int, group_size: int) -> int:
    return -(-channels // group_size)


def group_index(weight_shape: tuple[int, ...], group_size: int) -> torch.Tensor:
    """For each weight element after the output axis (torch order), the column of ``w_scale``
    holding its group's scale: a Linear's ``k // group_size``, a conv's ``tap·G + c // group_size``."""
    if len(weight_shape) == 2:
        return torch.arange(weight_shape[1]) // group_size
    _, c, kh, kw = weight_shape
    g = groups_per_tap(c, group_size)
    tap = torch.arange(kh * kw).reshape(1, kh, kw)
    return tap * g + (torch.arange(c) // group_size).reshape(c, 1, 1)


def check_group_size(group_size: int, where: str) -> None:
    if not (isinstance(group_size, int) and group_size > 0 and group_size % WORD_CODES == 0):
        raise ValueError(f"{where}: group_size must be a positive multiple of {WORD_CODES} (codes per packed word), "
                         f"got {group_size!r}")


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, ...) integer codes in [-7, 7] -> (N, ceil(K/2)) uint8 (module docstring)."""
    flat = codes.reshape(codes.shape[0], -1).to(torch.int16) + OFFSET
    if flat.shape[1] % 2:
        flat = F.pad(flat, (0, 1), value=OFFSET)
    return (flat[:, 0::2] | (flat[:, 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    """(N, ceil(K/2)) uint8 -> (N, K) int8 codes."""
    p = packed.to(torch.int16)
    both = torch.stack([p & 15, p >> 4], dim=2).reshape(p.shape[0], -1)[:, :k]
    return (both - OFFSET).to(torch.int8)


def _check(w_packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor, n: int, k: int, scales: int,
           x_scale: float, x_zero: int, a_bits: int, group_size: int) -> None:
    check_group_size(group_size, "int4 layer")
    if w_packed.dtype != torch.uint8 or tuple(w_packed.shape) != (n, -(-k // 2)):
        raise ValueError(f"w_packed must be uint8 ({n}, {-(-k // 2)}) for {n} outputs of {k} weights, got "
                         f"{w_packed.dtype} {tuple(w_packed.shape)}")
    if tuple(w_scale.shape) != (n, scales) or bias.numel() != n:
        raise ValueError(f"w_scale must be ({n}, {scales}) (one scale per output and group) and bias ({n},), got "
                         f"{tuple(w_scale.shape)} and {bias.numel()}")
    if not 2 <= a_bits <= 8:
        raise ValueError(f"a_bits must be in 2..8 (unsigned codes in one byte), got {a_bits}")
    if not (math.isfinite(x_scale) and x_scale > 0):
        raise ValueError(f"x_scale must be a finite positive number, got {x_scale}")
    if not 0 <= x_zero <= 2 ** a_bits - 1:
        raise ValueError(f"x_zero must be a code in 0..{2 ** a_bits - 1}, got {x_zero}")


def _combine(cores: torch.Tensor, x_scale: float, w_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(..., N, T·G) exact cores -> (..., N) float32 outputs, each group's core times
    float32(x_scale · w_scale[n, g])."""
    s = output_scale(x_scale, w_scale).reshape(w_scale.shape).to(cores.device)
    return (cores.to(torch.float32) * s).sum(-1) + bias.float()


def _tap_groups(t: torch.Tensor, channels: int, group_size: int) -> torch.Tensor:
    """(..., T, C) -> (..., T·G, group_size), each tap's channels zero-padded to whole groups."""
    g = groups_per_tap(channels, group_size)
    t = F.pad(t, (0, g * group_size - channels))
    return t.reshape(*t.shape[:-2], t.shape[-2] * g, group_size)


@torch.library.custom_op("squeezer::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor, x_scale: float,
                x_zero: int, a_bits: int, group_size: int) -> torch.Tensor:
    n, k = w_packed.shape[0], x.shape[-1]
    _check(w_packed, w_scale, bias, n, k, groups_per_tap(k, group_size), x_scale, x_zero, a_bits, group_size)
    q = (quantize_codes(x, x_scale, x_zero, a_bits) - x_zero).double().reshape(-1, 1, k)
    w = unpack_nibbles(w_packed, k).double().reshape(n, 1, k)
    cores = torch.einsum("mgi,ngi->mng", _tap_groups(q, k, group_size), _tap_groups(w, k, group_size))
    return _combine(torch.round(cores), x_scale, w_scale, bias).reshape(*x.shape[:-1], n).to(x.dtype)


@int4_linear.register_fake
def _int4_linear_fake(x, w_packed, w_scale, bias, x_scale, x_zero, a_bits, group_size):
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]))


def conv_out_hw(hw, kernel, stride, padding, dilation) -> tuple[int, int]:
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                 for size, p, d, k, s in zip(hw, padding, dilation, kernel, stride))


@torch.library.custom_op("squeezer::int4_conv2d", mutates_args=())
def int4_conv2d(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor, x_scale: float,
                x_zero: int, a_bits: int, group_size: int, kernel_size: List[int], stride: List[int],
                padding: List[int], dilation: List[int]) -> torch.Tensor:
    b, c, h, w = x.shape
    (kh, kw), n = kernel_size, w_packed.shape[0]
    _check(w_packed, w_scale, bias, n, c * kh * kw, kh * kw * groups_per_tap(c, group_size), x_scale, x_zero, a_bits,
           group_size)
    oh, ow = conv_out_hw((h, w), kernel_size, stride, padding, dilation)
    # padding with the zero point = padding (q - zero_point) with 0; unfold's rows are (c, ky, kx)
    q = (quantize_codes(x, x_scale, x_zero, a_bits) - x_zero).double()
    cols = F.unfold(q, kernel_size, dilation, padding, stride).reshape(b, c, kh * kw, oh * ow)
    rows = _tap_groups(cols.permute(0, 3, 2, 1), c, group_size)                  # (B, L, T·G, gs)
    wt = unpack_nibbles(w_packed, c * kh * kw).double().reshape(n, c, kh * kw).permute(0, 2, 1)
    cores = torch.einsum("blgi,ngi->blng", rows, _tap_groups(wt, c, group_size))
    y = _combine(torch.round(cores), x_scale, w_scale, bias)                     # (B, L, N)
    return y.permute(0, 2, 1).reshape(b, n, oh, ow).to(x.dtype)


@int4_conv2d.register_fake
def _int4_conv2d_fake(x, w_packed, w_scale, bias, x_scale, x_zero, a_bits, group_size, kernel_size, stride, padding,
                      dilation):
    oh, ow = conv_out_hw(x.shape[2:], kernel_size, stride, padding, dilation)
    return x.new_empty((x.shape[0], w_packed.shape[0], oh, ow))


class _Int4Layer(CompressedLayer):
    def _store(self, w_codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, x_scale: float,
               x_zero: int, a_bits: int, w_bits: int, group_size: int) -> None:
        where = type(self).__name__
        check_group_size(group_size, where)
        if not 2 <= w_bits <= 4:
            raise ValueError(f"{where}: w_bits must be in 2..4 (two codes per byte), got {w_bits}")
        top = 2 ** (w_bits - 1) - 1
        codes = w_codes.detach().cpu()
        if codes.dtype.is_floating_point and not torch.equal(codes, codes.round()):
            raise ValueError(f"{where}: w_codes must be integers")
        if codes.numel() and int(codes.abs().max()) > top:
            raise ValueError(f"{where}: w_codes exceed ±{top} ({w_bits}-bit symmetric)")
        n = codes.shape[0]
        self.register_buffer("w_packed", pack_nibbles(codes))
        self.register_buffer("w_scale", w_scale.detach().float().reshape(n, -1).clone())
        self.bias = nn.Parameter(torch.zeros(n) if bias is None else bias.detach().float().reshape(-1).clone())
        self.x_scale, self.x_zero, self.a_bits = float(x_scale), int(x_zero), int(a_bits)
        self.w_bits, self.group_size = int(w_bits), int(group_size)
        self._weights = codes[0].numel()
        _check(self.w_packed, self.w_scale, self.bias, n, self._weights, self._scales(), self.x_scale, self.x_zero,
               self.a_bits, self.group_size)

    def codes(self) -> torch.Tensor:
        """The integer codes in the layer's weight shape."""
        return unpack_nibbles(self.w_packed, self._weights).reshape(self.weight_shape)

    def dense_weight(self) -> torch.Tensor:
        index = group_index(self.weight_shape, self.group_size)
        return self.codes().double() * self.w_scale.double()[:, index]


class Int4Linear(_Int4Layer):
    """A Linear on grouped 4-bit weights and quantized activations (module docstring)."""

    op = INT4_LINEAR

    def __init__(self, w_codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, x_scale: float,
                 x_zero: int, a_bits: int = 8, w_bits: int = 4, group_size: int = 128) -> None:
        super().__init__()
        if w_codes.ndim != 2:
            raise ValueError(f"Int4Linear: w_codes must be (out, in), got {tuple(w_codes.shape)}")
        self.out_features, self.in_features = (int(d) for d in w_codes.shape)
        self.weight_shape = (self.out_features, self.in_features)
        self._store(w_codes, w_scale, bias, x_scale, x_zero, a_bits, w_bits, group_size)

    def _scales(self) -> int:
        return groups_per_tap(self.in_features, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, self.w_packed, self.w_scale, self.bias, self.x_scale, self.x_zero, self.a_bits,
                           self.group_size)

    def dense_params(self) -> int:
        return self.in_features * self.out_features + self.out_features

    def macs(self, input_shape, output_shape) -> int:
        return int(np.prod(output_shape)) * self.in_features

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, w_bits={self.w_bits}, "
                f"group_size={self.group_size}, a_bits={self.a_bits}, x_scale={self.x_scale:.4g}, x_zero={self.x_zero}")


class Int4Conv2d(_Int4Layer):
    """A Conv2d (groups=1, zero padding) on grouped 4-bit weights and quantized activations."""

    op = INT4_CONV2D

    def __init__(self, w_codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, x_scale: float,
                 x_zero: int, a_bits: int = 8, w_bits: int = 4, group_size: int = 128, stride=(1, 1), padding=(0, 0),
                 dilation=(1, 1)) -> None:
        super().__init__()
        if w_codes.ndim != 4:
            raise ValueError(f"Int4Conv2d: w_codes must be (out, in, kh, kw), got {tuple(w_codes.shape)}")
        self.out_channels, self.in_channels, kh, kw = (int(d) for d in w_codes.shape)
        _check_groups(self.in_channels, w_codes.shape, 1)
        self.kernel_size, self.weight_shape = (kh, kw), tuple(int(d) for d in w_codes.shape)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self._store(w_codes, w_scale, bias, x_scale, x_zero, a_bits, w_bits, group_size)

    def _scales(self) -> int:
        return math.prod(self.kernel_size) * groups_per_tap(self.in_channels, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_conv2d(x, self.w_packed, self.w_scale, self.bias, self.x_scale, self.x_zero, self.a_bits,
                           self.group_size, list(self.kernel_size), list(self.stride), list(self.padding),
                           list(self.dilation))

    def dense_params(self) -> int:
        return self._weights * self.out_channels + self.out_channels

    def macs(self, input_shape, output_shape) -> int:
        return int(np.prod(output_shape)) * self._weights

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, w_bits={self.w_bits}, group_size={self.group_size}, a_bits={self.a_bits}, "
                f"x_scale={self.x_scale:.4g}, x_zero={self.x_zero}")
