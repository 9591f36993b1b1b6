"""Lowerings of ``squeezer::int4_linear`` / ``int4_conv2d`` (compiler/ops/int4.py).

As the int8 layers (integer.py): the float input quantized to codes by an elementwise kernel
TVM fuses into the producer, a conv on NHWC between two transposes the layout pass cancels.
The codes are laid out with each tap's channels padded to whole groups (``Cg``, zero codes meeting
zero weights), and the grouped product runs on AVX-512 VNNI with the weights widened from
nibbles in registers (kernels/int4_kernels.py; on an AMX machine too: AMX tiles take int8 rows,
not nibbles), or as a TE reduction over the packed bytes the default schedules take (other CPUs,
CUDA)."""

from __future__ import annotations

import math

import numpy as np
import torch
from tvm import relax, te

from compiler.errors import BuildError
from compiler.ops.int4 import conv_out_hw, groups_per_tap, unpack_nibbles
from compiler.ops.integer import inverse_scale

from ..int_epilogue import build_kernel, kernel_spec
from ..kernels import int4_kernels
from ..kernels.int_output import Output
from ..kernels.vnni_kernels import LANES
from . import integer_cuda
from .context import LoweringContext
from .integer import _add_kernel, _quantized, _unfused, kernel_for, padded_codes


class _Weights:
    """A layer's codes as ``(N, T, Cg)`` (each tap's channels padded to whole groups) with the
    per-group correction and scale arrays, padded to ``cols`` outputs."""

    def __init__(self, codes: np.ndarray, w_scale: np.ndarray, bias: np.ndarray, x_scale: float, zero: int,
                 group_size: int) -> None:
        n, taps, c = codes.shape
        groups = groups_per_tap(c, group_size)
        self.group_size, self.cg, self.taps, self.n = group_size, groups * group_size, taps, n
        self.codes = np.zeros((n, taps, self.cg), np.int8)
        self.codes[..., :c] = codes
        sums = self.codes.astype(np.int64).reshape(n, taps * groups, group_size).sum(2)
        self.corr = (zero * sums).T.astype(np.int32)                                     # (T·G, N)
        self.scale = (np.float32(x_scale) * w_scale.astype(np.float32)).T.astype(np.float32)
        self.bias = bias.astype(np.float32)

    def arrays(self, cols: int) -> list:
        pad = lambda v: np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, cols - self.n)])  # noqa: E731
        return [relax.const(np.ascontiguousarray(pad(self.corr))), relax.const(np.ascontiguousarray(pad(self.scale))),
                relax.const(pad(self.bias))]


def _read(ctx: LoweringContext, importer, node, weight_shape_of):
    """(x node, _Weights, a_bits, where) of an int4 node; ``weight_shape_of(k)`` the codes' shape."""
    x_node, packed_node, w_scale_node, bias_node, x_scale, x_zero, a_bits, group_size = node.args[:8]
    where = f"squeezer::{node.target.name().split('::')[-1]} at {node.name}"
    if x_node.meta["val"].dtype != torch.float32:
        raise BuildError(f"{where}: float32 input only, got {x_node.meta['val'].dtype}")
    packed = ctx.layer_constant(importer, packed_node, "w_packed", where)
    w_scale = ctx.layer_constant(importer, w_scale_node, "w_scale", where)
    bias = ctx.layer_constant(importer, bias_node, "bias", where)
    shape = weight_shape_of(packed.shape[0])
    codes = unpack_nibbles(torch.from_numpy(packed), math.prod(shape[1:])).numpy().reshape(shape)
    if codes.ndim == 4:   # (N, C, kh, kw) -> (N, taps, C)
        codes = codes.transpose(0, 2, 3, 1).reshape(shape[0], -1, shape[1])
    else:
        codes = codes.reshape(shape[0], 1, -1)
    weights = _Weights(codes, w_scale, bias, float(x_scale), int(x_zero), int(group_size))
    return x_node, weights, float(x_scale), int(x_zero), int(a_bits), where


def _kind(ctx: LoweringContext, rows: int, where: str) -> str:
    kind = kernel_for(ctx, rows, where)
    return "vnni" if kind == "amx" else kind   # AMX machines have VNNI; nibbles feed zmm, not tiles


