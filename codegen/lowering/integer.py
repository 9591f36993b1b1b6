"""Lowerings of ``squeezer::int_linear`` / ``int_conv2d`` (compiler/ops/integer.py).

Each layer becomes: (1) a TE kernel quantizing the float input to codes four to a word —
injective, so TVM fuses the producer's activation into it. A conv works on NHWC: its NCHW input
is transposed first and its NHWC output back (Relax ``permute_dims``, which the CPU pipeline
cancels against the NHWC convs and pools around it: transpose_sinking.py). A 1×1 unpadded conv's
codes are the GEMM rows themselves; another conv on AMX or VNNI gets the zero-point-padded NHWC
codes (AMX then gathers them into im2col rows ``(b, oy, ox) x (ky, kx, channel word)``, VNNI
reads them in place); (2) the integer GEMM with the dequantizing epilogue, written in the
layer's own shape, on the kernel :func:`kernel_for` picks: AMX-INT8 tiles (kernels/amx_int8.py),
AVX-512 VNNI (kernels/vnni_kernels.py), or a TE int32 reduction the default schedules take
(other CPUs, CUDA)."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from tvm import relax, te, tirx

from compiler.errors import BuildError, BuildOptionError
from compiler.ops.integer import inverse_scale

from ..int_epilogue import QUANTIZE_ATTR, build_kernel, kernel_spec
from ..kernels import amx_int8, amx_kernels, int_im2col, vnni_kernels
from ..kernels.int_output import Output, code_of
from . import integer_cuda
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


def _quantized(bb, x, inv: float, zero: int, top: int):
    """The uint8 codes of the float tensor ``x``, same shape: elementwise, so TVM fuses it into the
    producer's epilogue (a float conv then writes codes)."""
    q = bb.emit_te(lambda t: te.compute(t.shape, lambda *i: code_of(t(*i), (inv, zero, top)), name="int_quantize"),
                   x, primfunc_name_hint="int_quantize")
    gv = bb.lookup_binding(q).args[0]
    bb.update_func(gv, bb.get()[gv].with_attr(QUANTIZE_ATTR, [float(inv), int(zero), int(top)]))
    return q


def _padded(bb, a, rows: int, width: int):
    """(M, K) codes with zero rows and columns up to (rows, width)."""
    m, k = (int(d) for d in a.ty.shape)
    if (rows, width) == (m, k):
        return a
    return bb.emit_te(lambda t: te.compute((rows, width), lambda i, c: tirx.Select(
        tirx.all(i < m, c < k), t[tirx.min(i, m - 1), tirx.min(c, k - 1)], tirx.const(0, "uint8")),
        name="int_padded_rows"), a, primfunc_name_hint="int_padded_rows")


def _weight_arrays(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray, zero: int, cols: int) -> list:
    """corr, scale, bias padded to ``cols`` output columns (padding columns compute 0)."""
    n = codes.shape[0]
    corr = np.zeros(cols, np.int32)
    corr[:n] = zero * codes.astype(np.int64).sum(1)
    pad = lambda v: np.concatenate([v, np.zeros(cols - n, np.float32)]).astype(np.float32)  # noqa: E731
    return [relax.const(corr), relax.const(pad(scale)), relax.const(pad(bias))]


def _call(bb, generator: str, args: list, a, codes: np.ndarray, scale, bias, zero: int, name: str, out_shape,
          cols: int, k_pad: int, **kwargs):
    """Call the integer kernel ``generator(*args, **kwargs)`` (int_epilogue.GENERATORS) on A and
    ``codes`` (N, K) packed for ``cols`` columns; its last input, the output clamp, starts
    unbounded (int_epilogue.py narrows it and may make it write codes)."""
    gv = _add_kernel(bb, build_kernel(kernel_spec(generator, args, kwargs, Output(tuple(out_shape)))), name)
    args = [a, relax.const(vnni_kernels.pack_weights(codes, cols, k_pad)),
            *_weight_arrays(codes, scale, bias, zero, cols), relax.const(np.array([-np.inf, np.inf], np.float32))]
    return bb.emit(relax.call_tir(gv, args, relax.TensorType(out_shape, "float32")))


