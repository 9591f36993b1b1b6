"""Lowerings of ``squeezer::int_linear`` / ``int_conv2d`` (compiler/ops/integer.py).

Each layer becomes: (1) a TE kernel quantizing the float input to codes four to a word —
injective, so TVM fuses the producer's activation into it; for a conv on AMX or VNNI, the
zero-point-padded NHWC codes (an AMX conv then gathers them into im2col rows ``(b, oy, ox) x
(ky, kx, channel word)``, the VNNI conv reads them in place); (2) the integer GEMM with the
dequantizing epilogue, on the kernel :func:`kernel_for` picks: AMX-INT8 tiles
(kernels/amx_int8.py), AVX-512 VNNI (kernels/vnni_kernels.py), or a TE int32 reduction the default
schedules take (other CPUs, CUDA); (3) the layer's layout back (``(..., N)`` or NCHW; the AMX and
VNNI convs write NCHW themselves)."""

from __future__ import annotations

import math

import numpy as np
import torch
from tvm import relax, te, tirx

from compiler.errors import BuildError, BuildOptionError
from compiler.ops.integer import inverse_scale

from ..kernels import amx_int8, amx_kernels, vnni_kernels
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


def _packed_codes(m: int, k: int, code_at, rows: int | None = None, words: int | None = None) -> te.Tensor:
    """(rows, words) uint32 (default (M, ceil(K/4))): codes ``code_at(row, col)`` four to a word,
    little-endian; 0 past K and in rows past M (the AMX kernel's padding)."""
    rows, words = rows or m, words or -(-k // 4)

    def word(i, w):
        total = tirx.const(0, "uint32")
        for j in range(4):
            col = w * 4 + j
            byte = code_at(tirx.min(i, m - 1), tirx.min(col, k - 1))
            if k % 4 or words * 4 > k or rows > m:
                byte = tirx.Select(tirx.all(col < k, i < m), byte, tirx.const(0, "uint32"))
            total = total | (byte << tirx.const(8 * j, "uint32"))
        return total

    return te.compute((rows, words), word, name="int_codes")


def _weight_arrays(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray, zero: int, cols: int) -> list:
    """corr, scale, bias padded to ``cols`` output columns (padding columns compute 0)."""
    n = codes.shape[0]
    corr = np.zeros(cols, np.int32)
    corr[:n] = zero * codes.astype(np.int64).sum(1)
    pad = lambda v: np.concatenate([v, np.zeros(cols - n, np.float32)]).astype(np.float32)  # noqa: E731
    return [relax.const(corr), relax.const(pad(scale)), relax.const(pad(bias))]


def _call(bb, func, a, codes: np.ndarray, scale, bias, zero: int, name: str, out_shape, cols: int, k_pad: int):
    """Call the integer kernel ``func`` on A and ``codes`` (N, K) packed for ``cols`` columns."""
    sym = f"{name}_{len(bb.get().functions)}"
    gv = bb.add_func(func.with_attr("global_symbol", sym).with_attr("op_pattern", 8), sym)
    args = [a, relax.const(vnni_kernels.pack_weights(codes, cols, k_pad)),
            *_weight_arrays(codes, scale, bias, zero, cols)]
    return bb.emit(relax.call_tir(gv, args, relax.TensorType(out_shape, "float32")))


def _unfused(bb, var):
    """Mark the kernel behind ``var`` (an ``emit_te`` result) opaque to FuseOps: a gather fused into
    its producer would recompute each quantized code once per tap."""
    gv = bb.lookup_binding(var).args[0]
    bb.update_func(gv, bb.get()[gv].with_attr("op_pattern", 8))
    return var


def _columns(bb, y, cols: int, n: int):
    return bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[n])) if cols != n else y


