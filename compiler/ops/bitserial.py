"""``squeezer::bitserial_linear`` / ``squeezer::bitserial_conv2d``: layers whose weights are stored as
bit-planes, and whose activations are optionally quantized to bit-planes inside the op — the storage
and arithmetic of binary, ternary and few-bit networks (BNN, XNOR-Net, DoReFa, TWN/TTQ, INQ,
ABC-Net/LQ-Nets; the quantizers live in ``passes/binarization.py``).

Weights: ``W[n, k] = alpha[n] * (sum_j e_j * B_j[n, k] + d_w)`` with bit-planes ``B_j`` packed 64 per
little-endian uint64 word (stored as bytes; bit ``t`` of word ``w`` is input feature ``64 w + t``,
padding bits are 0). Binary ±1 is one plane (``e = [2], d_w = -1``), ternary two (``e = [1, -1]``),
k-bit DoReFa k planes (``e_j = 2^(j+1), d_w = -(2^k - 1)``), power-of-two (INQ) and multi-base
(ABC-Net/LQ-Nets) one plane per level/base.

Activations (``a_mode``):
* ``"float"`` — not quantized: ``y = x @ W.T`` with W decoded from its planes inside the kernel.
* ``"sign"`` — ``a = 2 A - 1`` with ``A = [x >= 0]`` (BNN / XNOR-Net). Conv padding is **+1** (a
  real ±1 value, as in Larq's ``pad_values=1``), so every window position is valid and the
  popcount arithmetic is exact without border corrections.
* ``"unsigned"`` — DoReFa's k-bit ``a = round(clip(x, 0, 1) (2^k - 1)) / (2^k - 1)``, planes
  ``A_i`` with weights ``2^i``; zero padding is a zero code.
* ``"ternary"`` — TBN's ternary activation (Wan et al., ECCV 2018) in code units: ``a = [x > 1/2] -
  [x < -1/2]`` as two planes ``P``, ``N`` with ``c = [1, -1]`` (a sign plane and a mask, written as
  AND-popcounts: ``sum_k a_k w_k = popcount(P & B) - popcount(N & B)`` terms); the layer scales its
  input so the threshold lands at 1/2 (passes/binary_survey.py). Zero padding is the zero code.
* ``"absmax"`` (Linear only) — BitNet's k-bit (8 by default) signed per-token quantizer:
  ``s = (2^(k-1) - 1) / max(max_j |x_j|, 1e-5)`` over each row, ``a = clip(round(x s), -2^(k-1),
  2^(k-1) - 1) / s`` (Wang et al., "BitNet", 2023; Ma et al., "The Era of 1-bit LLMs", 2024), with
  round-half-up as the kernel computes it. The codes are integers, so ``sum_k a_k w_k`` is an
  integer core times ``1/s`` per row; the kernel multiplies the codes with the weights decoded
  from their planes.

The integer core ``sum_k a_k w_k`` (before ``alpha``, the activation scale and ``bias``) expands to
``sum_ij c_i e_j popcount(A_i & B_j) + d_w sum_i c_i popcount(A_i) + d_a sum_j e_j popcount(B_j)
+ d_a d_w K``: popcounts of ANDs of packed words, which is what the TVM kernel computes. With
``xnor_scale`` the output is also multiplied by XNOR-Net's activation scale: mean |x| over the
inputs (linear) or the channel-mean of |x| box-filtered over each window (conv, the paper's
``K = A * k``).
"""

from __future__ import annotations

import math
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .library import CompressedLayer, register_compressed_op

A_MODES = ("float", "sign", "unsigned", "absmax", "ternary")
ABSMAX_EPS = 1e-5   # BitNet's floor on a row's max |x| (an all-zero row quantizes to zeros)
BITSERIAL_LINEAR = register_compressed_op("bitserial_linear", "bit-plane weights (and activations): popcount dense")
BITSERIAL_CONV2D = register_compressed_op("bitserial_conv2d", "bit-plane weights (and activations): popcount conv")