def _add_kernel(bb, func, name: str):
    """``func`` added to the module under a symbol of its own."""
    sym = f"{name}_{len(bb.get().functions)}"
    return bb.add_func(func.with_attr("global_symbol", sym), sym)


def _unfused(bb, var):
    """Mark the kernel behind ``var`` (an ``emit_te`` result) opaque to FuseOps: a gather fused into
    its producer would recompute each quantized code once per tap."""
    gv = bb.lookup_binding(var).args[0]
    bb.update_func(gv, bb.get()[gv].with_attr("op_pattern", 8))
    return var


def _gemm(bb, kind: str, a, codes: np.ndarray, scale, bias, zero: int, name: str, out_shape: tuple[int, ...]):
    """The dequantized product of the (M, K) activation codes ``a`` and ``codes`` (N, K), on
    ``kind``'s kernel: float32 in ``out_shape`` (``prod == M N``: the rows in the layer's own shape)."""
    n, k = codes.shape
    m = int(a.ty.shape[0])
    blocks = -(-n // vnni_kernels.LANES)
    if kind == "amx":
        rows = max(m, amx_int8.MIN_ROWS)
        cols = amx_int8.padded_blocks(rows, blocks) * vnni_kernels.LANES
        return _call(bb, "amx_gemm", [m, k, blocks, n], _padded(bb, a, rows, k), codes, scale, bias, zero,
                     f"{name}_amx", out_shape, cols, amx_int8.padded_k(k), a_rows=rows)
    if kind == "vnni":
        k4 = -(-k // 4) * 4
        return _call(bb, "vnni_gemm", [m, k4 // 4, blocks, n], _padded(bb, a, m, k4), codes, scale, bias, zero,
                     f"{name}_vnni", out_shape, blocks * vnni_kernels.LANES, k4)
    y = bb.emit_te(_generic_gemm, a, relax.const(codes), *_weight_arrays(codes, scale, bias, zero, n),
                   primfunc_name_hint=f"{name}_generic")
    return bb.emit(relax.op.reshape(y, out_shape)) if len(out_shape) != 2 else y


def _generic_gemm(a: te.Tensor, w: te.Tensor, corr: te.Tensor, scale: te.Tensor, bias: te.Tensor) -> te.Tensor:
    """The same arithmetic as the VNNI kernel as a TE int32 reduction (targets without VNNI)."""
    m, n, k = a.shape[0], w.shape[0], w.shape[1]
    r = te.reduce_axis((0, k), name="k")
    core = te.compute((m, n), lambda i, j: te.sum(
        a[i, r].astype("int32") * w[j, r].astype("int32"), axis=r), name="int_core")
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
    kind = kernel_for(ctx, m, f"squeezer::int_linear at {node.name}")
    q = _quantized(bb, importer.env[x_node], inverse_scale(x_scale), zero, 2 ** a_bits - 1)
    a = bb.emit(relax.op.reshape(q, (m, k))) if len(shape) != 2 else q
    if integer_cuda.applies(ctx, m, k):
        y = integer_cuda.gemv(bb, _add_kernel, _padded(bb, a, m, -(-k // 4) * 4),
                              integer_cuda.int8_arrays(codes, scale, bias, zero), k, False, 0, "int_linear_dp4a")
        return bb.emit(relax.op.reshape(y, (*shape[:-1], n))) if len(shape) != 2 else y
    return _gemm(bb, kind, a, codes, scale, bias, zero, "int_linear", (*shape[:-1], n))


def lower_int_conv2d(node, importer, ctx: LoweringContext):
    """An integer conv on NHWC: the input transposed from NCHW and the output back, transposes
    the layout pass cancels against the NHWC ops around the layer (transpose_sinking.py)."""
    codes, scale, bias, x_scale, zero, a_bits = _read(ctx, importer, node)
    x_node, bb = node.args[0], importer.block_builder
    stride, pad, dilation = (tuple(int(v) for v in node.args[i]) for i in (7, 8, 9))
    n, c_in, kh, kw = codes.shape
    batch, _, h, w = (int(d) for d in x_node.meta["val"].shape)
    oh, ow = ((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
              zip((h, w), pad, dilation, (kh, kw), stride))
    if oh <= 0 or ow <= 0:
        raise BuildError(f"squeezer::int_conv2d at {node.name}: the kernel is larger than the padded input")
    m = batch * oh * ow
    kind = kernel_for(ctx, m, f"squeezer::int_conv2d at {node.name}")
    x = bb.emit(relax.op.permute_dims(importer.env[x_node], [0, 2, 3, 1]))
    q = _quantized(bb, x, inverse_scale(x_scale), zero, 2 ** a_bits - 1)
    geometry = Geometry((kh, kw), stride, pad, dilation, (oh, ow))
    nhwc = (batch, oh, ow, n)
    groups = int(node.args[10]) if len(node.args) > 10 else int(node.kwargs.get("groups", 1))
    if groups != 1:
        y = _grouped_conv(bb, q, codes, scale, bias, zero, geometry, groups)
    elif kind == "vnni" and (kh, kw) + pad != (1, 1, 0, 0):
        y = _implicit_conv(bb, q, codes, scale, bias, zero, geometry, nhwc)
    else:
        a = _rows_of(bb, kind, q, zero, geometry)
        y = _gemm(bb, kind, a, codes.transpose(0, 2, 3, 1).reshape(n, -1), scale, bias, zero, "int_conv2d", nhwc)
    return bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))


class Geometry(NamedTuple):
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]
    dilation: tuple[int, int]
    out: tuple[int, int]


def _rows_of(bb, kind: str, q, zero: int, g: Geometry):
    """The conv's GEMM rows from its NHWC input codes ``q``: (B·OH·OW, kh·kw·C), taps ``(ky, kx, c)``
    with the zero point outside the input. A 1×1 unpadded stride-1 conv's rows are ``q`` itself."""
    batch, h, w, c_in = (int(d) for d in q.ty.shape)
    (kh, kw), (oh, ow) = g.kernel, g.out
    if (kh, kw) + g.pad + g.stride == (1, 1, 0, 0, 1, 1):
        return bb.emit(relax.op.reshape(q, (batch * h * w, c_in)))

    def im2col(t):
        def code(b, oy, ox, tap, c):
            iy = oy * g.stride[0] + tap // kw * g.dilation[0] - g.pad[0]
            ix = ox * g.stride[1] + tap % kw * g.dilation[1] - g.pad[1]
            inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < w)
            value = t[b, tirx.max(tirx.min(iy, h - 1), 0), tirx.max(tirx.min(ix, w - 1), 0), c]
            return tirx.Select(inside, value, tirx.const(zero, "uint8"))
        return te.compute((batch, oh, ow, kh * kw, c_in), code, name="int_im2col")

    if kind == "generic":   # TE: the GPU schedules bind its threads
        a = _unfused(bb, bb.emit_te(im2col, q, primfunc_name_hint="int_im2col"))
        return bb.emit(relax.op.reshape(a, (batch * oh * ow, kh * kw * c_in)))
    func = int_im2col.im2col(batch, (h, w), c_in, g.kernel, g.stride, g.pad, g.dilation, g.out, zero)
    gv = _add_kernel(bb, func.with_attr("op_pattern", 8), "int_im2col")
    return bb.emit(relax.call_tir(gv, [q], relax.TensorType((batch * oh * ow, kh * kw * c_in), "uint8")))


def padded_codes(bb, q, pad: tuple[int, int], zero: int, c_to: int):
    """NHWC codes ``q`` padded by the zero point around H and W (a real 0) and with zero codes to
    ``c_to`` channels (they meet zero weights); ``q`` itself when there is nothing to pad."""
    batch, h, w, c = (int(d) for d in q.ty.shape)
    (ph, pw) = pad
    if (ph, pw, c_to) == (0, 0, c):
        return q

    def padded(t):
        def code(b, yy, xx, ch):
            iy, ix = yy - ph, xx - pw
            inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < w)
            value = tirx.Select(inside, t[b, tirx.max(tirx.min(iy, h - 1), 0), tirx.max(tirx.min(ix, w - 1), 0),
                                          tirx.min(ch, c - 1)], tirx.const(zero, "uint8"))
            return tirx.Select(ch < c, value, tirx.const(0, "uint8")) if c_to > c else value
        return te.compute((batch, h + 2 * ph, w + 2 * pw, c_to), code, name="int_padded_codes")

    return bb.emit_te(padded, q, primfunc_name_hint="int_padded_codes")


def _implicit_conv(bb, q, codes: np.ndarray, scale, bias, zero: int, g: Geometry, nhwc: tuple[int, int, int, int]):
    """VNNI: the conv straight over the zero-point-padded NHWC codes, channels padded to whole
    words (no im2col copy); (B, OH, OW, N) float32."""
    n, c_in, kh, kw = codes.shape
    batch, h, w, _ = (int(d) for d in q.ty.shape)
    (ph, pw), c_pad = g.pad, -(-c_in // 4) * 4
    p = padded_codes(bb, q, g.pad, zero, c_pad)
    full = np.zeros((n, kh, kw, c_pad), np.int8)
    full[..., :c_in] = codes.transpose(0, 2, 3, 1)
    args = [batch, [h + 2 * ph, w + 2 * pw], c_pad // 4, [kh, kw], list(g.stride), list(g.dilation), list(g.out), n]
    cols = -(-n // vnni_kernels.LANES) * vnni_kernels.LANES
    return _call(bb, "vnni_conv", args, p, full.reshape(n, -1), scale, bias, zero, "int_conv2d_vnni", nhwc, cols,
                 kh * kw * c_pad)


def _grouped_conv(bb, q, codes: np.ndarray, scale, bias, zero: int, g: Geometry, groups: int):
    """A grouped (depthwise) conv as Relax's own NHWC conv2d on the codes padded with the zero
    point, which the CPU schedules run with the epilogue (and the next layer's quantize) fused. The
    sums are exact in float32 while ``taps · channels per group · 255 · 128 < 2^24`` (a depthwise
    3×3: 9 taps), so the codes and weights meet there as floats; larger groups sum in int32."""
    n, per_group, kh, kw = codes.shape
    (ph, pw) = g.pad
    if ph or pw:
        q = bb.emit(relax.op.nn.pad(q, [0, 0, ph, ph, pw, pw, 0, 0], pad_value=float(zero)))
    in_float = per_group * kh * kw * 255 * 128 < 2 ** 24
    weights = codes.transpose(2, 3, 1, 0).astype(np.float32 if in_float else np.int8)   # HWIO
    acc = bb.emit(relax.op.nn.conv2d(q, relax.const(weights), g.stride, 0, g.dilation, groups, data_layout="NHWC",
                                     kernel_layout="HWIO", out_dtype="float32" if in_float else "int32"))
    corr = zero * codes.astype(np.int64).reshape(n, -1).sum(1)
    if in_float:
        core = bb.emit(relax.op.subtract(acc, relax.const(corr.astype(np.float32))))
    else:
        core = bb.emit(relax.op.astype(relax.op.subtract(acc, relax.const(corr.astype(np.int32))), "float32"))
    return bb.emit(relax.op.add(relax.op.multiply(core, relax.const(scale)), relax.const(bias)))