def _vnni(bb, p, wts: _Weights, kernel, stride, dilation, out_hw, out_shape, name: str):
    """The VNNI kernel over the padded codes ``p`` (B, Hp, Wp, Cg): float32 ``out_shape``."""
    batch, hp, wp, _ = (int(d) for d in p.ty.shape)
    cols = -(-wts.n // LANES) * LANES
    args = [batch, [hp, wp], wts.cg, wts.group_size, list(kernel), list(stride), list(dilation), list(out_hw), wts.n]
    gv = _add_kernel(bb, build_kernel(kernel_spec("vnni_int4", args, {}, Output(tuple(out_shape)))), name)
    inputs = [p, relax.const(int4_kernels.pack_weights(wts.codes, cols)), *wts.arrays(cols),
              relax.const(np.array([-np.inf, np.inf], np.float32))]
    return bb.emit(relax.call_tir(gv, inputs, relax.TensorType(out_shape, "float32")))


def _generic(bb, rows, wts: _Weights, out_shape, name: str):
    """The grouped product of the (M, T·Cg) codes ``rows`` as TE reductions over the packed bytes."""
    packed = (wts.codes.reshape(wts.n, -1).astype(np.int16) + 8).astype(np.uint8)
    packed = packed[:, 0::2] | (packed[:, 1::2] << 4)
    y = bb.emit_te(_grouped_gemm, rows, relax.const(packed), *wts.arrays(wts.n), wts.group_size,
                   primfunc_name_hint=f"{name}_generic")
    return bb.emit(relax.op.reshape(y, out_shape)) if len(out_shape) != 2 else y


def _grouped_gemm(a: te.Tensor, packed: te.Tensor, corr: te.Tensor, scale: te.Tensor, bias: te.Tensor,
                  group_size: int) -> te.Tensor:
    m, n, groups = a.shape[0], packed.shape[0], corr.shape[0]

    def weight(j, k):
        nibble = (packed[j, k // 2].astype("int32") >> ((k % 2) * 4)) & 15
        return nibble - 8

    r = te.reduce_axis((0, group_size), name="k")
    core = te.compute((m, n, groups), lambda i, j, g: te.sum(
        a[i, g * group_size + r].astype("int32") * weight(j, g * group_size + r), axis=r), name="int4_core")
    gr = te.reduce_axis((0, groups), name="g")
    total = te.compute((m, n), lambda i, j: te.sum(
        (core[i, j, gr] - corr[gr, j]).astype("float32") * scale[gr, j], axis=gr), name="int4_groups")
    return te.compute((m, n), lambda i, j: total[i, j] + bias[j], name="int4_dequantize")


def lower_int4_linear(node, importer, ctx: LoweringContext):
    x_node, wts, x_scale, zero, a_bits, where = _read(
        ctx, importer, node, lambda n: (n, int(node.args[0].meta["val"].shape[-1])))
    bb = importer.block_builder
    shape = [int(d) for d in x_node.meta["val"].shape]
    m, k = math.prod(shape[:-1]), shape[-1]
    q = _quantized(bb, importer.env[x_node], inverse_scale(x_scale), zero, 2 ** a_bits - 1)
    rows = bb.emit(relax.op.reshape(q, (m, 1, 1, k)))
    p = padded_codes(bb, rows, (0, 0), zero, wts.cg)
    out_shape = (*shape[:-1], wts.n)
    if integer_cuda.applies(ctx, m, wts.cg):
        arrays = integer_cuda.int4_arrays(wts.codes[:, 0], wts.scale.T, wts.bias, zero, wts.group_size)
        y = integer_cuda.gemv(bb, _add_kernel, bb.emit(relax.op.reshape(p, (m, wts.cg))), arrays, wts.cg, True,
                              wts.group_size, "int4_linear_dp4a")
        return bb.emit(relax.op.reshape(y, out_shape)) if len(out_shape) != 2 else y
    if _kind(ctx, m, where) == "vnni":
        return _vnni(bb, p, wts, (1, 1), (1, 1), (1, 1), (1, 1), out_shape, "int4_linear_vnni")
    return _generic(bb, bb.emit(relax.op.reshape(p, (m, wts.cg))), wts, out_shape, "int4_linear")


def lower_int4_conv2d(node, importer, ctx: LoweringContext):
    """A grouped-4-bit conv on NHWC between transposes (module docstring)."""
    x_node = node.args[0]
    batch, c_in, h, w = (int(d) for d in x_node.meta["val"].shape)
    kernel, stride, pad, dilation = (tuple(int(v) for v in node.args[i]) for i in (8, 9, 10, 11))
    _, wts, x_scale, zero, a_bits, where = _read(ctx, importer, node, lambda n: (n, c_in, *kernel))
    oh, ow = conv_out_hw((h, w), kernel, stride, pad, dilation)
    if oh <= 0 or ow <= 0:
        raise BuildError(f"{where}: the kernel is larger than the padded input")
    bb = importer.block_builder
    x = bb.emit(relax.op.permute_dims(importer.env[x_node], [0, 2, 3, 1]))
    q = _quantized(bb, x, inverse_scale(x_scale), zero, 2 ** a_bits - 1)
    p = padded_codes(bb, q, pad, zero, wts.cg)
    nhwc = (batch, oh, ow, wts.n)
    if _kind(ctx, batch * oh * ow, where) == "vnni":
        y = _vnni(bb, p, wts, kernel, stride, dilation, (oh, ow), nhwc, "int4_conv2d_vnni")
    else:
        y = _generic(bb, _im2col(bb, p, kernel, stride, dilation, (oh, ow)), wts, nhwc, "int4_conv2d")
    return bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))


def _im2col(bb, p, kernel, stride, dilation, out_hw):
    """(B·OH·OW, T·Cg) rows of the padded codes ``p``, taps ``(ky, kx)`` then channels."""
    batch, _, _, cg = (int(d) for d in p.ty.shape)
    (kh, kw), (oh, ow) = kernel, out_hw
    cols = bb.emit_te(lambda t: te.compute((batch, oh, ow, kh * kw, cg), lambda b, oy, ox, tap, c: t[
        b, oy * stride[0] + tap // kw * dilation[0], ox * stride[1] + tap % kw * dilation[1], c], name="int4_im2col"),
        p, primfunc_name_hint="int4_im2col")
    return bb.emit(relax.op.reshape(_unfused(bb, cols), (batch * oh * ow, kh * kw * cg)))