# ---- packing -----------------------------------------------------------------------------------------
def words_for(k: int) -> int:
    return -(-k // 64)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., K) booleans -> (..., 8 * ceil(K/64)) uint8: 64 per little-endian uint64 word."""
    b = bits.to(torch.bool).cpu().numpy()
    k = b.shape[-1]
    pad = words_for(k) * 64 - k
    b = np.concatenate([b, np.zeros((*b.shape[:-1], pad), bool)], -1) if pad else b
    return torch.from_numpy(np.packbits(b, axis=-1, bitorder="little"))


def unpack_bits(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: (..., bytes) uint8 -> (..., K) float {0, 1}."""
    shifts = torch.arange(8, device=packed.device)
    bits = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :k].to(torch.float64)


def as_words(packed: np.ndarray) -> np.ndarray:
    """Packed bytes (..., 8W) -> (..., W) uint64 (the kernel's view of the same bits)."""
    return np.ascontiguousarray(packed).view("<u8").astype(np.uint64)


# ---- activation bit-planes ---------------------------------------------------------------------------------
def activation_coefficients(a_mode: str, a_bits: int) -> tuple[list[float], float, float]:
    """(c_i per plane, d_a, s_a): a = s_a * (sum_i c_i A_i + d_a)."""
    if a_mode == "sign":
        return [2.0], -1.0, 1.0
    if a_mode == "unsigned":
        return [float(2 ** i) for i in range(a_bits)], 0.0, 1.0 / (2 ** a_bits - 1)
    if a_mode == "ternary":
        return [1.0, -1.0], 0.0, 1.0
    raise ValueError(f"a_mode {a_mode!r} has no bit-planes")


def activation_planes(x: torch.Tensor, a_mode: str, a_bits: int) -> list[torch.Tensor]:
    """The {0,1} planes of the quantized activation (float64, same shape as ``x``). A NaN activation
    has a defined code (the kernels use the same): sign -1 (NaN >= 0 is false), unsigned 0."""
    if a_mode == "sign":
        return [(x >= 0).to(torch.float64)]
    if a_mode == "ternary":   # NaN compares false: the zero code
        return [(x > 0.5).to(torch.float64), (x < -0.5).to(torch.float64)]
    # float32 and round-half-up, exactly as the compiled kernel computes the code
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    q = torch.floor(x.detach().float().clamp(0, 1) * float(2 ** a_bits - 1) + 0.5).to(torch.int64)
    return [((q >> i) & 1).to(torch.float64) for i in range(a_bits)]


def absmax_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """BitNet's per-token activation quantizer (module docstring), in float32 as the kernel
    computes it: the codes divided by the row's scale."""
    x = x.float()
    top = float(2 ** (bits - 1) - 1)
    scale = top / x.abs().amax(-1, keepdim=True).clamp_min(ABSMAX_EPS)
    return torch.floor(x * scale + 0.5).clamp(-top - 1, top) / scale


def _check(a_mode: str, a_bits: int, w_planes: torch.Tensor, w_coef: torch.Tensor) -> None:
    if a_mode not in A_MODES:
        raise ValueError(f"a_mode must be one of {A_MODES}, got {a_mode!r}")
    if a_mode in ("unsigned", "absmax") and not (1 if a_mode == "unsigned" else 2) <= a_bits <= 8:
        raise ValueError(f"a_bits must be in {'1' if a_mode == 'unsigned' else '2'}..8 for {a_mode} activations, "
                         f"got {a_bits}")
    if w_planes.dtype != torch.uint8 or w_coef.numel() != w_planes.shape[0]:
        raise ValueError("w_planes must be uint8 with one coefficient per plane")


# ---- the ops (reference implementations: exact integer core in float64) ---------------------------------
@torch.library.custom_op("squeezer::bitserial_linear", mutates_args=())
def bitserial_linear(x: torch.Tensor, w_planes: torch.Tensor, w_coef: torch.Tensor, w_offset: float,
                     alpha: torch.Tensor, bias: Optional[torch.Tensor], in_features: int, a_mode: str,
                     a_bits: int, xnor_scale: bool) -> torch.Tensor:
    _check(a_mode, a_bits, w_planes, w_coef)
    planes = unpack_bits(w_planes, in_features)                                      # (P, N, K)
    coef = w_coef.double()
    x64 = x.double()
    if a_mode in ("float", "absmax"):
        w = (coef[:, None, None] * planes).sum(0) + w_offset
        core = (absmax_quantize(x, a_bits).double() if a_mode == "absmax" else x64) @ w.T
    else:
        c, d_a, s_a = activation_coefficients(a_mode, a_bits)
        a_planes = activation_planes(x64, a_mode, a_bits)
        core = torch.zeros(*x.shape[:-1], planes.shape[1], dtype=torch.float64)
        for ci, a in zip(c, a_planes):
            for ej, b in zip(coef, planes):
                core += ci * ej * (a @ b.T)
            core += w_offset * ci * a.sum(-1, keepdim=True)
        core += d_a * (coef[:, None] * planes.sum(-1)).sum(0) + d_a * w_offset * in_features
        core = core * s_a
        if xnor_scale:
            core = core * x64.abs().mean(-1, keepdim=True)
    y = core * alpha.double()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


@bitserial_linear.register_fake
def _bitserial_linear_fake(x, w_planes, w_coef, w_offset, alpha, bias, in_features, a_mode, a_bits, xnor_scale):
    return x.new_empty((*x.shape[:-1], w_planes.shape[1]))


@torch.library.custom_op("squeezer::bitserial_conv2d", mutates_args=())
def bitserial_conv2d(x: torch.Tensor, w_planes: torch.Tensor, w_coef: torch.Tensor, w_offset: float,
                     alpha: torch.Tensor, bias: Optional[torch.Tensor], in_channels: int, kernel: List[int],
                     stride: List[int], padding: List[int], dilation: List[int], a_mode: str, a_bits: int,
                     xnor_scale: bool) -> torch.Tensor:
    _check(a_mode, a_bits, w_planes, w_coef)
    if a_mode == "absmax":
        raise ValueError("absmax activations are per token: Linear layers only")
    kh, kw = kernel
    n = w_planes.shape[1]
    # planes stored (P, N, kh*kw*words): per kernel position, the channel words
    planes = unpack_bits(w_planes.reshape(w_planes.shape[0], n, kh * kw, -1), in_channels)   # (P, N, kh*kw, C)
    planes = planes.reshape(planes.shape[0], n, kh, kw, in_channels).permute(0, 1, 4, 2, 3)  # (P, N, C, kh, kw)
    coef = w_coef.double()
    x64 = x.double()
    conv = lambda t, w, pad: F.conv2d(t, w, None, stride, pad, dilation)  # noqa: E731
    if a_mode == "float":
        w = (coef[:, None, None, None, None] * planes).sum(0) + w_offset
        y = conv(x64, w, padding)
    else:
        c, d_a, s_a = activation_coefficients(a_mode, a_bits)
        pad_value = 1.0 if a_mode == "sign" else 0.0          # sign: pad with +1 (bit 1); codes: 0
        ph, pw = padding
        a_planes = [F.pad(a, (pw, pw, ph, ph), value=pad_value) for a in activation_planes(x64, a_mode, a_bits)]
        ones = torch.ones(1, in_channels, kh, kw, dtype=torch.float64)
        core = 0
        for ci, a in zip(c, a_planes):
            for ej, b in zip(coef, planes):
                core = core + ci * ej * conv(a, b, 0)
            core = core + w_offset * ci * conv(a, ones, 0)
        rw = (coef[:, None] * planes.sum((2, 3, 4))).sum(0)                                   # (N,)
        core = core + d_a * rw[None, :, None, None] + d_a * w_offset * in_channels * kh * kw
        y = core * s_a
        if xnor_scale:   # XNOR-Net's K: channel-mean |x| averaged over each window (zero-padded)
            box = torch.full((1, 1, kh, kw), 1.0 / (kh * kw), dtype=torch.float64)
            y = y * conv(x64.abs().mean(1, keepdim=True), box, padding)
    y = y * alpha.double()[None, :, None, None]
    if bias is not None:
        y = y + bias.double()[None, :, None, None]
    return y.to(x.dtype)


@bitserial_conv2d.register_fake
def _bitserial_conv2d_fake(x, w_planes, w_coef, w_offset, alpha, bias, in_channels, kernel, stride, padding,
                           dilation, a_mode, a_bits, xnor_scale):
    b, _, h, w = x.shape
    oh = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    return x.new_empty((b, w_planes.shape[1], oh, ow))


# ---- the layers ------------------------------------------------------------------------------------------
class _BitLayer(CompressedLayer):
    def _store(self, planes: torch.Tensor, coef, offset: float, alpha: torch.Tensor, bias, a_mode: str,
               a_bits: int, xnor_scale: bool) -> None:
        """``planes``: (P, N, *positions, K) booleans, packed along the last axis."""
        if a_mode not in A_MODES:
            raise ValueError(f"{type(self).__name__}: a_mode must be one of {A_MODES}, got {a_mode!r}")
        if a_mode in ("unsigned", "absmax") and not (1 if a_mode == "unsigned" else 2) <= a_bits <= 8:
            raise ValueError(f"{type(self).__name__}: a_bits must be in {1 if a_mode == 'unsigned' else 2}..8 "
                             f"for {a_mode} activations, got {a_bits}")
        if a_mode == "absmax" and planes.ndim != 3:
            raise ValueError(f"{type(self).__name__}: absmax activations are per token: Linear layers only")
        if xnor_scale and a_mode in ("float", "absmax"):
            raise ValueError(f"{type(self).__name__}: xnor_scale needs quantized activations")
        packed = pack_bits(planes)
        self.register_buffer("w_planes", packed.reshape(packed.shape[0], packed.shape[1], -1).contiguous())
        self.register_buffer("w_coef", torch.as_tensor(coef, dtype=torch.float32).reshape(-1).clone())
        self.register_buffer("alpha", alpha.detach().float().reshape(-1).clone())
        self.bias = nn.Parameter(bias.detach().clone().float()) if bias is not None else None
        self.w_offset, self.a_mode, self.a_bits, self.xnor_scale = float(offset), a_mode, int(a_bits), bool(xnor_scale)
        if self.alpha.numel() != planes.shape[1]:
            raise ValueError(f"{type(self).__name__}: alpha needs one scale per output ({planes.shape[1]}), "
                             f"got {self.alpha.numel()}")

    @property
    def planes(self) -> int:
        return int(self.w_planes.shape[0])

    def stored_bytes(self) -> int:
        """Exact bytes: the packed planes (uint8), per-output scales, coefficients and bias."""
        return sum(t.numel() * t.element_size() for t in [*self.parameters(), *self.buffers()])


class BitLinear(_BitLayer):
    """A Linear with bit-plane weights (see the module docstring)."""

    op = BITSERIAL_LINEAR

    def __init__(self, planes: torch.Tensor, coef, offset: float, alpha: torch.Tensor, bias: torch.Tensor | None,
                 a_mode: str = "float", a_bits: int = 1, xnor_scale: bool = False) -> None:
        super().__init__()
        if planes.ndim != 3:
            raise ValueError(f"BitLinear: planes must be (P, out, in), got {tuple(planes.shape)}")
        self.in_features, self.out_features = int(planes.shape[2]), int(planes.shape[1])
        self._store(planes, coef, offset, alpha, bias, a_mode, a_bits, xnor_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bitserial_linear(x, self.w_planes, self.w_coef, self.w_offset, self.alpha, self.bias,
                                self.in_features, self.a_mode, self.a_bits, self.xnor_scale)

    def dense_weight(self) -> torch.Tensor:
        planes = unpack_bits(self.w_planes, self.in_features)
        return ((self.w_coef.double()[:, None, None] * planes).sum(0) + self.w_offset) * self.alpha.double()[:, None]

    def dense_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def macs(self, input_shape, output_shape) -> int:
        return int(np.prod(output_shape)) * self.in_features

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, planes={self.planes}, "
                f"a_mode={self.a_mode}, a_bits={self.a_bits}, xnor_scale={self.xnor_scale}")


class BitConv2d(_BitLayer):
    """A Conv2d (groups=1) with bit-plane weights; planes packed along input channels per kernel tap."""

    op = BITSERIAL_CONV2D

    def __init__(self, planes: torch.Tensor, coef, offset: float, alpha: torch.Tensor, bias: torch.Tensor | None,
                 stride=(1, 1), padding=(0, 0), dilation=(1, 1), a_mode: str = "float", a_bits: int = 1,
                 xnor_scale: bool = False) -> None:
        super().__init__()
        if planes.ndim != 5:
            raise ValueError(f"BitConv2d: planes must be (P, out, in, kh, kw), got {tuple(planes.shape)}")
        p, n, c, kh, kw = planes.shape
        self.in_channels, self.out_channels, self.kernel_size = int(c), int(n), (int(kh), int(kw))
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        # (P, N, kh, kw, C): channels innermost so one packed word holds 64 channels of one tap
        self._store(planes.permute(0, 1, 3, 4, 2).reshape(p, n, kh * kw, c), coef, offset, alpha, bias,
                    a_mode, a_bits, xnor_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bitserial_conv2d(x, self.w_planes, self.w_coef, self.w_offset, self.alpha, self.bias,
                                self.in_channels, list(self.kernel_size), list(self.stride), list(self.padding),
                                list(self.dilation), self.a_mode, self.a_bits, self.xnor_scale)

    def dense_weight(self) -> torch.Tensor:
        kh, kw = self.kernel_size
        planes = unpack_bits(self.w_planes.reshape(self.planes, self.out_channels, kh * kw, -1), self.in_channels)
        planes = planes.reshape(self.planes, self.out_channels, kh, kw, self.in_channels).permute(0, 1, 4, 2, 3)
        w = (self.w_coef.double()[:, None, None, None, None] * planes).sum(0) + self.w_offset
        return w * self.alpha.double()[:, None, None, None]

    def dense_params(self) -> int:
        return self.in_channels * self.out_channels * math.prod(self.kernel_size) + \
            (self.out_channels if self.bias is not None else 0)

    def macs(self, input_shape, output_shape) -> int:
        return int(np.prod(output_shape)) * self.in_channels * math.prod(self.kernel_size)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, planes={self.planes}, a_mode={self.a_mode}, a_bits={self.a_bits}, "
                f"xnor_scale={self.xnor_scale}")
