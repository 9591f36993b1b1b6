"""Lowerings of the sparse and clustered ops (``sparse_linear``, ``sparse_conv2d``, ``lut_linear``,
``lut_conv2d``): every one becomes "(M, K) activations × stored weight" — a conv through im2col —
computed by the kernel in kernels/sparse_kernels.py that fits its storage, or by a dense matmul of
the decoded weight (kernel_choice.py decides, by ``codegen.build(sparse_kernels=)``).

The weights are not constants of the compiled library: their canonical form is registered with
the build's runtime-weights store (encoded into the artifact at export, Huffman and all) and the
arrays the chosen kernel reads become parameters of ``main``, rebuilt from the encoding when the
artifact loads.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax, te

from compiler.errors import BuildError

from .. import kernel_choice
from .. import weight_codec as wc
from ..kernels import cuda_kernels, cuda_lut
from ..kernels import sparse_kernels as K
from ..kernels.lut_te import lut_dense_te
from .context import LoweringContext


def _value(ctx: LoweringContext, node, what: str, layer: str) -> np.ndarray | None:
    if node is None:
        return None
    v = ctx.constant(node)
    if v is None:
        raise BuildError(f"{layer}: {what} must be a parameter or buffer of the layer (got a computed tensor)")
    return v


def _layer_key(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return (list(stack.values())[-1][0] if stack else "") or node.name


def _dense_plan() -> tuple[str, str, dict]:
    return "dense", "dense", {"transpose": True}


# ---- emitters: (M, K) x stored weight -> (M, N) -----------------------------------------------------------
def _call(bb, func, name: str, args: list, out_shape) -> relax.Expr:
    func = func.with_attr("global_symbol", name).with_attr("op_pattern", 8).with_attr("tirx.is_scheduled", True)
    gv = bb.add_func(func, name)
    return bb.emit(relax.call_tir(gv, args, relax.TensorType(list(out_shape), "float32")))


def _shape(e: relax.Expr) -> tuple[list[int], str]:
    """Shape and dtype of a relax variable or constant (constants are not normalized yet)."""
    if isinstance(e, tvm.ir.expr.Constant):
        return list(e.value.shape), str(e.value.dtype)
    return [int(d) for d in e.ty.shape], str(e.ty.dtype)


def _unique(bb, base: str) -> str:
    return f"{base}_{len(bb.get().functions)}"


def emit_weight_matmul(bb, x2d: relax.Expr, m: int, w, kernel: str, a: dict[str, relax.Expr]) -> relax.Expr:
    """``x2d`` (m, k) times the stored weight (n, k) transposed, plus bias -> (m, n)."""
    n, k = w.shape
    has_bias = w.bias is not None
    bias = a.get("bias", relax.const(np.zeros(n, np.float32)))
    if kernel in ("csr_gather", "csr_chunk", "csr_xt", "csr_cuda", "csr_warp", "csr_spmm"):
        cb = a.get("codebook", relax.const(np.zeros(1, np.float32)))
        cb_shape = _shape(cb)[0]
        lut = cb_shape[-1] if "codebook" in a else 0
        per_row = len(cb_shape) == 2
        if per_row:                                    # (rows, k) per output channel -> flat
            cb = bb.emit(relax.op.reshape(cb, (cb_shape[0] * cb_shape[1],)))
        nnz = _shape(a["col_idx"] if "col_idx" in a else a["offsets"])[0][0]
        if kernel == "csr_chunk":
            f = K.csr_chunk(m, n, k, _shape(a["base"])[0][0], lut, has_bias, per_row=per_row)
            return _call(bb, f, _unique(bb, "csr_chunk"), [x2d, a["values"], a["offsets"], a["base"], a["count"],
                                                           a["row_ptr"], cb, bias], (m, n))
        if kernel == "csr_gather":
            f = K.csr_gather(m, n, k, nnz, _shape(a["col_idx"])[1], lut, has_bias, per_row=per_row)
            return _call(bb, f, _unique(bb, "csr_gather"), [x2d, a["values"], a["col_idx"], a["row_ptr"], cb, bias], (m, n))
        if kernel == "csr_warp":
            f = cuda_kernels.csr_gemv(m, n, k, nnz, _shape(a["col_idx"])[1], lut, has_bias, per_row=per_row)
            return _call(bb, f, _unique(bb, "csr_warp"), [x2d, a["values"], a["col_idx"], a["row_ptr"], cb, bias], (m, n))
        if kernel == "csr_spmm":
            f = cuda_kernels.csr_spmm(m, n, k, nnz, _shape(a["col_idx"])[1], lut, has_bias, per_row=per_row,
                                      **cuda_kernels.spmm_config(m))
            return _call(bb, f, _unique(bb, "csr_spmm"), [x2d, a["values"], a["col_idx"], a["row_ptr"], a["order"], cb,
                                                          bias], (m, n))
        if kernel == "csr_cuda":
            f = K.csr_cuda(m, n, k, nnz, lut, has_bias, per_row=per_row)
            return _call(bb, f, _unique(bb, "csr_cuda"), [x2d, a["values"], a["col_idx"], a["row_ptr"], cb, bias], (m, n))
        mp = -(-m // 16) * 16
        xt = bb.emit(relax.op.permute_dims(x2d, [1, 0]))
        if mp != m:
            xt = bb.emit(relax.op.nn.pad(xt, [0, 0, 0, mp - m]))
        f = K.csr_xt(mp, n, k, nnz, lut, has_bias, per_row=per_row)
        yt = _call(bb, f, _unique(bb, "csr_xt"), [xt, a["values"], a["col_idx"], a["row_ptr"], cb, bias], (n, mp))
        if mp != m:
            yt = bb.emit(relax.op.strided_slice(yt, axes=[1], begin=[0], end=[m]))
        return bb.emit(relax.op.permute_dims(yt, [1, 0]))
    if kernel == "bsr":
        data = a["data"]
        nnzb, bc, br = _shape(data)[0]
        tm = next(t for t in (8, 4, 2, 1) if m % t == 0 and t * br <= 128)
        f = K.bsr(m, n, k, nnzb, br, bc, has_bias, tm)
        return _call(bb, f, _unique(bb, "bsr"), [x2d, data, a["block_col"], a["block_ptr"], bias], (m, n))
    if kernel == "lut_tir":
        cb_shape = _shape(a["codebook"])[0]
        ncb, per_row = cb_shape[-1], len(cb_shape) == 2
        cb = bb.emit(relax.op.reshape(a["codebook"], (cb_shape[0] * ncb,))) if per_row else a["codebook"]
        tiles, _, width = _shape(a["packed_t"])[0]
        n_p, nv = tiles * width, width // 16
        if n_p != n and not has_bias:
            bias = relax.const(np.zeros(n_p, np.float32))
        tm = next(t for t in (4, 3, 2, 1) if m % t == 0) if nv == 4 else next(t for t in (8, 6, 5, 4, 3, 2, 1) if m % t == 0)
        f = K.lut_dense(m, n_p, k, w.bits, ncb, tm, nv, has_bias, ncb == 16 and not per_row, per_row)
        y = _call(bb, f, _unique(bb, "lut_dense"), [x2d, a["packed_t"], cb, bias], (m, n_p))
        return bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[n])) if n_p != n else y
    if kernel == "lut_warp":
        cb_shape = _shape(a["codebook"])[0]
        ncb, per_row = cb_shape[-1], len(cb_shape) == 2
        cb = bb.emit(relax.op.reshape(a["codebook"], (cb_shape[0] * ncb,))) if per_row else a["codebook"]
        f = cuda_kernels.lut_gemv(m, k, n, w.bits, ncb, has_bias, per_row)
        return _call(bb, f, _unique(bb, "lut_warp"), [x2d, a["words"], cb, bias], (m, n))
    if kernel == "lut_gemm":
        cb_shape = _shape(a["codebook"])[0]
        ncb, per_row = cb_shape[-1], len(cb_shape) == 2
        cb = bb.emit(relax.op.reshape(a["codebook"], (cb_shape[0] * ncb,))) if per_row else a["codebook"]
        f = cuda_lut.lut_gemm(m, k, n, w.bits, ncb, has_bias, per_row, **cuda_lut.gemm_config(m))
        return _call(bb, f, _unique(bb, "lut_gemm"), [x2d, a["words"], cb, bias], (m, n))
    if kernel == "lut_te":
        y = bb.emit_te(lut_dense_te, x2d, a["packed_t"], a["codebook"], w.bits, k, primfunc_name_hint="lut_dense")
        return bb.emit(relax.op.add(y, bias)) if has_bias else y
    if kernel == "dense":
        y = bb.emit(relax.op.matmul(x2d, a["weight"]))
        return bb.emit(relax.op.add(y, bias)) if has_bias else y
    raise BuildError(f"unknown weight kernel {kernel!r}")


# ---- layer emitters: a linear, or a conv (im2col + weight matmul, or a dense conv2d) -------------------------
def _emit_linear(bb, x2d, w, kernel: str, a: dict) -> relax.Expr:
    return emit_weight_matmul(bb, x2d, int(_shape(x2d)[0][0]), w, kernel, a)


def _conv_emitter(weight_shape, stride, padding, dilation):
    co, ci, kh, kw = (int(d) for d in weight_shape)

    def emit(bb, x, w, kernel: str, a: dict) -> relax.Expr:
        nb, c, h, wd = _shape(x)[0]
        oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        if kernel == "dense":   # the decoded weight through the regular conv2d path (NHWC schedules)
            wt = bb.emit(relax.op.reshape(a["weight"], (co, ci, kh, kw)))
            y = bb.emit(relax.op.nn.conv2d(x, wt, strides=list(stride), padding=list(padding), dilation=list(dilation)))
            if "bias" in a:
                y = bb.emit(relax.op.add(y, relax.op.reshape(a["bias"], (1, co, 1, 1))))
            return y
        cols = bb.emit_te(_im2col, x, kh, kw, list(stride), list(padding), list(dilation), oh, ow,
                          primfunc_name_hint="im2col")
        y = emit_weight_matmul(bb, cols, nb * oh * ow, w, kernel, a)
        y = bb.emit(relax.op.reshape(y, (nb, oh, ow, co)))
        return bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))
    return emit


def _timers(ctx: LoweringContext, w, emit, x_shape, layouts):
    """For kernel_choice: a timer of this layer alone with a plan's kernel and layout."""
    def build_timer(plan) -> kernel_choice.Timer:
        kernel, lay, opts = plan
        arrays = layouts(lay, opts)
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType(tuple(x_shape), "float32"))
        params = {name: relax.Var(name, relax.TensorType(arr.shape, str(arr.dtype))) for name, arr in arrays.items()}
        with bb.function("main", [x, *params.values()]):
            with bb.dataflow():
                out = bb.emit_output(emit(bb, x, w, kernel, params))
            bb.emit_func_output(out)
        args = [np.random.default_rng(0).standard_normal(tuple(x_shape)).astype("float32"), *arrays.values()]
        return kernel_choice.layer_timer(bb.get(), ctx.options, args, repeat=5, min_repeat_ms=20)
    return build_timer


