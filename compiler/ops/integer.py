"""``squeezer::int_linear`` / ``squeezer::int_conv2d``: layers whose weights are integers with one
scale per output channel and whose input is quantized to unsigned integers inside the op — the
storage and arithmetic of 8-bit (and narrower) integer inference, as ONNX Runtime's QLinear ops and
PyTorch's x86 quantizer define it (Jacob et al., "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", CVPR 2018).

Activations (per tensor, asymmetric): ``q = clamp(round(x * inv_scale) + zero_point, 0, 2^a_bits - 1)``
with ``inv_scale = float32(1) / float32(x_scale)`` and round-half-even (the kernel computes the same
float32 product, so the codes are identical); NaN quantizes to the zero point (an integer has no
NaN). Conv padding is the zero point, i.e. a real 0.

Weights (per output channel, symmetric): ``W[n] = w_scale[n] * w_codes[n]`` with int8 codes in
``[-(2^(w_bits-1) - 1), 2^(w_bits-1) - 1]``.

Output: ``y = float32(core) * float32(x_scale * w_scale[n]) + bias[n]`` where the integer core is
``sum_k (q_k - zero_point) * w_codes[n, k]``, exact in int32/int64. Codegen runs the core as
``vpdpbusd`` (u8 × s8 → s32) with ``zero_point * sum_k w_codes[n, k]`` subtracted once per output.
"""

from __future__ import annotations

import math
from typing import List

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .library import CompressedLayer, register_compressed_op

INT_LINEAR = register_compressed_op("int_linear", "int8 weights per channel, uint8 activations: VNNI dense")
INT_CONV2D = register_compressed_op("int_conv2d", "int8 weights per channel, uint8 activations: VNNI conv")


def inverse_scale(x_scale: float) -> float:
    """The float32 reciprocal both the reference and the kernel multiply by."""
    return float(np.float32(1.0) / np.float32(x_scale))


def quantize_codes(x: torch.Tensor, x_scale: float, x_zero: int, a_bits: int) -> torch.Tensor:
    """Activation codes (int64) as the kernel computes them (module docstring)."""
    inv = torch.tensor(inverse_scale(x_scale), dtype=torch.float32)
    q = torch.round(x.float() * inv) + x_zero
    q = torch.where(torch.isnan(q), torch.full_like(q, x_zero), q)
    return q.clamp(0, 2 ** a_bits - 1).to(torch.int64)


def output_scale(x_scale: float, w_scale: torch.Tensor) -> torch.Tensor:
    """float32(x_scale * w_scale[n]), the one multiplier per output channel."""
    return torch.tensor(np.float32(x_scale) * w_scale.detach().cpu().numpy().astype(np.float32))


def _check(w_codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor, x_scale: float, x_zero: int,
           a_bits: int) -> None:
    if w_codes.dtype != torch.int8:
        raise ValueError(f"w_codes must be int8, got {w_codes.dtype}")
    n = w_codes.shape[0]
    if w_scale.numel() != n or bias.numel() != n:
        raise ValueError(f"w_scale and bias need one value per output channel ({n}), got "
                         f"{w_scale.numel()} and {bias.numel()}")
    if not 2 <= a_bits <= 8:
        raise ValueError(f"a_bits must be in 2..8 (unsigned codes in one byte), got {a_bits}")
    if not (math.isfinite(x_scale) and x_scale > 0):
        raise ValueError(f"x_scale must be a finite positive number, got {x_scale}")
    if not 0 <= x_zero <= 2 ** a_bits - 1:
        raise ValueError(f"x_zero must be a code in 0..{2 ** a_bits - 1}, got {x_zero}")


def _check_groups(c_in: int, w_shape, groups: int) -> None:
    """A grouped conv's shapes: C_in = groups × the weight's input channels, outputs divisible."""
    if groups < 1 or w_shape[0] % groups or c_in != w_shape[1] * groups:
        raise ValueError(f"groups={groups} does not fit {c_in} input channels and w_codes {tuple(w_shape)} "
                         "(need C_in == groups × w_codes.shape[1] and out channels divisible by groups)")


def _dequantize(core: torch.Tensor, x_scale: float, w_scale: torch.Tensor, bias: torch.Tensor, channel_dim: int,
                dtype: torch.dtype) -> torch.Tensor:
    shape = [1] * core.dim()
    shape[channel_dim] = -1
    scale = output_scale(x_scale, w_scale).to(core.device).reshape(shape)
    return (core.to(torch.float32) * scale + bias.float().reshape(shape)).to(dtype)


# ---- the ops (reference implementations: the integer core exact in float64, |core| < 2^53) -------
@torch.library.custom_op("squeezer::int_linear", mutates_args=())
def int_linear(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor, x_scale: float,
               x_zero: int, a_bits: int) -> torch.Tensor:
    _check(w_codes, w_scale, bias, x_scale, x_zero, a_bits)
    q = (quantize_codes(x, x_scale, x_zero, a_bits) - x_zero).double()
    core = torch.round(q @ w_codes.double().T).to(torch.int64)
    return _dequantize(core, x_scale, w_scale, bias, -1, x.dtype)


@int_linear.register_fake
def _int_linear_fake(x, w_codes, w_scale, bias, x_scale, x_zero, a_bits):
    return x.new_empty((*x.shape[:-1], w_codes.shape[0]))


