"""Lowerings of ``squeezer::bitserial_linear`` / ``bitserial_conv2d`` (compiler/ops/bitserial.py).

Pure ±1 layers (BNN / XNOR-Net) run on AMX int8 tiles (kernels/amx_kernels.py) where AMX can take
them and ``codegen.build(binary_kernels=)`` says so (kernel_choice.use_amx), else on the
hand-written xnor-popcount kernels (kernels/popcount_kernels.py) on AVX-512 CPUs that fit; pure ±1
dense layers on CUDA on the warp-per-row GEMV of kernels/cuda_kernels.py, pure ±1 convs on CUDA on
the implicit-GEMM popcount conv of kernels/cuda_conv.py (where a channel tile's weights fit in
shared memory); every other layer, and
every layer on other targets, on the TE kernels of kernels/bitserial_te.py — scheduled by
schedules/bitserial_cpu.py on CPU, one thread per output on CUDA."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from types import SimpleNamespace

import numpy as np
import torch
from tvm import relax, te

from compiler.errors import BuildError, last_line
from compiler.ops.bitserial import ABSMAX_EPS, activation_coefficients, as_words, unpack_bits

from .. import kernel_choice
from .. import gpu_layouts
from ..kernels import amx_kernels, cuda_conv, cuda_kernels, gpu_verified, popcount_kernels
from ..kernels import bitserial_te as bt
from ..schedules import bitserial_cpu
from ..schedules.cuda import one_thread_per_output
from .context import LoweringContext


@dataclass(frozen=True)
class _Layer:
    """The constants of one bit-serial layer."""

    name: str
    packed: np.ndarray        # (P, N, bytes) weight planes
    coef: np.ndarray          # e_j per plane (float64)
    code: bt.Coding
    alpha: np.ndarray         # float32 per output
    bias: np.ndarray          # float32 per output (zeros without a bias)


def _const(ctx: LoweringContext, importer, node, what: str, layer: str) -> np.ndarray | None:
    return ctx.layer_constant(importer, node, what, f"squeezer::bitserial at {layer}")


def _read_layer(ctx, importer, node, planes_node, coef_node, w_offset, alpha_node, bias_node, a_mode, a_bits,
                xnor) -> _Layer:
    layer, op = node.name, node.target.name().split("::")[-1]
    if node.args[0].meta["val"].dtype != torch.float32:
        raise BuildError(f"squeezer::{op} at {layer}: float32 input only")
    packed = _const(ctx, importer, planes_node, "w_planes", layer)
    coef = _const(ctx, importer, coef_node, "w_coef", layer).astype(np.float64)
    alpha = _const(ctx, importer, alpha_node, "alpha", layer).astype("float32")
    bias = _const(ctx, importer, bias_node, "bias", layer)
    bias = np.zeros_like(alpha) if bias is None else bias.astype("float32")
    code = bt.Coding(tuple(float(c) for c in coef), float(w_offset), a_mode, int(a_bits), bool(xnor))
    return _Layer(layer, packed, coef, code, alpha, bias)


def _call_kernel(bb, func, name: str, args: list, out_shape):
    """Add the scheduled kernel ``func`` under a per-layer symbol and call it (float32 output).
    Opaque to FuseOps: the kernel is scheduled as a whole (fusing would drop its schedule)."""
    name = f"{name}_{len(bb.get().functions)}"   # one symbol per layer
    gv = bb.add_func(func.with_attr("global_symbol", name).with_attr("op_pattern", 8), name)
    return bb.emit(relax.call_tir(gv, args, relax.TensorType(out_shape, "float32")))


def _emit(ctx: LoweringContext, bb, tensors: list, args: list, out_shape, name: str, cpu_schedule):
    """The prim func of TE ``tensors`` (placeholders..., output), scheduled for the target, called."""
    func = te.create_prim_func(tensors)
    if not ctx.options.cpu:   # a CPU schedule in a GPU build would run on the host against device memory
        func = one_thread_per_output(func)
    else:
        try:
            func = cpu_schedule(func)
        except Exception as exc:  # noqa: BLE001 - an unusual shape falls back to the default schedule rules
            warnings.warn(f"{name}: the popcount schedule did not apply ({type(exc).__name__}: "
                          f"{last_line(exc)}); using the default rules")
    return _call_kernel(bb, func, name, args, out_shape)


def _timers(ctx: LoweringContext, node, importer, lower):
    """For kernel_choice: a timer of this layer alone, lowered with ``binary_kernels=kind``."""
    def build_timer(kind: str):
        x_node = node.args[0]
        shape = tuple(int(d) for d in x_node.meta["val"].shape)
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType(shape, "float32"))
        with bb.function("main", [x]):
            with bb.dataflow():
                stand_in = SimpleNamespace(block_builder=bb, env={**importer.env, x_node: x})
                out = bb.emit_output(lower(node, stand_in, ctx.with_options(binary_kernels=kind)))
            bb.emit_func_output(out)
        arg = np.random.default_rng(0).standard_normal(shape).astype("float32")
        return kernel_choice.layer_timer(bb.get(), ctx.options, [arg], repeat=3, min_repeat_ms=10)
    return build_timer


def _use_amx(ctx: LoweringContext, node, importer, lower, layer: str, qualifies: bool) -> bool:
    signature = repr((str(ctx.target), [repr(a) if not hasattr(a, "meta") else tuple(a.meta["val"].shape)
                                        for a in node.args]))
    return kernel_choice.use_amx(ctx.options, layer, qualifies, signature, _timers(ctx, node, importer, lower),
                                 tuple(node.args[0].meta["val"].shape))


# ---- linear --------------------------------------------------------------------------------------------------
def _row_abs_sum(ctx: LoweringContext, bb, x2d, m: int, k_in: int):
    """XNOR-Net's row scale as its own small kernel (an input of the dense kernels)."""
    func = te.create_prim_func(bt.row_abs_sum(m, k_in))
    func = bitserial_cpu.row_abs_sum(func) if ctx.options.cpu else one_thread_per_output(func)
    return _call_kernel(bb, func, "row_abs_sum", [x2d], (m,))