def _lower(node, importer, ctx: LoweringContext, w, x, x_shape, m_rows: int, emit, dense, block=(1, 1),
           sig_extra=()) -> relax.Expr:
    key = _layer_key(node)
    target = ctx.target
    if isinstance(w, wc.SparseWeights):
        plan = kernel_choice.sparse_plan(w, m_rows, tuple(block), target)
    else:
        plan = kernel_choice.lut_plan(w, target, m_rows)
    built: dict[tuple, dict] = {}

    def layouts(lay: str, opts: dict) -> dict:   # each layout built once (timing and the build share it)
        k = (lay, repr(sorted(opts.items())))
        if k not in built:
            built[k] = wc.layout(w, lay, **opts)
        return built[k]

    signature = repr((str(target), plan, tuple(x_shape), w.shape, getattr(w, "nnz", None), getattr(w, "bits", None),
                      None if w.codebook is None else w.codebook.shape, sig_extra))
    kernel, lay, opts = kernel_choice.sparse_or_dense(ctx.options, key, signature, plan, dense,
                                                      _timers(ctx, w, emit, x_shape, layouts))
    arrays = layouts(lay, opts)
    exprs = ctx.weights.add(key, w, lay, opts, arrays)
    return emit(importer.block_builder, x, w, kernel, exprs)