@torch.library.custom_op("squeezer::int_conv2d", mutates_args=())
def int_conv2d(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor, x_scale: float,
               x_zero: int, a_bits: int, stride: List[int], padding: List[int], dilation: List[int],
               groups: int = 1) -> torch.Tensor:
    _check(w_codes, w_scale, bias, x_scale, x_zero, a_bits)
    _check_groups(x.shape[1], w_codes.shape, groups)
    # padding with the zero point = padding (q - zero_point) with 0
    q = (quantize_codes(x, x_scale, x_zero, a_bits) - x_zero).double()
    core = torch.round(F.conv2d(q, w_codes.double(), None, stride, padding, dilation, groups)).to(torch.int64)
    return _dequantize(core, x_scale, w_scale, bias, 1, x.dtype)


@int_conv2d.register_fake
def _int_conv2d_fake(x, w_codes, w_scale, bias, x_scale, x_zero, a_bits, stride, padding, dilation, groups=1):
    b, _, h, w = x.shape
    kh, kw = w_codes.shape[2:]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((b, w_codes.shape[0], oh, ow))


# ---- the layers ----------------------------------------------------------------------------------------
class _IntLayer(CompressedLayer):
    def _store(self, w_codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, x_scale: float,
               x_zero: int, a_bits: int, w_bits: int) -> None:
        if not 2 <= w_bits <= 8:
            raise ValueError(f"{type(self).__name__}: w_bits must be in 2..8, got {w_bits}")
        top = 2 ** (w_bits - 1) - 1
        codes = w_codes.detach().cpu()
        if codes.dtype.is_floating_point and not torch.equal(codes, codes.round()):
            raise ValueError(f"{type(self).__name__}: w_codes must be integers")
        if codes.numel() and int(codes.abs().max()) > top:
            raise ValueError(f"{type(self).__name__}: w_codes exceed ±{top} ({w_bits}-bit symmetric)")
        n = codes.shape[0]
        bias = torch.zeros(n) if bias is None else bias.detach().float().reshape(-1)
        self.register_buffer("w_codes", codes.to(torch.int8).contiguous())
        self.register_buffer("w_scale", w_scale.detach().float().reshape(-1).clone())
        self.bias = nn.Parameter(bias.clone())
        self.x_scale, self.x_zero, self.a_bits, self.w_bits = float(x_scale), int(x_zero), int(a_bits), int(w_bits)
        _check(self.w_codes, self.w_scale, self.bias, self.x_scale, self.x_zero, self.a_bits)

    def dense_weight(self) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.w_codes.dim() - 1)
        return self.w_codes.double() * self.w_scale.double().reshape(shape)


class IntLinear(_IntLayer):
    """A Linear on integer weights and quantized activations (module docstring)."""

    op = INT_LINEAR

    def __init__(self, w_codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, x_scale: float,
                 x_zero: int, a_bits: int = 8, w_bits: int = 8) -> None:
        super().__init__()
        if w_codes.ndim != 2:
            raise ValueError(f"IntLinear: w_codes must be (out, in), got {tuple(w_codes.shape)}")
        self.out_features, self.in_features = (int(d) for d in w_codes.shape)
        self._store(w_codes, w_scale, bias, x_scale, x_zero, a_bits, w_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int_linear(x, self.w_codes, self.w_scale, self.bias, self.x_scale, self.x_zero, self.a_bits)

    def dense_params(self) -> int:
        return self.in_features * self.out_features + self.out_features

    def macs(self, input_shape, output_shape) -> int:
        return int(np.prod(output_shape)) * self.in_features

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, w_bits={self.w_bits}, "
                f"a_bits={self.a_bits}, x_scale={self.x_scale:.4g}, x_zero={self.x_zero}")


class IntConv2d(_IntLayer):
    """A Conv2d (any groups, depthwise included; zero padding) on integer weights and quantized
    activations."""

    op = INT_CONV2D

    def __init__(self, w_codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, x_scale: float,
                 x_zero: int, a_bits: int = 8, w_bits: int = 8, stride=(1, 1), padding=(0, 0),
                 dilation=(1, 1), groups: int = 1) -> None:
        super().__init__()
        if w_codes.ndim != 4:
            raise ValueError(f"IntConv2d: w_codes must be (out, in/groups, kh, kw), got {tuple(w_codes.shape)}")
        self.out_channels, per_group, kh, kw = (int(d) for d in w_codes.shape)
        self.groups, self.in_channels = int(groups), per_group * int(groups)
        _check_groups(self.in_channels, w_codes.shape, self.groups)
        self.kernel_size = (kh, kw)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self._store(w_codes, w_scale, bias, x_scale, x_zero, a_bits, w_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int_conv2d(x, self.w_codes, self.w_scale, self.bias, self.x_scale, self.x_zero, self.a_bits,
                          list(self.stride), list(self.padding), list(self.dilation), self.groups)

    def dense_params(self) -> int:
        return self.w_codes.numel() + self.out_channels

    def macs(self, input_shape, output_shape) -> int:
        return int(np.prod(output_shape)) * (self.in_channels // self.groups) * math.prod(self.kernel_size)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, w_bits={self.w_bits}, a_bits={self.a_bits}, "
                f"x_scale={self.x_scale:.4g}, x_zero={self.x_zero}")
