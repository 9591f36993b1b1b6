"""TE kernels for ``squeezer::bitserial_linear`` / ``bitserial_conv2d`` (compiler/ops/bitserial.py):
the portable path for every weight and activation coding (float activations, ±1, ternary, k-bit).

The activations are quantized and bit-packed inside the kernel (64 per uint64 word, stage
"packA"), the weights stay packed words, and the integer core is a sum of ``popcount(A_i & B_j)``
(stage "P") — ``vpopcntq`` on AVX-512 CPUs, ``__popcll`` on CUDA. Scales and bias are applied in
the epilogue ("y1": the popcount combination, computed inside the register tiles; "y": per-row
terms and per-output scale/bias). Pure ±1 layers use ``K - 2 popcount(A xor B)`` and finish
inside the tiles.

Each builder returns the TE tensors of one prim func (placeholders in argument order, output
last). The loop-variable names ("i", "j", "row", "n", "b", "y0", "x0") and reduction names
("rd_*") are what schedules/bitserial_cpu.py tiles by."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te

from ..nan_semantics import is_nan

_F32 = "float32"


def output_lanes(n_out: int) -> int:
    """Outputs per vector block of the weight layout."""
    return next(f for f in (16, 8, 4, 2, 1) if n_out % f == 0)


def _f(v: float):
    return tvm.tirx.const(v, _F32)


@dataclass(frozen=True)
class Coding:
    """How a layer codes its weights (``W = alpha (sum_j coef_j B_j + w_offset)``) and activations."""

    coef: tuple[float, ...]
    w_offset: float
    a_mode: str
    a_bits: int
    xnor: bool

    @property
    def n_planes(self) -> int:
        return len(self.coef)

    @property
    def pure_binary(self) -> bool:
        """±1 weights and ±1 activations (BNN / XNOR-Net): one plane, w = 2 B - 1, sign activations."""
        return self.a_mode == "sign" and list(self.coef) == [2.0] and self.w_offset == -1.0


@dataclass(frozen=True)
class ConvGeometry:
    batch: int
    c_in: int
    h: int
    w: int
    n_out: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    n_words: int           # uint64 words of input channels per tap

    @property
    def out_hw(self) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        return ((self.h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (self.w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


# ---- weight layouts and constants (numpy) -------------------------------------------------------------------
def dense_weight_layout(words: np.ndarray) -> np.ndarray:
    """(P, N, W) words -> (P, N/lanes, W, lanes): for a block of ``lanes`` outputs the words follow
    each other, so the reduction streams contiguous memory."""
    n_planes, n_out, n_words = words.shape
    lanes = output_lanes(n_out)
    return np.ascontiguousarray(words.reshape(n_planes, n_out // lanes, lanes, n_words).transpose(0, 1, 3, 2))


def conv_weight_layout(words: np.ndarray) -> np.ndarray:
    """(P, N, kh, kw, W) words -> (P, N/lanes, kh, kw, W, lanes)."""
    n_planes, n_out, kh, kw, n_words = words.shape
    lanes = output_lanes(n_out)
    return np.ascontiguousarray(words.reshape(n_planes, n_out // lanes, lanes, kh, kw, n_words)
                                .transpose(0, 1, 3, 4, 5, 2))


def plane_constants(coef: np.ndarray, offset: float, d_a: float, k_total: int, bits: np.ndarray) -> np.ndarray:
    """The per-output constant ``d_a * sum_j e_j popcount(B_j) + d_a * d_w * K`` (float64 -> float32)."""
    rw = bits.reshape(bits.shape[0], bits.shape[1], -1).sum(-1)                 # (P, N) popcounts
    return (d_a * (coef[:, None] * rw).sum(0) + d_a * offset * k_total).astype("float32")


# ---- shared pieces ------------------------------------------------------------------------------------------
def activation_bit(v, a_mode: str, a_bits: int, plane: int):
    """Bit ``plane`` of the quantized code of float32 ``v`` (same arithmetic as the torch op). NaN
    has a defined code, as in the op: sign -1 (NaN >= 0 is false), unsigned 0."""
    if a_mode == "sign":
        return (v >= _f(0.0)).astype("uint64")
    if a_mode == "ternary":   # TBN: plane 0 = [v > 1/2], plane 1 = [v < -1/2] (NaN: the zero code)
        return tvm.tirx.Select(plane == 0, v > _f(0.5), v < _f(-0.5)).astype("uint64")
    levels = float(2 ** a_bits - 1)
    clipped = tvm.tirx.Select(is_nan(v), _f(0.0), te.max(te.min(v, _f(1.0)), _f(0.0)))
    code = te.floor(clipped * _f(levels) + _f(0.5)).astype("int32")
    return ((code >> plane) & 1).astype("uint64")


def _decoded_weight(WT, code: Coding, lanes: int):
    """The float weight at output ``n``, input bit ``k`` decoded from its planes (float activations)."""
    def weight(n, k, *tap):
        total = _f(float(code.w_offset))
        for j in range(code.n_planes):
            word = WT[(j, n // lanes, *tap, k // 64, n % lanes)]
            bit = (word >> (k % 64).astype("uint64")) & tvm.tirx.const(1, "uint64")
            total = total + _f(float(code.coef[j])) * bit.astype(_F32)
        return total
    return weight


def _weights(n_planes: int, blocks: tuple, lanes: int):
    return te.placeholder((n_planes, *blocks, lanes), "uint64", name="wt")


def _scale_bias(n_out: int):
    return te.placeholder((n_out,), _F32, name="alpha"), te.placeholder((n_out,), _F32, name="bias")


# ---- dense ---------------------------------------------------------------------------------------------------
def dense_float(m: int, k_in: int, n_out: int, n_words: int, code: Coding) -> list:
    """Float activations times weights decoded from their planes inside the reduction."""
    lanes = output_lanes(n_out)
    X = te.placeholder((m, k_in), _F32, name="x")
    WT = _weights(code.n_planes, (n_out // lanes, n_words), lanes)
    AL, BI = _scale_bias(n_out)
    kk = te.reduce_axis((0, k_in), name="rd_k")
    weight = _decoded_weight(WT, code, lanes)
    P = te.compute((m, n_out), lambda i, n: te.sum(X[i, kk] * weight(n, kk), axis=kk), name="P")
    Y = te.compute((m, n_out), lambda i, n: P[i, n] * AL[n] + BI[n], name="y")
    return [X, WT, AL, BI, Y]


def _dense_packed(X, m: int, k_in: int, n_words: int, code: Coding, n_a: int):
    t = te.reduce_axis((0, 64), name="t")
    return te.compute((n_a, m, n_words), lambda i, r, w: te.sum(tvm.tirx.if_then_else(
        w * 64 + t < k_in, activation_bit(X[r, te.min(w * 64 + t, k_in - 1)], code.a_mode, code.a_bits, i)
        << t.astype("uint64"), tvm.tirx.const(0, "uint64")), axis=t), name="packA")


def dense_xnor(m: int, k_in: int, n_out: int, n_words: int, code: Coding) -> list:
    """Pure ±1 x ±1 dense (BNN / XNOR-Net): sum a*w = K - 2 popcount(A xor B), finished inside the
    register tiles; XNOR's row scale (``beta``, from :func:`row_abs_sum`) is an input."""
    lanes = output_lanes(n_out)
    X = te.placeholder((m, k_in), _F32, name="x")
    WT = _weights(1, (n_out // lanes, n_words), lanes)
    AL, BI = _scale_bias(n_out)
    A = _dense_packed(X, m, k_in, n_words, code, 1)
    rw_ = te.reduce_axis((0, n_words), name="rd_w")
    P = te.compute((1, 1, m, n_out), lambda i, j, row, n: te.sum(
        tvm.tirx.popcount(A[0, row, rw_] ^ WT[0, n // lanes, rw_, n % lanes]).astype("int64"), axis=rw_), name="P")
    BETA = te.placeholder((m,), _F32, name="beta") if code.xnor else None

    def out(r, n):
        core = _f(float(k_in)) - _f(2.0) * P[0, 0, r, n].astype(_F32)
        scale = BETA[r] * _f(1.0 / k_in) if code.xnor else _f(1.0)
        return core * scale * AL[n] + BI[n]

    Y = te.compute((m, n_out), out, name="y1")
    return [X, WT, AL, BI] + ([BETA] if code.xnor else []) + [Y]


def dense_planes(m: int, k_in: int, n_out: int, n_words: int, code: Coding, c: list[float], s_a: float) -> list:
    """Any weight planes x quantized activation planes: sum_ij c_i e_j popcount(A_i & B_j) plus
    the per-row (``RA``) and per-output (``rw``, an input) terms."""
    lanes, n_a = output_lanes(n_out), len(c)
    X = te.placeholder((m, k_in), _F32, name="x")
    WT = _weights(code.n_planes, (n_out // lanes, n_words), lanes)
    AL, BI = _scale_bias(n_out)
    RW = te.placeholder((n_out,), _F32, name="rw")
    A = _dense_packed(X, m, k_in, n_words, code, n_a)
    rw_ = te.reduce_axis((0, n_words), name="rd_w")
    P = te.compute((n_a, code.n_planes, m, n_out), lambda i, j, row, n: te.sum(
        tvm.tirx.popcount(A[i, row, rw_] & WT[j, n // lanes, rw_, n % lanes]).astype("int64"), axis=rw_), name="P")
    ra_w = te.reduce_axis((0, n_words), name="ra_w")
    RA = te.compute((n_a, m), lambda i, r: te.sum(tvm.tirx.popcount(A[i, r, ra_w]).astype("int32"), axis=ra_w),
                    name="RA")
    BETA = te.placeholder((m,), _F32, name="beta") if code.xnor else None

    def combination(r, n):
        total = RW[n]
        for i in range(n_a):
            for j in range(code.n_planes):
                total = total + _f(c[i] * code.coef[j]) * P[i, j, r, n].astype(_F32)
        return total

    Y1 = te.compute((m, n_out), combination, name="y1")

    def row_term(r):
        total = _f(0.0)
        for i in range(n_a):
            total = total + _f(float(code.w_offset) * c[i]) * RA[i, r].astype(_F32)
        return total

    def out(r, n):
        scale = BETA[r] * _f(s_a / k_in) if code.xnor else _f(s_a)
        return (Y1[r, n] + row_term(r)) * scale * AL[n] + BI[n]

    Y = te.compute((m, n_out), out, name="y")
    return [X, WT, AL, BI, RW] + ([BETA] if code.xnor else []) + [Y]


def row_abs_sum(m: int, k_in: int) -> list:
    """sum |x| per row (XNOR-Net's row scale) as 16 partial sums per row, then their sum."""
    X = te.placeholder((m, k_in), _F32, name="x")
    kq = te.reduce_axis((0, -(-k_in // 16)), name="kq")
    BP = te.compute((m, 16), lambda r, lane: te.sum(tvm.tirx.if_then_else(
        kq * 16 + lane < k_in, te.abs(X[r, te.min(kq * 16 + lane, k_in - 1)]), _f(0.0)),
        axis=kq), name="beta_partial")
    kl = te.reduce_axis((0, 16), name="kl")
    B = te.compute((m,), lambda r: te.sum(BP[r, kl], axis=kl), name="beta")
    return [X, B]


# ---- conv2d --------------------------------------------------------------------------------------------------
def _conv_inputs(g: ConvGeometry, n_planes: int) -> tuple:
    (kh, kw), lanes = g.kernel, output_lanes(g.n_out)
    X = te.placeholder((g.batch, g.c_in, g.h, g.w), _F32, name="x")
    WT = _weights(n_planes, (g.n_out // lanes, kh, kw, g.n_words), lanes)
    return (X, WT, *_scale_bias(g.n_out))


def _inside(g: ConvGeometry, hh, ww):
    (ph, pw) = g.padding
    return tvm.tirx.all(hh >= ph, hh < g.h + ph, ww >= pw, ww < g.w + pw)


def _clamped(g: ConvGeometry, hh, ww) -> tuple:
    """Padded coordinates -> the nearest real row and column of the input."""
    (ph, pw) = g.padding
    return te.min(te.max(hh - ph, 0), g.h - 1), te.min(te.max(ww - pw, 0), g.w - 1)


def conv_float(g: ConvGeometry, code: Coding) -> list:
    """Float activations (zero padded) times weights decoded from their planes."""
    (kh, kw), (sh, sw), (dh, dw) = g.kernel, g.stride, g.dilation
    oh, ow = g.out_hw
    X, WT, AL, BI = _conv_inputs(g, code.n_planes)

    def xval(b, c, hh, ww):  # zero-padded read of x
        return tvm.tirx.if_then_else(_inside(g, hh, ww), X[(b, c, *_clamped(g, hh, ww))], _f(0.0))

    rc, rh, rw_ = te.reduce_axis((0, g.c_in), "rd_c"), te.reduce_axis((0, kh), "rd_h"), te.reduce_axis((0, kw), "rd_w")
    weight = _decoded_weight(WT, code, output_lanes(g.n_out))
    P = te.compute((g.batch, oh, ow, g.n_out), lambda b, y0, x0, n: te.sum(
        xval(b, rc, y0 * sh + rh * dh, x0 * sw + rw_ * dw) * weight(n, rc, rh, rw_), axis=[rh, rw_, rc]), name="P")
    Y = te.compute((g.batch, g.n_out, oh, ow), lambda b, n, y0, x0: P[b, y0, x0, n] * AL[n] + BI[n], name="y")
    return [X, WT, AL, BI, Y]


def _conv_packed(X, g: ConvGeometry, code: Coding, n_a: int):
    """Pack the unpadded input (64 channels per word), then pad whole words: a padded position is +1
    on every real channel (sign) or the zero code (unsigned); padding bits of the last word stay 0."""
    t = te.reduce_axis((0, 64), name="t")
    c_in, n_words = g.c_in, g.n_words

    def channel_bit(i, b, hh, ww, ch):
        if c_in % 64 == 0:      # affine reads: the packing vectorizes along the row
            return activation_bit(X[b, ch, hh, ww], code.a_mode, code.a_bits, i)
        return tvm.tirx.if_then_else(ch < c_in, activation_bit(X[b, te.min(ch, c_in - 1), hh, ww], code.a_mode,
                                                               code.a_bits, i), tvm.tirx.const(0, "uint64"))

    A0 = te.compute((n_a, g.batch, g.h, n_words, g.w), lambda i, b, hh, cw, ww: te.sum(
        channel_bit(i, b, hh, ww, cw * 64 + t) << t.astype("uint64"), axis=t), name="packA")
    tail = c_in - 64 * (n_words - 1)
    full_word = tvm.tirx.const((1 << 64) - 1, "uint64")
    tail_word = tvm.tirx.const((1 << tail) - 1 if tail < 64 else (1 << 64) - 1, "uint64")

    def pad_word(cw):
        if code.a_mode != "sign":
            return tvm.tirx.const(0, "uint64")
        return tvm.tirx.if_then_else(cw < n_words - 1, full_word, tail_word)

    def padded(i, b, hh, ww, cw):
        row, col = _clamped(g, hh, ww)
        return tvm.tirx.if_then_else(_inside(g, hh, ww), A0[i, b, row, cw, col], pad_word(cw))

    (ph, pw) = g.padding
    return te.compute((n_a, g.batch, g.h + 2 * ph, g.w + 2 * pw, n_words), padded, name="padA")


def _reductions(g: ConvGeometry) -> tuple:
    (kh, kw) = g.kernel
    return te.reduce_axis((0, kh), "rd_h"), te.reduce_axis((0, kw), "rd_w"), te.reduce_axis((0, g.n_words), "rd_c")


def conv_xnor(g: ConvGeometry, code: Coding) -> list:
    """Pure ±1 x ±1 conv (BNN / XNOR-Net): sum a*w = K - 2 popcount(A xor B) over every window
    position (spatial padding is +1, channel padding bits are 0 on both sides), all inside the
    tiles; XNOR-Net's window sum (``beta``, from :func:`xnor_window_sum`) is an input."""
    (kh, kw), (sh, sw), (dh, dw), lanes = g.kernel, g.stride, g.dilation, output_lanes(g.n_out)
    oh, ow = g.out_hw
    X, WT, AL, BI = _conv_inputs(g, 1)
    A = _conv_packed(X, g, code, 1)
    rh, rw_, rc = _reductions(g)
    P = te.compute((1, 1, g.batch, oh, ow, g.n_out), lambda i, j, b, y0, x0, n: te.sum(
        tvm.tirx.popcount(A[0, b, y0 * sh + rh * dh, x0 * sw + rw_ * dw, rc]
                          ^ WT[0, n // lanes, rh, rw_, rc, n % lanes]).astype("int64"),
        axis=[rh, rw_, rc]), name="P")
    BETA = te.placeholder((g.batch, oh, ow), _F32, name="beta") if code.xnor else None
    k_total = float(g.c_in * kh * kw)

    def xnor_out(b, n, y0, x0):
        scale = BETA[b, y0, x0] * _f(1.0 / (g.c_in * kh * kw)) if code.xnor else _f(1.0)
        core = _f(k_total) - _f(2.0) * P[0, 0, b, y0, x0, n].astype(_F32)
        return core * scale * AL[n] + BI[n]

    Y = te.compute((g.batch, g.n_out, oh, ow), xnor_out, name="y1")
    return [X, WT, AL, BI] + ([BETA] if code.xnor else []) + [Y]


def conv_planes(g: ConvGeometry, code: Coding, c: list[float], s_a: float) -> list:
    """Any weight planes x quantized activation planes (see :func:`dense_planes`), per window."""
    (kh, kw), (sh, sw), (dh, dw), lanes = g.kernel, g.stride, g.dilation, output_lanes(g.n_out)
    oh, ow, n_a = *g.out_hw, len(c)
    X, WT, AL, BI = _conv_inputs(g, code.n_planes)
    RW = te.placeholder((g.n_out,), _F32, name="rw")
    A = _conv_packed(X, g, code, n_a)
    rh, rw_, rc = _reductions(g)
    P = te.compute((n_a, code.n_planes, g.batch, oh, ow, g.n_out), lambda i, j, b, y0, x0, n: te.sum(
        tvm.tirx.popcount(A[i, b, y0 * sh + rh * dh, x0 * sw + rw_ * dw, rc]
                          & WT[j, n // lanes, rh, rw_, rc, n % lanes]).astype("int64"),
        axis=[rh, rw_, rc]), name="P")
    qh, qw, qc = te.reduce_axis((0, kh), "qh"), te.reduce_axis((0, kw), "qw"), te.reduce_axis((0, g.n_words), "qc")
    RA = te.compute((n_a, g.batch, oh, ow), lambda i, b, y0, x0: te.sum(
        tvm.tirx.popcount(A[i, b, y0 * sh + qh * dh, x0 * sw + qw * dw, qc]).astype("int32"), axis=[qh, qw, qc]),
        name="RA")
    BETA = te.placeholder((g.batch, oh, ow), _F32, name="beta") if code.xnor else None

    def combination(b, n, y0, x0):   # inside each tile (see dense_planes)
        total = RW[n]
        for i in range(n_a):
            for j in range(code.n_planes):
                total = total + _f(c[i] * code.coef[j]) * P[i, j, b, y0, x0, n].astype(_F32)
        return total

    Y1 = te.compute((g.batch, g.n_out, oh, ow), combination, name="y1")
    k_scale = _f(1.0 / (g.c_in * kh * kw))

    def out(b, n, y0, x0):
        row = _f(0.0)
        for i in range(n_a):
            row = row + _f(float(code.w_offset) * c[i]) * RA[i, b, y0, x0].astype(_F32)
        scale = BETA[b, y0, x0] * k_scale * _f(s_a) if code.xnor else _f(s_a)
        return (Y1[b, n, y0, x0] + row) * scale * AL[n] + BI[n]

    Y = te.compute((g.batch, g.n_out, oh, ow), out, name="y")
    return [X, WT, AL, BI, RW] + ([BETA] if code.xnor else []) + [Y]


def xnor_window_sum(g: ConvGeometry) -> list:
    """XNOR-Net's K before its constant 1/(c·kh·kw): per output position the sum of the channel
    sums of |x| over the kernel window, zero padding counted (torch's avg_pool2d with
    count_include_pad). Stages "abs_sum" and "window_sum"."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g.kernel, g.stride, g.padding, g.dilation
    oh, ow = g.out_hw
    h, w = g.h, g.w
    X = te.placeholder((g.batch, g.c_in, h, w), _F32, name="x")
    kc = te.reduce_axis((0, g.c_in), "k_c")
    S = te.compute((g.batch, h, w), lambda b, hh, ww: te.sum(te.abs(X[b, kc, hh, ww]), axis=kc), name="abs_sum")
    qh, qw = te.reduce_axis((0, kh), "k_h"), te.reduce_axis((0, kw), "k_w")

    def s_pad(b, hh, ww):
        inside = tvm.tirx.all(hh >= 0, hh < h, ww >= 0, ww < w)
        return tvm.tirx.if_then_else(inside, S[b, te.min(te.max(hh, 0), h - 1), te.min(te.max(ww, 0), w - 1)],
                                     _f(0.0))

    K = te.compute((g.batch, oh, ow), lambda b, y0, x0: te.sum(
        s_pad(b, y0 * sh + qh * dh - ph, x0 * sw + qw * dw - pw), axis=[qh, qw]), name="window_sum")
    return [X, K]
