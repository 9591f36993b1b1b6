"""Lowerings of ``squeezer::int_linear`` / ``int_conv2d`` (compiler/ops/integer.py).

Each layer becomes three steps: (1) a TE kernel quantizing the float input to codes four to a word
(for a conv, gathered as im2col rows ``(b, oy, ox) x (ky, kx, c)``, zero-point padded) — injective,
so TVM fuses the producer's activation into it; (2) the integer GEMM with the dequantizing
epilogue: the AVX-512 VNNI kernel (kernels/vnni_kernels.py) where the target has it, else a TE
int32 reduction the default schedules take (other CPUs, CUDA); (3) reshapes back to the layer's
layout (``(..., N)`` or NCHW), which fuse into the consumer."""

from __future__ import annotations

import math

import numpy as np
import torch
from tvm import relax, te, tirx

from compiler.errors import BuildError
from compiler.ops.integer import inverse_scale

from ..kernels import vnni_kernels
from .context import LoweringContext


def _read(ctx: LoweringContext, importer, node):
    """(codes (N, K) or (N, C, kh, kw) int8, scale (N,) f32, bias (N,) f32, x_scale, x_zero, a_bits)."""
    x_node, codes_node, w_scale_node, bias_node, x_scale, x_zero, a_bits = node.args[:7]
    where = f"squeezer::{node.target.name().split('::')[-1]} at {node.name}"
    if x_node.meta["val"].dtype != torch.float32:
        raise BuildError(f"{where}: float32 input only, got {x_node.meta['val'].dtype}")
    codes = ctx.layer_constant(importer, codes_node, "w_codes", where).astype(np.int8)
    w_scale = ctx.layer_constant(importer, w_scale_node, "w_scale", where).astype(np.float32)
    bias = ctx.layer_constant(importer, bias_node, "bias", where).astype(np.float32)
    scale = np.float32(x_scale) * w_scale
    return codes, scale, bias, float(x_scale), int(x_zero), int(a_bits)


def _code(value, inv: float, zero: int, top: int):
    """A float32 value's activation code (uint32), as compiler.ops.integer.quantize_codes computes it."""
    q = tirx.round(value * tirx.const(inv, "float32")) + tirx.const(float(zero), "float32")
    q = tirx.Select(tirx.isnan(q), tirx.const(float(zero), "float32"),
                    tirx.max(tirx.min(q, tirx.const(float(top), "float32")), tirx.const(0.0, "float32")))
    return q.astype("uint32")