def _dense_te(ctx, bb, L: _Layer, x2d, m: int, k_in: int):
    """The TE dense kernels (kernels/bitserial_te.py): float activations, ±1, or any planes."""
    code, words = L.code, as_words(L.packed)
    n_out, n_words = words.shape[1], words.shape[-1]
    args = [x2d, relax.const(bt.dense_weight_layout(words)), relax.const(L.alpha), relax.const(L.bias)]
    if code.a_mode == "float":
        sched = lambda f: bitserial_cpu.popcount_tiles(f, [], "i", "n", n_out, m)  # noqa: E731
        return _emit(ctx, bb, bt.dense_float(m, k_in, n_out, n_words, code), args, (m, n_out), "bitserial_dense_f",
                     sched)
    sched = lambda f: bitserial_cpu.popcount_tiles(f, ["i", "j"], "row", "n", n_out, m)  # noqa: E731
    beta = [_row_abs_sum(ctx, bb, x2d, m, k_in)] if code.xnor else []
    if code.pure_binary:
        return _emit(ctx, bb, bt.dense_xnor(m, k_in, n_out, n_words, code), args + beta, (m, n_out),
                     "bitserial_dense_xnor", sched)
    c, d_a, s_a = activation_coefficients(code.a_mode, code.a_bits)
    bits = unpack_bits(torch.from_numpy(L.packed), k_in).numpy()
    rw = bt.plane_constants(L.coef, code.w_offset, d_a, k_in, bits)
    return _emit(ctx, bb, bt.dense_planes(m, k_in, n_out, n_words, code, c, s_a), args + [relax.const(rw)] + beta,
                 (m, n_out), "bitserial_dense", sched)


def _absmax_quantize(bb, x2d, bits: int):
    """BitNet's per-token quantizer (compiler.ops.bitserial.absmax_quantize) as Relax ops: the
    integer codes over the row's scale, in float32 as the reference computes them."""
    top = float(2 ** (bits - 1) - 1)
    f = lambda v: relax.const(v, "float32")  # noqa: E731
    amax = bb.emit(relax.op.maximum(relax.op.max(relax.op.abs(x2d), axis=[-1], keepdims=True), f(ABSMAX_EPS)))
    scale = bb.emit(relax.op.divide(f(top), amax))
    codes = relax.op.clip(relax.op.floor(relax.op.add(relax.op.multiply(x2d, scale), f(0.5))), -top - 1, top)
    return bb.emit(relax.op.divide(codes, scale))