def _gemm(bb, kind: str, src, m: int, codes: np.ndarray, scale, bias, zero: int, name: str, code_at_of):
    """(M, N) float32: the dequantized product of the (M, K) codes ``code_at_of(src)(row, col)``
    (``src`` a Relax tensor, handed to the function as its TE placeholder) and ``codes`` (N, K),
    on ``kind``'s kernel."""
    n, k = codes.shape
    blocks = -(-n // vnni_kernels.LANES)
    if kind == "amx":
        a = bb.emit_te(lambda t: _packed_codes(m, k, code_at_of(t), amx_int8.padded_rows(m) + 1,
                                               amx_int8.row_words(k)), src, primfunc_name_hint=f"{name}_codes")
        cols = amx_int8.padded_blocks(m, blocks) * vnni_kernels.LANES
        y = _call(bb, amx_int8.int8_gemm(m, k, blocks), a, codes, scale, bias, zero, f"{name}_amx", (m, cols), cols,
                  amx_int8.padded_k(k))
        return _columns(bb, y, cols, n)
    a = bb.emit_te(lambda t: _packed_codes(m, k, code_at_of(t)), src, primfunc_name_hint=f"{name}_codes")
    if kind == "vnni":
        cols = blocks * vnni_kernels.LANES
        y = _call(bb, vnni_kernels.int8_gemm(m, -(-k // 4), blocks), a, codes, scale, bias, zero, f"{name}_vnni",
                  (m, cols), cols, -(-k // 4) * 4)
        return _columns(bb, y, cols, n)
    return bb.emit_te(_generic_gemm, a, relax.const(codes), *_weight_arrays(codes, scale, bias, zero, n),
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


def kernel_for(ctx: LoweringContext, rows: int, where: str) -> str:
    """``amx``, ``vnni`` or ``generic`` for a layer with ``rows`` GEMM rows, as ``int_kernels`` asks."""
    policy = ctx.options.int_kernels
    amx = amx_kernels.amx_available(ctx.target)
    vnni = vnni_kernels.vnni_available(ctx.target)
    if policy == "amx" and not amx:
        raise BuildOptionError(f"int_kernels='amx' at {where}: the target or this process has no AMX-INT8")
    if policy == "vnni" and not vnni:
        raise BuildOptionError(f"int_kernels='vnni' at {where}: the target has no AVX512-VNNI")
    if policy != "auto":
        return policy
    if amx and rows >= amx_int8.MIN_ROWS:
        return "amx"
    return "vnni" if vnni else "generic"


def lower_int_linear(node, importer, ctx: LoweringContext):
    codes, scale, bias, x_scale, zero, a_bits = _read(ctx, importer, node)
    x_node, bb = node.args[0], importer.block_builder
    shape = [int(d) for d in x_node.meta["val"].shape]
    n, k = codes.shape
    m = math.prod(shape[:-1])
    x2d = bb.emit(relax.op.reshape(importer.env[x_node], (m, k))) if len(shape) != 2 else importer.env[x_node]
    inv, top = inverse_scale(x_scale), 2 ** a_bits - 1
    kind = kernel_for(ctx, m, f"squeezer::int_linear at {node.name}")
    y = _gemm(bb, kind, x2d, m, codes, scale, bias, zero, "int_linear",
              lambda x: lambda i, c: _code(x[i, c], inv, zero, top))
    return bb.emit(relax.op.reshape(y, (*shape[:-1], n))) if len(shape) != 2 else y


def _nhwc_codes(x, inv: float, zero: int, top: int, pad: tuple[int, int], c_words: int) -> te.Tensor:
    """(B, H + 2 ph, W + 2 pw, Cp/4) uint32: the zero-point-padded input codes, four channels a word."""
    batch, c_in, h, w = (int(d) for d in x.shape)
    hp, wp = h + 2 * pad[0], w + 2 * pad[1]

    def code_at(i, c):
        b, yy, xx = i // (hp * wp), i // wp % hp - pad[0], i % wp - pad[1]
        inside = tirx.all(yy >= 0, yy < h, xx >= 0, xx < w, c < c_in)
        value = x[b, tirx.min(c, c_in - 1), tirx.max(tirx.min(yy, h - 1), 0), tirx.max(tirx.min(xx, w - 1), 0)]
        return tirx.Select(inside, _code(value, inv, zero, top), tirx.const(zero, "uint32"))

    flat = _packed_codes(batch * hp * wp, c_words * 4, code_at)
    return te.compute((batch, hp, wp, c_words), lambda b, yy, xx, c: flat[(b * hp + yy) * wp + xx, c],
                      name="int_padded_codes")


def lower_int_conv2d(node, importer, ctx: LoweringContext):
    codes, scale, bias, x_scale, zero, a_bits = _read(ctx, importer, node)
    x_node, bb = node.args[0], importer.block_builder
    (sh, sw), (ph, pw), (dh, dw) = (tuple(int(v) for v in node.args[i]) for i in (7, 8, 9))
    n, c_in, kh, kw = codes.shape
    batch, _, h, w = (int(d) for d in x_node.meta["val"].shape)
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh <= 0 or ow <= 0:
        raise BuildError(f"squeezer::int_conv2d at {node.name}: the kernel is larger than the padded input")
    m = batch * oh * ow
    inv, top = inverse_scale(x_scale), 2 ** a_bits - 1
    kind = kernel_for(ctx, m, f"squeezer::int_conv2d at {node.name}")
    x = importer.env[x_node]

    def pixel(i):
        return i // (oh * ow), i // ow % oh * sh, i % ow * sw

    if kind == "generic":   # im2col rows (b, oy, ox) x (ky, kx, c) straight from the float input
        def code_at_of(t):
            def code_at(i, col):
                (b, y0, x0), tap, c = pixel(i), col // c_in, col % c_in
                iy, ix = y0 + tap // kw * dh - ph, x0 + tap % kw * dw - pw
                inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < w)
                value = t[b, c, tirx.max(tirx.min(iy, h - 1), 0), tirx.max(tirx.min(ix, w - 1), 0)]
                return tirx.Select(inside, _code(value, inv, zero, top), tirx.const(zero, "uint32"))
            return code_at
        y = _gemm(bb, kind, x, m, codes.transpose(0, 2, 3, 1).reshape(n, -1), scale, bias, zero, "int_conv2d",
                  code_at_of)
    else:
        c_words = -(-c_in // 4)
        p = bb.emit_te(lambda t: _nhwc_codes(t, inv, zero, top, (ph, pw), c_words), x,
                       primfunc_name_hint="int_quantize_nhwc")
        full = np.zeros((n, kh, kw, c_words * 4), np.int8)   # channels padded to whole words
        full[..., :c_in] = codes.transpose(0, 2, 3, 1)
        full = full.reshape(n, -1)
        if kind == "vnni":   # implicit GEMM: the NCHW output written by the kernel
            func = vnni_kernels.int8_conv2d(batch, (h + 2 * ph, w + 2 * pw), c_words, (kh, kw), (sh, sw), (dh, dw),
                                            (oh, ow), n)
            cols = -(-n // vnni_kernels.LANES) * vnni_kernels.LANES
            return _call(bb, func, p, full, scale, bias, zero, "int_conv2d_vnni", (batch, n, oh, ow), cols,
                         full.shape[1])

        rows, taps = amx_int8.padded_rows(m) + 1, kh * kw   # im2col of whole channel words, a spare row

        def gather(t):
            def word(i, tap, c):
                (b, y0, x0) = pixel(tirx.min(i, m - 1))
                return tirx.Select(i < m, t[b, y0 + tap // kw * dh, x0 + tap % kw * dw, c], tirx.const(0, "uint32"))
            return te.compute((rows, taps, c_words), word, name="int_im2col")

        a = _unfused(bb, bb.emit_te(gather, p, primfunc_name_hint="int_im2col"))
        a = bb.emit(relax.op.reshape(a, (rows, taps * c_words)))
        blocks = -(-n // vnni_kernels.LANES)
        cols = amx_int8.padded_blocks(m, blocks) * vnni_kernels.LANES
        func = amx_int8.int8_gemm(m, full.shape[1], blocks, taps * c_words, nchw=(batch, n, oh, ow))
        y = _call(bb, func, a, full, scale, bias, zero, "int_conv2d_amx", (batch, n, oh * ow), cols,
                  amx_int8.padded_k(full.shape[1]))
        return bb.emit(relax.op.reshape(y, (batch, n, oh, ow)))
    y = bb.emit(relax.op.reshape(y, (batch, oh, ow, n)))
    return bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))