# ---- im2col -------------------------------------------------------------------------------------------------
def _im2col(x, kh: int, kw: int, stride, padding, dilation, oh: int, ow: int):
    """(N, C, H, W) -> (N*OH*OW, C*kh*kw), zero padding folded into the gather."""
    nb, c, h, wd = (int(d) for d in x.shape)
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation

    def f(p, q):
        n, rem = p // (oh * ow), p % (oh * ow)
        y, xw = rem // ow, rem % ow
        ci, r = q // (kh * kw), q % (kh * kw)
        iy = y * sh + (r // kw) * dh - ph
        ix = xw * sw + (r % kw) * dw - pw
        inside = tvm.tirx.all(iy >= 0, iy < h, ix >= 0, ix < wd)
        return tvm.tirx.if_then_else(inside, x[n, ci, tvm.te.max(te.min(iy, h - 1), 0), te.max(te.min(ix, wd - 1), 0)],
                                     tvm.tirx.const(0.0, "float32"))

    return te.compute((nb * oh * ow, c * kh * kw), f, name="im2col")


def _conv(node, importer, ctx, w, weight_shape, stride, padding, dilation, block=(1, 1)) -> relax.Expr:
    x_node = node.args[0]
    x_shape = [int(d) for d in x_node.meta["val"].shape]
    nb, c, h, wd = x_shape
    co, ci, kh, kw = (int(d) for d in weight_shape)
    if ci != c:
        raise BuildError(f"{_layer_key(node)}: the stored weight expects {ci} input channels, the input has {c}")
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    emit = _conv_emitter(weight_shape, stride, padding, dilation)
    conf = (tuple(weight_shape), tuple(stride), tuple(padding), tuple(dilation))
    return _lower(node, importer, ctx, w, importer.env[x_node], x_shape, nb * oh * ow, emit,
                  ("dense", "dense", {"transpose": False}), block, conf)


def _linear(node, importer, ctx, w, block=(1, 1)) -> relax.Expr:
    x_node = node.args[0]
    bb = importer.block_builder
    shape = [int(d) for d in x_node.meta["val"].shape]
    if shape[-1] != w.shape[1]:
        raise BuildError(f"{_layer_key(node)}: input has {shape[-1]} features, the stored weight {w.shape[1]}")
    lead = shape[:-1]
    m = math.prod(lead)
    x = importer.env[x_node]
    x2d = bb.emit(relax.op.reshape(x, (m, shape[-1]))) if len(shape) != 2 else x
    y = _lower(node, importer, ctx, w, x2d, (m, shape[-1]), m, _emit_linear, _dense_plan(), block)
    return bb.emit(relax.op.reshape(y, (*lead, w.shape[0]))) if len(shape) != 2 else y


def _check_float_input(node) -> None:
    import torch

    dtype = node.args[0].meta["val"].dtype
    if dtype != torch.float32:
        raise BuildError(f"squeezer::{node.target.name().split('::')[-1]} at {_layer_key(node)}: input dtype {dtype} "
                         "is not supported (float32 only)")


def _sparse_weights(ctx, layer: str, values, col, ptr, cb, bias, shape2d) -> wc.SparseWeights:
    return wc.SparseWeights.canonical(shape2d, _value(ctx, ptr, "row_ptr", layer), _value(ctx, col, "col_idx", layer),
                                      _value(ctx, values, "values", layer), _value(ctx, cb, "codebook", layer),
                                      _value(ctx, bias, "bias", layer))


def lower_sparse_linear(node, importer, ctx: LoweringContext):
    _check_float_input(node)
    _, values, col, ptr, cb, bias, in_features, block = node.args
    layer = _layer_key(node)
    n = int(ptr.meta["val"].shape[0]) - 1
    w = _sparse_weights(ctx, layer, values, col, ptr, cb, bias, (n, int(in_features)))
    return _linear(node, importer, ctx, w, tuple(block))


def lower_sparse_conv2d(node, importer, ctx: LoweringContext):
    _check_float_input(node)
    _, values, col, ptr, cb, bias, weight_shape, stride, padding, dilation, block = node.args
    layer = _layer_key(node)
    shape2d = (int(weight_shape[0]), int(np.prod(weight_shape[1:])))
    w = _sparse_weights(ctx, layer, values, col, ptr, cb, bias, shape2d)
    return _conv(node, importer, ctx, w, weight_shape, stride, padding, dilation, tuple(block))


def _lut_weights(ctx, layer: str, packed, cb, bias, bits: int, shape2d) -> wc.LutWeights:
    from compiler.ops.lut_linear import unpack_indices
    import torch

    p = _value(ctx, packed, "packed indices", layer)
    idx = unpack_indices(torch.from_numpy(p), int(bits), shape2d[1]).numpy().astype(np.uint8)
    return wc.LutWeights((int(shape2d[0]), int(shape2d[1])), int(bits), idx, _value(ctx, cb, "codebook", layer),
                         _value(ctx, bias, "bias", layer))


def lower_lut_linear(node, importer, ctx: LoweringContext):
    _check_float_input(node)
    _, packed, cb, bias, bits, in_features = node.args
    layer = _layer_key(node)
    w = _lut_weights(ctx, layer, packed, cb, bias, bits, (int(packed.meta["val"].shape[0]), int(in_features)))
    return _linear(node, importer, ctx, w)


def lower_lut_conv2d(node, importer, ctx: LoweringContext):
    _check_float_input(node)
    _, packed, cb, bias, bits, weight_shape, stride, padding, dilation = node.args
    layer = _layer_key(node)
    w = _lut_weights(ctx, layer, packed, cb, bias, bits, (int(weight_shape[0]), int(np.prod(weight_shape[1:]))))
    return _conv(node, importer, ctx, w, weight_shape, stride, padding, dilation)