def lower_bitserial_linear(node, importer, ctx: LoweringContext):
    x_node, planes, coef, w_offset, alpha, bias, k_in, a_mode, a_bits, xnor = node.args
    L = _read_layer(ctx, importer, node, planes, coef, w_offset, alpha, bias, a_mode, a_bits, xnor)
    bb = importer.block_builder
    shape = [int(d) for d in x_node.meta["val"].shape]
    lead, m = shape[:-1], math.prod(shape[:-1])
    x2d = bb.emit(relax.op.reshape(importer.env[x_node], (m, k_in))) if len(shape) != 2 else importer.env[x_node]
    if a_mode == "absmax":   # quantized codes, then the float-activation kernel on them
        x2d = _absmax_quantize(bb, x2d, int(a_bits))
        L = replace(L, code=replace(L.code, a_mode="float"))
    n_out = L.packed.shape[1]
    binary = a_mode != "float" and L.code.pure_binary
    if binary and _use_amx(ctx, node, importer, lower_bitserial_linear, L.name, m >= amx_kernels.MIN_ROWS):
        words = as_words(L.packed)[0]
        func = amx_kernels.binary_dense(m, k_in, n_out, L.code.xnor, ctx.options.threads)
        args = [x2d, relax.const(amx_kernels.dense_weight_bits(words, n_out)), relax.const(L.alpha),
                relax.const(L.bias)]
        y = _call_kernel(bb, func, "binary_dense_amx", args, (m, n_out))
    elif binary and ctx.options.cuda:   # warp-per-row xnor-popcount GEMV (kernels/cuda_kernels.py)
        func = cuda_kernels.binary_gemv(m, k_in, n_out, L.code.xnor, *cuda_kernels.binary_config(m))
        args = [x2d, relax.const(gpu_layouts.binary_rows(L.packed[0], k_in)), relax.const(L.alpha),
                relax.const(L.bias)]
        y = _call_kernel(bb, func, "binary_gemv_cuda", args, (m, n_out))
    elif binary and m >= popcount_kernels.ROW_TILE and popcount_kernels.available(ctx.target):
        func = popcount_kernels.binary_dense(m, k_in, n_out, L.code.xnor)
        args = [x2d, relax.const(popcount_kernels.weight_words(as_words(L.packed)[0])), relax.const(L.alpha),
                relax.const(L.bias)]
        y = _call_kernel(bb, func, "binary_dense_popcount", args, (m, n_out))
    else:
        y = _dense_te(ctx, bb, L, x2d, m, k_in)
    return bb.emit(relax.op.reshape(y, (*lead, n_out))) if len(shape) != 2 else y


# ---- conv2d --------------------------------------------------------------------------------------------------
def _conv_te(ctx, bb, L: _Layer, x, g: bt.ConvGeometry):
    """The TE conv kernels (kernels/bitserial_te.py): float activations, ±1, or any planes."""
    code, words = L.code, as_words(L.packed.reshape(*L.packed.shape[:2], *g.kernel, -1))
    out_shape = (g.batch, g.n_out, *g.out_hw)
    args = [x, relax.const(bt.conv_weight_layout(words)), relax.const(L.alpha), relax.const(L.bias)]
    ow = g.out_hw[1]
    if code.a_mode == "float":
        sched = lambda f: bitserial_cpu.popcount_tiles(f, ["b", "y0"], "x0", "n", g.n_out, ow)  # noqa: E731
        return _emit(ctx, bb, bt.conv_float(g, code), args, out_shape, "bitserial_conv2d_f", sched)
    sched = lambda f: bitserial_cpu.popcount_tiles(f, ["i", "j", "b", "y0"], "x0", "n", g.n_out, ow)  # noqa: E731
    beta = []
    if code.xnor:   # XNOR-Net's K: one small kernel of its own, passed in
        beta = [_emit(ctx, bb, bt.xnor_window_sum(g), [x], (g.batch, *g.out_hw), "xnor_k",
                      bitserial_cpu.xnor_window_sum)]
    if code.pure_binary:
        return _emit(ctx, bb, bt.conv_xnor(g, code), args + beta, out_shape, "bitserial_conv2d_xnor", sched)
    c, d_a, s_a = activation_coefficients(code.a_mode, code.a_bits)
    bits = unpack_bits(torch.from_numpy(L.packed), 10 ** 9).numpy()   # every stored bit (padding bits are 0)
    rw = bt.plane_constants(L.coef, code.w_offset, d_a, g.c_in * g.kernel[0] * g.kernel[1], bits)
    return _emit(ctx, bb, bt.conv_planes(g, code, c, s_a), args + [relax.const(rw)] + beta, out_shape,
                 "bitserial_conv2d", sched)