def _packed_codes(m: int, k: int, code_at) -> te.Tensor:
    """(M, ceil(K/4)) uint32: codes ``code_at(row, col)`` four to a word, little-endian, 0 past K."""
    words = -(-k // 4)

    def word(i, w):
        total = tirx.const(0, "uint32")
        for j in range(4):
            col = w * 4 + j
            byte = code_at(i, col) if k % 4 == 0 else tirx.Select(
                col < k, code_at(i, tirx.min(col, k - 1)), tirx.const(0, "uint32"))
            total = total | (byte << tirx.const(8 * j, "uint32"))
        return total

    return te.compute((m, words), word, name="int_codes")


def _weight_arrays(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray, zero: int, cols: int) -> list:
    """corr, scale, bias padded to ``cols`` output columns (padding columns compute 0)."""
    n = codes.shape[0]
    corr = np.zeros(cols, np.int32)
    corr[:n] = zero * codes.astype(np.int64).sum(1)
    pad = lambda v: np.concatenate([v, np.zeros(cols - n, np.float32)]).astype(np.float32)  # noqa: E731
    return [relax.const(corr), relax.const(pad(scale)), relax.const(pad(bias))]


def _vnni(bb, func, a, codes: np.ndarray, scale, bias, zero: int, name: str, out_shape):
    """Call the VNNI kernel ``func`` on A and ``codes`` (N, K) packed."""
    blocks = -(-codes.shape[0] // vnni_kernels.LANES)
    sym = f"{name}_{len(bb.get().functions)}"
    gv = bb.add_func(func.with_attr("global_symbol", sym).with_attr("op_pattern", 8), sym)
    args = [a, relax.const(vnni_kernels.pack_weights(codes)),
            *_weight_arrays(codes, scale, bias, zero, blocks * vnni_kernels.LANES)]
    return bb.emit(relax.call_tir(gv, args, relax.TensorType(out_shape, "float32")))


def _generic(bb, a, codes: np.ndarray, scale, bias, zero: int, name: str):
    """The portable path: A (M, ceil(K/4)) packed codes times ``codes`` (N, K) as a TE reduction."""
    return bb.emit_te(_generic_gemm, a, relax.const(codes), *_weight_arrays(codes, scale, bias, zero, codes.shape[0]),
                      primfunc_name_hint=f"{name}_generic")


def _generic_gemm(a: te.Tensor, w: te.Tensor, corr: te.Tensor, scale: te.Tensor, bias: te.Tensor) -> te.Tensor:
    """The same arithmetic as the VNNI kernel as a TE int32 reduction (targets without VNNI)."""
    m, n, k = a.shape[0], w.shape[0], w.shape[1]
    r = te.reduce_axis((0, k), name="k")
    core = te.compute((m, n), lambda i, j: te.sum(
        ((a[i, r // 4] >> (r % 4 * 8).astype("uint32")) & tirx.const(255, "uint32")).astype("int32")
        * w[j, r].astype("int32"), axis=r), name="int_core")
    return te.compute((m, n), lambda i, j: (core[i, j] - corr[j]).astype("float32") * scale[j] + bias[j],
                      name="int_dequantize")


def lower_int_linear(node, importer, ctx: LoweringContext):
    codes, scale, bias, x_scale, zero, a_bits = _read(ctx, importer, node)
    x_node, bb = node.args[0], importer.block_builder
    shape = [int(d) for d in x_node.meta["val"].shape]
    n, k = codes.shape
    m = math.prod(shape[:-1])
    x2d = bb.emit(relax.op.reshape(importer.env[x_node], (m, k))) if len(shape) != 2 else importer.env[x_node]
    inv, top = inverse_scale(x_scale), 2 ** a_bits - 1
    a = bb.emit_te(lambda x: _packed_codes(m, k, lambda i, c: _code(x[i, c], inv, zero, top)), x2d,
                   primfunc_name_hint="int_quantize")
    if vnni_kernels.vnni_available(ctx.target):
        blocks = -(-n // vnni_kernels.LANES)
        func = vnni_kernels.int8_gemm(m, -(-k // 4), blocks)
        y = _vnni(bb, func, a, codes, scale, bias, zero, "int_linear", (m, blocks * vnni_kernels.LANES))
        if blocks * vnni_kernels.LANES != n:
            y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[n]))
    else:
        y = _generic(bb, a, codes, scale, bias, zero, "int_linear")
    return bb.emit(relax.op.reshape(y, (*shape[:-1], n))) if len(shape) != 2 else y


def lower_int_conv2d(node, importer, ctx: LoweringContext):
    codes, scale, bias, x_scale, zero, a_bits = _read(ctx, importer, node)
    x_node, bb = node.args[0], importer.block_builder
    (sh, sw), (ph, pw), (dh, dw) = (tuple(int(v) for v in node.args[i]) for i in (7, 8, 9))
    kh, kw = (int(d) for d in node.args[1].meta["val"].shape[2:])
    batch, c_in, h, w = (int(d) for d in x_node.meta["val"].shape)
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh <= 0 or ow <= 0:
        raise BuildError(f"squeezer::int_conv2d at {node.name}: the kernel is larger than the padded input")
    n = codes.shape[0]
    m = batch * oh * ow
    inv, top = inverse_scale(x_scale), 2 ** a_bits - 1
    x = importer.env[x_node]
    if vnni_kernels.vnni_available(ctx.target):   # implicit GEMM over zero-point-padded NHWC codes
        c_words = -(-c_in // 4)
        hp, wp = h + 2 * ph, w + 2 * pw

        def padded_codes(x):
            def code_at(i, c):
                b, yy, xx = i // (hp * wp), i // wp % hp - ph, i % wp - pw
                inside = tirx.all(yy >= 0, yy < h, xx >= 0, xx < w, c < c_in)
                value = x[b, tirx.min(c, c_in - 1), tirx.max(tirx.min(yy, h - 1), 0), tirx.max(tirx.min(xx, w - 1), 0)]
                return tirx.Select(inside, _code(value, inv, zero, top), tirx.const(zero, "uint32"))
            flat = _packed_codes(batch * hp * wp, c_words * 4, code_at)
            return te.compute((batch, hp, wp, c_words), lambda b, yy, xx, c: flat[(b * hp + yy) * wp + xx, c],
                              name="int_padded_codes")

        p = bb.emit_te(padded_codes, x, primfunc_name_hint="int_quantize_nhwc")
        full = np.zeros((n, kh, kw, c_words * 4), np.int8)
        full[..., :c_in] = codes.transpose(0, 2, 3, 1)
        func = vnni_kernels.int8_conv2d(batch, (hp, wp), c_words, (kh, kw), (sh, sw), (dh, dw), (oh, ow), n)
        return _vnni(bb, func, p, full.reshape(n, -1), scale, bias, zero, "int_conv2d", (batch, n, oh, ow))
    else:   # im2col rows (b, oy, ox) x (ky, kx, c)
        flat = codes.transpose(0, 2, 3, 1).reshape(n, -1)
        k = flat.shape[1]

        def im2col(x):
            def code_at(i, col):
                b, oy, ox = i // (oh * ow), i // ow % oh, i % ow
                tap, c = col // c_in, col % c_in
                iy, ix = oy * sh + tap // kw * dh - ph, ox * sw + tap % kw * dw - pw
                inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < w)
                value = x[b, c, tirx.max(tirx.min(iy, h - 1), 0), tirx.max(tirx.min(ix, w - 1), 0)]
                return tirx.Select(inside, _code(value, inv, zero, top), tirx.const(zero, "uint32"))
            return _packed_codes(m, k, code_at)

        a = bb.emit_te(im2col, x, primfunc_name_hint="int_im2col")
        y = _generic(bb, a, flat, scale, bias, zero, "int_conv2d")
    y = bb.emit(relax.op.reshape(y, (batch, oh, ow, n)))
    return bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))