def _conv_cuda(bb, L: _Layer, x, g: bt.ConvGeometry):
    """The implicit-GEMM binary conv (kernels/cuda_conv.py), or None where no channel tile fits."""
    (kh, kw), oh_ow = g.kernel, g.out_hw
    cfg = cuda_conv.conv_config(g.batch * oh_ow[0] * oh_ow[1])
    rpt = next((r for r in (cfg["rpt"], 4, 2, 1) if cuda_conv.conv_fits(g.c_in, kh, kw, r)), None)
    if rpt is None:
        return None
    func = cuda_conv.binary_conv2d(g.batch, g.c_in, g.h, g.w, g.n_out, g.kernel, g.stride, g.padding, g.dilation,
                                   L.code.xnor, rpt=rpt, pp=cfg["pp"])
    wt = gpu_layouts.binary_conv_tiles(L.packed[0], kh * kw, g.c_in, cuda_conv.WARPS * rpt)
    args = [x, relax.const(wt), relax.const(L.alpha), relax.const(L.bias)]
    return _call_kernel(bb, func, "binary_conv2d_cuda", args, (g.batch, g.n_out, *oh_ow))


def lower_bitserial_conv2d(node, importer, ctx: LoweringContext):
    (x_node, planes, coef, w_offset, alpha, bias, c_in, kernel, stride, padding, dilation,
     a_mode, a_bits, xnor) = node.args
    L = _read_layer(ctx, importer, node, planes, coef, w_offset, alpha, bias, a_mode, a_bits, xnor)
    batch, _, h, w = [int(d) for d in x_node.meta["val"].shape]
    n_out, (kh, kw), (ph, pw) = L.packed.shape[1], kernel, padding
    n_words = as_words(L.packed.reshape(*L.packed.shape[:2], kh, kw, -1)).shape[-1]
    g = bt.ConvGeometry(batch, c_in, h, w, n_out, (kh, kw), tuple(stride), (ph, pw), tuple(dilation), n_words)
    x, bb = importer.env[x_node], importer.block_builder
    binary = a_mode != "float" and L.code.pure_binary
    unit_steps = tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
    if binary and _use_amx(ctx, node, importer, lower_bitserial_conv2d, L.name, unit_steps):
        words = as_words(L.packed.reshape(1, n_out, kh, kw, -1))[0]
        func = amx_kernels.binary_conv2d(batch, c_in, h, w, n_out, kh, kw, ph, pw, L.code.xnor)
        args = [x, relax.const(amx_kernels.weight_tiles(words, n_out)), relax.const(L.alpha), relax.const(L.bias)]
        return _call_kernel(bb, func, "binary_conv2d_amx", args, (batch, n_out, h + 2 * ph - kh + 1,
                                                                  w + 2 * pw - kw + 1))
    if binary and ctx.options.cuda and gpu_verified.allowed("binary_conv2d_cuda") and \
            (y := _conv_cuda(bb, L, x, g)) is not None:
        return y
    if binary and unit_steps and c_in >= popcount_kernels.MIN_CHANNELS and popcount_kernels.available(ctx.target):
        words = as_words(L.packed.reshape(1, n_out, kh, kw, -1))[0]
        func = popcount_kernels.binary_conv2d(batch, c_in, h, w, n_out, kh, kw, ph, pw, L.code.xnor)
        args = [x, relax.const(popcount_kernels.weight_words(words)), relax.const(L.alpha), relax.const(L.bias)]
        return _call_kernel(bb, func, "binary_conv2d_popcount", args, (batch, n_out, *g.out_hw))
    return _conv_te(ctx, bb, L, x, g)
