"""TVM kernels for ``squeezer::bitserial_linear`` / ``bitserial_conv2d`` (compiler/ops/bitserial.py).

The activations are quantized and bit-packed inside the kernel (64 per uint64 word), the weights
stay packed words, and the integer core is a sum of ``popcount(A_i & B_j)`` — on this CPU LLVM
emits AVX-512 ``vpopcntq`` (mcpu emeraldrapids), on CUDA ``__popcll``. Scales and bias are applied
in the epilogue. On CPU the kernel is scheduled here (register tile of output rows × 16 words of
outputs, accumulators in registers, parallel outer loops) and marked scheduled; on CUDA each stage
gets one thread per output (:func:`schedule_gpu`).

Pure ±1 layers (BNN / XNOR-Net) that AMX can take — stride-1 convs, dense with >= 16 rows — can
instead run on AMX int8 tiles (amx_kernels.py) where the target and this process have AMX-INT8;
``binary_policy`` (``codegen.build(binary_kernels=...)``) says which, ``auto`` by timing both.
"""

from __future__ import annotations

import contextvars
import os
import warnings

import numpy as np
import torch
import tvm
from tvm import relax, te

from compiler.errors import BuildError, last_line
from compiler.ops.bitserial import activation_coefficients, as_words, unpack_bits

from . import amx_kernels, build_option, constant_value, popcount_kernels, register_lowering

BINARY_POLICIES = ("auto", "amx", "popcount")
_BINARY_POLICY: contextvars.ContextVar[str] = contextvars.ContextVar("squeezer_binary_policy", default="auto")


def binary_policy(policy: str):
    """Which kernel computes pure ±1 layers (BNN / XNOR-Net) that AMX can take — convs with stride
    1 and dilation 1, dense layers with at least 16 rows — where the target and this process have
    AMX-INT8: ``"auto"`` — AMX tiles or xnor-popcount, whichever measures faster when the target
    is this host's CPU (popcount for other targets);
    ``"amx"`` — AMX tiles (a target without AMX is an error); ``"popcount"`` — always
    xnor-popcount. Other layers always use xnor-popcount."""
    return build_option(_BINARY_POLICY, policy, BINARY_POLICIES, "binary_kernels")


def _use_amx(node, importer, layer: str, qualifies: bool) -> bool:
    """Whether this pure ±1 layer runs on AMX tiles. ``auto`` times both kernels for the layer on
    this host (once per shape per process) and keeps the faster: on this VM the AMX unit is shared
    with the other vCPU, and while something else keeps it busy popcount can win. Where the
    target is not this host's CPU nothing can be timed, and ``auto`` keeps popcount."""
    policy = _BINARY_POLICY.get()
    if policy == "popcount":
        return False
    target = tvm.target.Target.current(allow_none=True)
    if not _cpu():
        if policy == "amx":
            raise BuildError(f"binary_kernels='amx' at {layer}: AMX is a CPU (llvm) target feature, "
                             f"the target is {target.kind.name}")
        return False
    available = amx_kernels.amx_available(target)
    if policy == "amx" and not available:
        raise BuildError(f"binary_kernels='amx' at {layer}: the target or this process has no AMX-INT8 "
                         "(use 'auto' or 'popcount')")
    if not (available and qualifies):
        return False
    if policy == "amx":
        return True
    if str(target.attrs.get("mcpu", "")) != tvm.target.codegen.llvm_get_system_cpu():
        return False
    x_node = node.args[0]
    sig = repr((str(target), [repr(a) if not hasattr(a, "meta") else tuple(a.meta["val"].shape) for a in node.args]))
    if sig not in _DECISIONS:
        try:
            timers = {kind: _layer_timer(node, importer, kind, target) for kind in ("amx", "popcount")}
            samples: dict[str, list[float]] = {"amx": [], "popcount": []}
            for _ in range(3):   # alternating rounds: the AMX unit's throughput drifts on shared hosts
                for kind, timer in timers.items():
                    samples[kind].extend(timer())
        except Exception as exc:  # noqa: BLE001 - a kernel that fails to build or run: keep popcount
            warnings.warn(f"{layer}: timing the AMX kernel failed ({type(exc).__name__}: {last_line(exc)}); "
                          "using xnor-popcount")
            return False
        t_amx, t_pop = (float(np.median(samples[k])) for k in ("amx", "popcount"))
        _DECISIONS[sig] = (t_amx < t_pop, t_amx, t_pop)
    use, t_amx, t_pop = _DECISIONS[sig]
    decisions_log.append({"layer": layer, "shape": tuple(x_node.meta["val"].shape), "amx_ms": t_amx * 1e3,
                          "popcount_ms": t_pop * 1e3, "chosen": "amx" if use else "popcount"})
    return use


_DECISIONS: dict[str, tuple[bool, float, float]] = {}
decisions_log: list[dict] = []     # what auto chose per binary layer, for reports and tests


def _layer_timer(node, importer, policy: str, target):
    """A function timing this layer alone, lowered with ``policy`` for ``target`` and run on this
    host (the caller checks they are the same CPU): seconds per call, a few samples."""
    from types import SimpleNamespace

    from ..relax_pipeline import pipeline_for

    x_node = node.args[0]
    shape = tuple(int(d) for d in x_node.meta["val"].shape)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            stand_in = SimpleNamespace(block_builder=bb, env={**importer.env, x_node: x})
            with binary_policy(policy):
                conv = node.target.name().endswith("bitserial_conv2d")
                lower = lower_bitserial_conv2d if conv else lower_bitserial_linear
                out = bb.emit_output(lower(node, stand_in))
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), target=target, relax_pipeline=pipeline_for(target))
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    arg = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(shape).astype("float32"), dev)
    evaluator = vm.time_evaluator("main", dev, number=5, repeat=3, min_repeat_ms=10)
    return lambda: list(evaluator(arg).results)


def _const(importer, node, what: str, layer: str) -> np.ndarray | None:
    if node is None:
        return None
    expr = importer.env[node]
    if isinstance(expr, tvm.ir.expr.Constant):
        return expr.value.numpy()
    value = constant_value(node)
    if value is None:
        raise BuildError(f"squeezer::bitserial at {layer}: {what} must be a parameter or buffer of the layer")
    return value.detach().cpu().numpy()


def _bit(v, a_mode: str, a_bits: int, plane: int):
    """Bit ``plane`` of the quantized code of float32 ``v`` (same arithmetic as the torch op)."""
    if a_mode == "sign":
        return (v >= tvm.tirx.const(0.0, "float32")).astype("uint64")
    levels = float(2 ** a_bits - 1)
    clipped = te.max(te.min(v, tvm.tirx.const(1.0, "float32")), tvm.tirx.const(0.0, "float32"))
    code = te.floor(clipped * tvm.tirx.const(levels, "float32") + tvm.tirx.const(0.5, "float32")).astype("int32")
    return ((code >> plane) & 1).astype("uint64")


def _cpu() -> bool:
    target = tvm.target.Target.current(allow_none=True)
    return target is None or target.kind.name == "llvm"


def _divisor(n: int, options=(16, 8, 4, 2, 1)) -> int:
    return next(f for f in options if n % f == 0)


def _schedule(func, spatial: list[str], tile_m: str, tile_n: str, n_extent: int, m_extent: int):
    """Schedule the popcount block "P": parallel over ``spatial`` (+ outer tiles), a register tile of
    ``tile_m`` rows × ``tile_n`` vector lanes, accumulators in registers; the bit-packing of the
    activations parallel with contiguous reads; the epilogue parallel and vectorized."""
    sch = tvm.s_tir.Schedule(func)
    blk = sch.get_sblock("P")
    loops = sch.get_loops(blk)
    by = {sch.get(lp).loop_var.name: lp for lp in loops}
    reduce = [lp for name, lp in by.items() if name.startswith("rd_")]
    mo, mi = sch.split(by[tile_m], [None, _divisor(m_extent, (8, 7, 6, 5, 4, 3, 2, 1))])
    no, ni = sch.split(by[tile_n], [None, _divisor(n_extent)])
    outer = [by[n] for n in spatial]
    sch.reorder(*outer, no, mo, *reduce, mi, ni)   # a block of weights stays in L1 across row tiles
    fused = sch.fuse(*outer, no, mo)
    sch.parallel(fused)
    cache = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(cache, fused)
    sch.unroll(mi)
    if len(reduce) > 1 and int(sch.get(reduce[-1]).extent) <= 8:
        sch.unroll(reduce[-1])   # a conv's few channel words per tap: no loop overhead between them
    _vectorize_inner(sch, ni, fused)
    _vectorize_inner(sch, sch.get_loops(cache)[-1], fused)
    sch.decompose_reduction(blk, reduce[0])
    _schedule_pack(sch)
    try:   # the popcount combination inside each tile, straight from the register accumulators
        y1 = sch.get_sblock("y1")
        sch.reverse_compute_at(y1, fused)
        sch.compute_inline(cache)
        _vectorize_inner(sch, sch.get_loops(y1)[-1], fused)
    except Exception:  # noqa: BLE001 - float activations have no y1 block
        pass
    try:
        y = sch.get_sblock("y")
    except Exception:  # noqa: BLE001 - the xnor kernel finishes inside the tiles
        return sch.mod["main"].with_attr("tirx.is_scheduled", True)
    ys = sch.get_loops(y)
    if len(ys) > 1:
        sch.parallel(sch.fuse(*ys[:-1]))
        if int(sch.get(ys[-1]).extent) <= 64:
            sch.vectorize(ys[-1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _vectorize_inner(sch, loop, tile_loop) -> None:
    """Vectorize a tile's innermost loop, unless the tile is one element wide: then the block's
    last loop is the parallel tile loop itself (unit loops vanish), and vectorizing that made a
    vector of every tile (10,296 lanes for a 33-output conv with 13 columns: LLVM ran for minutes)."""
    extent = int(sch.get(loop).extent)
    if sch.get(loop).same_as(sch.get(tile_loop)) or extent <= 1 or extent > 64:
        return
    sch.vectorize(loop)


GPU_THREADS = 256


def schedule_gpu(func):
    """CUDA: one thread per output element of every stage (bit-packing, popcount sums, epilogue),
    each stage its own kernel, reductions (words, bits, taps) serial inside the thread. dlight's
    generic rules turn these integer reductions into one serial block: the 4096² binary linear
    ran 1.3 ms on an H200 that way."""
    sch = tvm.s_tir.Schedule(func)
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(blk)
        kinds = [iv.iter_type for iv in sch.get(blk).iter_vars]
        n_spatial = kinds.count(tvm.tirx.IterVar.DataPar)
        if len(kinds) != len(loops) or kinds[:n_spatial] != [tvm.tirx.IterVar.DataPar] * n_spatial:
            raise BuildError(f"the GPU schedule expects spatial loops outside the reductions in {sch.get(blk).name_hint}")
        spatial = loops[:n_spatial] or [sch.add_unit_loop(blk)]
        fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        extent = int(sch.get(fused).extent)
        bx, tx = sch.split(fused, [None, min(GPU_THREADS, extent)])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _schedule_beta(sch) -> None:
    """XNOR-Net's row scale: 16 partial sums per row, vectorized across the partials (no
    decompose_reduction: its split init blocks vectorized badly), rows in parallel."""
    blk = sch.get_sblock("beta_partial")
    r, lane, kq = sch.get_loops(blk)
    sch.reorder(r, kq, lane)
    sch.parallel(r)
    sch.vectorize(lane)


def _schedule_xnor_k(func):
    """The conv's XNOR-Net K kernel: rows in parallel, the reduction (channels, window taps)
    outside a vectorized width loop, so each step is one vector op over a row."""
    sch = tvm.s_tir.Schedule(func)
    for blk in (sch.get_sblock("abs_sum"), sch.get_sblock("window_sum")):
        loops = sch.get_loops(blk)
        b, row, col, *red = loops
        sch.reorder(b, row, *red, col)
        sch.parallel(sch.fuse(b, row))
        extent = int(sch.get(col).extent)
        if extent > 64:
            col = sch.split(col, [None, _divisor(extent)])[1]
        sch.vectorize(col)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _schedule_pack(sch) -> None:
    """packA: parallel over the leading spatial loops. Linear: the 64 bits of a word innermost, the
    word built in a register; conv: a row of words built at once from contiguous reads of x."""
    try:
        blk = sch.get_sblock("packA")
    except Exception:  # noqa: BLE001 - float activations: nothing to pack
        return
    loops = sch.get_loops(blk)
    if len(loops) == 6:                      # conv: i, b, hh, cw, ww, t
        i, b, hh, cw, ww, t = loops   # a row of words at once: contiguous x reads, vector ops
        sch.reorder(i, b, hh, cw, t, ww)
        sch.parallel(sch.fuse(i, b, hh))
        sch.vectorize(ww)             # (no decompose_reduction: its init block vectorized badly)
        pad = sch.get_sblock("padA")
        sch.parallel(sch.fuse(*sch.get_loops(pad)[:3]))
    else:                                    # linear: i, row, w, t
        i, row, w, t = loops
        sch.parallel(sch.fuse(i, row))
        sch.unroll(t)                        # constant shifts


def _emit(importer, tensors: list, args: list, out_shape, name: str, sched):
    """Create the prim func from TE ``tensors`` (placeholders..., output) and call it."""
    bb = importer.block_builder
    func = te.create_prim_func(tensors)
    if not _cpu():
        func = schedule_gpu(func)
    else:
        try:
            func = sched(func)
        except Exception as exc:  # noqa: BLE001 - an unusual shape falls back to the default schedule rules
            warnings.warn(f"{name}: the popcount schedule did not apply ({type(exc).__name__}: "
                          f"{last_line(exc)}); using the default rules")
    return _call_kernel(bb, func, name, args, out_shape)


def _call_kernel(bb, func, name: str, args: list, out_shape):
    """Add the scheduled kernel ``func`` under a per-layer symbol and call it (float32 output).
    Opaque to FuseOps: the kernel is scheduled as a whole (fusing would drop its schedule)."""
    name = f"{name}_{len(bb.get().functions)}"   # one symbol per layer
    gv = bb.add_func(func.with_attr("global_symbol", name).with_attr("op_pattern", 8), name)
    return bb.emit(relax.call_tir(gv, args, relax.TensorType(out_shape, "float32")))


def _pure_binary(a_mode: str, n_planes: int, coef: np.ndarray, w_offset) -> bool:
    """±1 weights and ±1 activations (BNN / XNOR-Net): one plane, w = 2 B - 1, sign activations."""
    return a_mode == "sign" and n_planes == 1 and list(coef) == [2.0] and float(w_offset) == -1.0


def _weight_terms(planes_words: np.ndarray, coef: np.ndarray, offset: float, a_mode: str, a_bits: int,
                  k_total: int, bits: np.ndarray):
    """(c_i, d_a, s_a) of the activations and the per-output constant d_a * sum_j e_j popcount(B_j)
    + d_a * d_w * K (float64 -> float32)."""
    c, d_a, s_a = activation_coefficients(a_mode, a_bits)
    rw = bits.reshape(bits.shape[0], bits.shape[1], -1).sum(-1)                 # (P, N) popcounts
    const = d_a * (coef[:, None] * rw).sum(0) + d_a * offset * k_total
    return c, d_a, s_a, const.astype("float32")


@register_lowering("bitserial_linear")
def lower_bitserial_linear(node, importer):
    x_node, planes_node, coef_node, w_offset, alpha_node, bias_node, k_in, a_mode, a_bits, xnor = node.args
    layer = node.name
    if x_node.meta["val"].dtype != torch.float32:
        raise BuildError(f"squeezer::bitserial_linear at {layer}: float32 input only")
    packed = _const(importer, planes_node, "w_planes", layer)                    # (P, N, 8W) uint8
    coef = _const(importer, coef_node, "w_coef", layer).astype(np.float64)
    alpha = _const(importer, alpha_node, "alpha", layer).astype("float32")
    bias = _const(importer, bias_node, "bias", layer)
    bias = np.zeros_like(alpha) if bias is None else bias.astype("float32")
    n_planes, n_out, _ = packed.shape
    words = as_words(packed)                                                    # (P, N, W)
    n_words = words.shape[-1]
    lanes = _divisor(n_out)
    # (P, N/lanes, W, lanes): for a block of `lanes` outputs the words follow each other, so the
    # reduction streams contiguous memory
    wt = np.ascontiguousarray(words.reshape(n_planes, n_out // lanes, lanes, n_words).transpose(0, 1, 3, 2))
    bb = importer.block_builder
    shape = [int(d) for d in x_node.meta["val"].shape]
    lead, m = shape[:-1], int(np.prod(shape[:-1]))
    x = importer.env[x_node]
    x2d = bb.emit(relax.op.reshape(x, (m, k_in))) if len(shape) != 2 else x

    pure_binary = _pure_binary(a_mode, n_planes, coef, w_offset)
    X = te.placeholder((m, k_in), "float32", name="x")
    WT = te.placeholder((n_planes, n_out // lanes, n_words, lanes), "uint64", name="wt")
    AL = te.placeholder((n_out,), "float32", name="alpha")
    BI = te.placeholder((n_out,), "float32", name="bias")
    if a_mode == "float":
        kk = te.reduce_axis((0, k_in), name="rd_k")

        def weight(n, k):
            total = tvm.tirx.const(float(w_offset), "float32")
            for j in range(n_planes):
                b = ((WT[j, n // lanes, k // 64, n % lanes] >> (k % 64).astype("uint64"))
                     & tvm.tirx.const(1, "uint64")).astype("float32")
                total = total + tvm.tirx.const(float(coef[j]), "float32") * b
            return total

        P = te.compute((m, n_out), lambda i, n: te.sum(X[i, kk] * weight(n, kk), axis=kk), name="P")
        Y = te.compute((m, n_out), lambda i, n: P[i, n] * AL[n] + BI[n], name="y")
        sched = lambda f: _schedule(f, [], "i", "n", n_out, m)  # noqa: E731
        y = _emit(importer, [X, WT, AL, BI, Y], [x2d, relax.const(wt), relax.const(alpha), relax.const(bias)],
                  (m, n_out), "bitserial_dense_f", sched)
    elif pure_binary and _use_amx(node, importer, layer, m >= amx_kernels.MIN_ROWS):
        y = _amx_dense(importer, x2d, words[0], alpha, bias, m, k_in, n_out, xnor)
    elif pure_binary and m >= popcount_kernels.ROW_TILE \
            and popcount_kernels.available(tvm.target.Target.current(allow_none=True)):
        func = popcount_kernels.binary_dense(m, k_in, n_out, xnor)
        args = [x2d, relax.const(popcount_kernels.weight_words(words[0])), relax.const(alpha), relax.const(bias)]
        y = _call_kernel(bb, func, "binary_dense_popcount", args, (m, n_out))
    else:
        bits = unpack_bits(torch.from_numpy(packed), k_in).numpy()
        c, d_a, s_a, rw = _weight_terms(words, coef, float(w_offset), a_mode, a_bits, k_in, bits)
        n_a = len(c)
        RW = te.placeholder((n_out,), "float32", name="rw")
        t = te.reduce_axis((0, 64), name="t")
        A = te.compute((n_a, m, n_words), lambda i, r, w: te.sum(tvm.tirx.if_then_else(
            w * 64 + t < k_in, _bit(X[r, te.min(w * 64 + t, k_in - 1)], a_mode, a_bits, i) << t.astype("uint64"),
            tvm.tirx.const(0, "uint64")), axis=t), name="packA")
        rw_ = te.reduce_axis((0, n_words), name="rd_w")
        if pure_binary:
            return _binary_dense(importer, x2d, X, A, WT, AL, BI, wt, alpha, bias, m, n_out, k_in, lanes, xnor,
                                 shape, lead, rw_)
        P = te.compute((n_a, n_planes, m, n_out), lambda i, j, row, n: te.sum(
            tvm.tirx.popcount(A[i, row, rw_] & WT[j, n // lanes, rw_, n % lanes]).astype("int64"), axis=rw_), name="P")
        ra_w = te.reduce_axis((0, n_words), name="ra_w")
        RA = te.compute((n_a, m), lambda i, r: te.sum(tvm.tirx.popcount(A[i, r, ra_w]).astype("int32"), axis=ra_w),
                        name="RA")
        BETA = te.placeholder((m,), "float32", name="beta") if xnor else None   # from _row_abs_sum

        # y1: the popcount combination per output (computed inside each register tile); y: the
        # per-row terms (row popcounts, activation scale) and per-output scale/bias, one vector pass
        def combination(r, n):
            total = RW[n]
            for i in range(n_a):
                for j in range(n_planes):
                    total = total + tvm.tirx.const(c[i] * coef[j], "float32") * P[i, j, r, n].astype("float32")
            return total

        Y1 = te.compute((m, n_out), combination, name="y1")

        def row_term(r):
            total = tvm.tirx.const(0.0, "float32")
            for i in range(n_a):
                total = total + tvm.tirx.const(float(w_offset) * c[i], "float32") * RA[i, r].astype("float32")
            return total

        def out(r, n):
            scale = BETA[r] * tvm.tirx.const(s_a / k_in, "float32") if xnor else tvm.tirx.const(s_a, "float32")
            return (Y1[r, n] + row_term(r)) * scale * AL[n] + BI[n]

        Y = te.compute((m, n_out), out, name="y")
        sched = lambda f: _schedule(f, ["i", "j"], "row", "n", n_out, m)  # noqa: E731
        args = [x2d, relax.const(wt), relax.const(alpha), relax.const(bias), relax.const(rw)]
        if xnor:
            args.append(_row_abs_sum(importer, x2d, m, k_in))
        y = _emit(importer, [X, WT, AL, BI, RW] + ([BETA] if xnor else []) + [Y], args, (m, n_out),
                  "bitserial_dense", sched)
    if len(shape) != 2:
        y = bb.emit(relax.op.reshape(y, (*lead, n_out)))
    return y


def _row_abs_sum(importer, x2d, m: int, k_in: int):
    """sum |x| per row as its own small kernel: 16 vectorized partial sums per row, rows parallel."""
    X = te.placeholder((m, k_in), "float32", name="x")
    kq = te.reduce_axis((0, -(-k_in // 16)), name="kq")
    BP = te.compute((m, 16), lambda r, lane: te.sum(tvm.tirx.if_then_else(
        kq * 16 + lane < k_in, te.abs(X[r, te.min(kq * 16 + lane, k_in - 1)]), tvm.tirx.const(0.0, "float32")),
        axis=kq), name="beta_partial")
    kl = te.reduce_axis((0, 16), name="kl")
    B = te.compute((m,), lambda r: te.sum(BP[r, kl], axis=kl), name="beta")
    func = te.create_prim_func([X, B])
    if _cpu():
        sch = tvm.s_tir.Schedule(func)
        _schedule_beta(sch)
        func = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    else:   # a CPU schedule in a GPU build would run on the host against device memory
        func = schedule_gpu(func)
    return _call_kernel(importer.block_builder, func, "row_abs_sum", [x2d], (m,))


def _binary_dense(importer, x2d, X, A, WT, AL, BI, wt, alpha, bias, m, n_out, k_in, lanes, xnor, shape, lead, rw_):
    """Pure ±1 x ±1 dense (BNN / XNOR-Net): sum a*w = K - 2 popcount(A xor B), finished inside the
    register tiles; XNOR's row scale comes from its own small kernel."""
    bb = importer.block_builder
    P = te.compute((1, 1, m, n_out), lambda i, j, row, n: te.sum(
        tvm.tirx.popcount(A[0, row, rw_] ^ WT[0, n // lanes, rw_, n % lanes]).astype("int64"), axis=rw_), name="P")
    BETA = te.placeholder((m,), "float32", name="beta") if xnor else None

    def out(r, n):
        core = tvm.tirx.const(float(k_in), "float32") - tvm.tirx.const(2.0, "float32") * P[0, 0, r, n].astype("float32")
        scale = BETA[r] * tvm.tirx.const(1.0 / k_in, "float32") if xnor else tvm.tirx.const(1.0, "float32")
        return core * scale * AL[n] + BI[n]

    Y = te.compute((m, n_out), out, name="y1")
    args = [x2d, relax.const(wt), relax.const(alpha), relax.const(bias)]
    if xnor:
        args.append(_row_abs_sum(importer, x2d, m, k_in))
    sched = lambda f: _schedule(f, ["i", "j"], "row", "n", n_out, m)  # noqa: E731
    y = _emit(importer, [X, WT, AL, BI] + ([BETA] if xnor else []) + [Y], args, (m, n_out), "bitserial_dense_xnor",
              sched)
    if len(shape) != 2:
        y = bb.emit(relax.op.reshape(y, (*lead, n_out)))
    return y


@register_lowering("bitserial_conv2d")
def lower_bitserial_conv2d(node, importer):
    (x_node, planes_node, coef_node, w_offset, alpha_node, bias_node, c_in, kernel, stride, padding, dilation,
     a_mode, a_bits, xnor) = node.args
    layer = node.name
    if x_node.meta["val"].dtype != torch.float32:
        raise BuildError(f"squeezer::bitserial_conv2d at {layer}: float32 input only")
    packed = _const(importer, planes_node, "w_planes", layer)                    # (P, N, kh*kw*8W)
    coef = _const(importer, coef_node, "w_coef", layer).astype(np.float64)
    alpha = _const(importer, alpha_node, "alpha", layer).astype("float32")
    bias = _const(importer, bias_node, "bias", layer)
    bias = np.zeros_like(alpha) if bias is None else bias.astype("float32")
    kh, kw = kernel
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n_planes, n_out, _ = packed.shape
    taps = packed.reshape(n_planes, n_out, kh, kw, -1)
    words = as_words(taps)                                                      # (P, N, kh, kw, W)
    n_words = words.shape[-1]
    lanes = _divisor(n_out)
    wt = np.ascontiguousarray(words.reshape(n_planes, n_out // lanes, lanes, kh, kw, n_words)
                              .transpose(0, 1, 3, 4, 5, 2))                    # (P, N/lanes, kh, kw, W, lanes)
    b_, _, h, w = [int(d) for d in x_node.meta["val"].shape]
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    X = te.placeholder((b_, c_in, h, w), "float32", name="x")
    WT = te.placeholder((n_planes, n_out // lanes, kh, kw, n_words, lanes), "uint64", name="wt")
    AL = te.placeholder((n_out,), "float32", name="alpha")
    BI = te.placeholder((n_out,), "float32", name="bias")
    x = importer.env[x_node]

    def inside(hh, ww):
        return tvm.tirx.all(hh >= ph, hh < h + ph, ww >= pw, ww < w + pw)

    def xval(b, c, hh, ww):  # zero-padded read of x
        return tvm.tirx.if_then_else(inside(hh, ww), X[b, c, te.min(te.max(hh - ph, 0), h - 1),
                                                       te.min(te.max(ww - pw, 0), w - 1)],
                                     tvm.tirx.const(0.0, "float32"))

    if a_mode == "float":
        rc, rh, rw_ = te.reduce_axis((0, c_in), "rd_c"), te.reduce_axis((0, kh), "rd_h"), te.reduce_axis((0, kw), "rd_w")

        def weight(n, c, i, j):
            total = tvm.tirx.const(float(w_offset), "float32")
            for p in range(n_planes):
                bit = (WT[p, n // lanes, i, j, c // 64, n % lanes] >> (c % 64).astype("uint64")) \
                    & tvm.tirx.const(1, "uint64")
                total = total + tvm.tirx.const(float(coef[p]), "float32") * bit.astype("float32")
            return total

        P = te.compute((b_, oh, ow, n_out), lambda b, y0, x0, n: te.sum(
            xval(b, rc, y0 * sh + rh * dh, x0 * sw + rw_ * dw) * weight(n, rc, rh, rw_), axis=[rh, rw_, rc]), name="P")
        Y = te.compute((b_, n_out, oh, ow), lambda b, n, y0, x0: P[b, y0, x0, n] * AL[n] + BI[n], name="y")
        tensors, args = [X, WT, AL, BI, Y], [x, relax.const(wt), relax.const(alpha), relax.const(bias)]
        sched = lambda f: _schedule(f, ["b", "y0"], "x0", "n", n_out, ow)  # noqa: E731
        return _emit(importer, tensors, args, (b_, n_out, oh, ow), "bitserial_conv2d_f", sched)

    pure_binary = _pure_binary(a_mode, n_planes, coef, w_offset)
    unit_steps = tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
    if pure_binary and _use_amx(node, importer, layer, unit_steps):
        return _amx_conv(importer, x, words[0], alpha, bias, b_, c_in, h, w, n_out, kh, kw, ph, pw, xnor)
    if pure_binary and unit_steps and c_in >= popcount_kernels.MIN_CHANNELS \
            and popcount_kernels.available(tvm.target.Target.current(allow_none=True)):
        func = popcount_kernels.binary_conv2d(b_, c_in, h, w, n_out, kh, kw, ph, pw, xnor)
        args = [x, relax.const(popcount_kernels.weight_words(words[0])), relax.const(alpha), relax.const(bias)]
        return _call_kernel(importer.block_builder, func, "binary_conv2d_popcount", args, (b_, n_out, oh, ow))
    bits = unpack_bits(torch.from_numpy(packed), 10 ** 9).numpy()   # every stored bit (padding bits are 0)
    c, d_a, s_a, rwc = _weight_terms(words, coef, float(w_offset), a_mode, a_bits, c_in * kh * kw, bits)
    n_a = len(c)
    RW = te.placeholder((n_out,), "float32", name="rw")
    t = te.reduce_axis((0, 64), name="t")
    pad_bit = tvm.tirx.const(1 if a_mode == "sign" else 0, "uint64")
    hp, wp = h + 2 * ph, w + 2 * pw

    def channel_bit(i, b, hh, ww, ch):
        if c_in % 64 == 0:      # affine reads: the packing vectorizes along the row
            return _bit(X[b, ch, hh, ww], a_mode, a_bits, i)
        return tvm.tirx.if_then_else(ch < c_in, _bit(X[b, te.min(ch, c_in - 1), hh, ww], a_mode, a_bits, i),
                                     tvm.tirx.const(0, "uint64"))

    # pack the unpadded input (64 channels per word), then pad whole words: a padded position is +1
    # on every real channel (sign) or the zero code (unsigned); padding bits of the last word stay 0
    A0 = te.compute((n_a, b_, h, n_words, w), lambda i, b, hh, cw, ww: te.sum(
        channel_bit(i, b, hh, ww, cw * 64 + t) << t.astype("uint64"), axis=t), name="packA")
    tail = c_in - 64 * (n_words - 1)
    full_word = tvm.tirx.const((1 << 64) - 1, "uint64")
    tail_word = tvm.tirx.const((1 << tail) - 1 if tail < 64 else (1 << 64) - 1, "uint64")

    def pad_word(cw):
        if a_mode != "sign":
            return tvm.tirx.const(0, "uint64")
        return tvm.tirx.if_then_else(cw < n_words - 1, full_word, tail_word)

    A = te.compute((n_a, b_, hp, wp, n_words), lambda i, b, hh, ww, cw: tvm.tirx.if_then_else(
        inside(hh, ww), A0[i, b, te.min(te.max(hh - ph, 0), h - 1), cw, te.min(te.max(ww - pw, 0), w - 1)],
        pad_word(cw)), name="padA")
    rh, rw_, rc = te.reduce_axis((0, kh), "rd_h"), te.reduce_axis((0, kw), "rd_w"), te.reduce_axis((0, n_words), "rd_c")
    # XNOR-Net's K (channel-mean |x| averaged over each window, zero padding counted): one small
    # kernel of its own, passed in (as Relax mean/abs/avg_pool ops it was three kernels and ~20 µs
    # of a 0.18 ms 256-channel conv). BETA is the window sum; the 1/(c·kh·kw) is in the epilogue.
    BETA = te.placeholder((b_, oh, ow), "float32", name="beta") if xnor else None
    k_scale = tvm.tirx.const(1.0 / (c_in * kh * kw), "float32")
    sched = lambda f: _schedule(f, ["i", "j", "b", "y0"], "x0", "n", n_out, ow)  # noqa: E731
    args = [x, relax.const(wt), relax.const(alpha), relax.const(bias)]
    beta_args = []
    if xnor:
        xk = te.placeholder((b_, c_in, h, w), "float32", name="x")
        k_sum = _xnor_window_sum(xk, b_, c_in, h, w, oh, ow, kernel, stride, padding, dilation)
        beta_args = [_emit(importer, [xk, k_sum], [x], (b_, oh, ow), "xnor_k", _schedule_xnor_k)]
    if pure_binary:
        # pure ±1 x ±1 (BNN / XNOR-Net): sum a*w = K - 2 popcount(A xor B) over every window
        # position (spatial padding is +1, channel padding bits are 0 on both sides)
        P = te.compute((1, 1, b_, oh, ow, n_out), lambda i, j, b, y0, x0, n: te.sum(
            tvm.tirx.popcount(A[0, b, y0 * sh + rh * dh, x0 * sw + rw_ * dw, rc]
                              ^ WT[0, n // lanes, rh, rw_, rc, n % lanes]).astype("int64"),
            axis=[rh, rw_, rc]), name="P")
        k_total = float(c_in * kh * kw)

        def xnor_out(b, n, y0, x0):
            scale = BETA[b, y0, x0] * k_scale if xnor else tvm.tirx.const(1.0, "float32")
            core = tvm.tirx.const(k_total, "float32") - tvm.tirx.const(2.0, "float32") * P[0, 0, b, y0, x0, n].astype("float32")
            return core * scale * AL[n] + BI[n]

        Y = te.compute((b_, n_out, oh, ow), xnor_out, name="y1")   # all inside the tiles
        return _emit(importer, [X, WT, AL, BI] + ([BETA] if xnor else []) + [Y], args + beta_args,
                     (b_, n_out, oh, ow), "bitserial_conv2d_xnor", sched)
    P = te.compute((n_a, n_planes, b_, oh, ow, n_out), lambda i, j, b, y0, x0, n: te.sum(
        tvm.tirx.popcount(A[i, b, y0 * sh + rh * dh, x0 * sw + rw_ * dw, rc] & WT[j, n // lanes, rh, rw_, rc, n % lanes]).astype("int64"),
        axis=[rh, rw_, rc]), name="P")
    qh, qw, qc = te.reduce_axis((0, kh), "qh"), te.reduce_axis((0, kw), "qw"), te.reduce_axis((0, n_words), "qc")
    RA = te.compute((n_a, b_, oh, ow), lambda i, b, y0, x0: te.sum(
        tvm.tirx.popcount(A[i, b, y0 * sh + qh * dh, x0 * sw + qw * dw, qc]).astype("int32"), axis=[qh, qw, qc]),
        name="RA")

    def combination(b, n, y0, x0):   # inside each tile (see the linear case)
        total = RW[n]
        for i in range(n_a):
            for j in range(n_planes):
                total = total + tvm.tirx.const(c[i] * coef[j], "float32") * P[i, j, b, y0, x0, n].astype("float32")
        return total

    Y1 = te.compute((b_, n_out, oh, ow), combination, name="y1")

    def out(b, n, y0, x0):
        row = tvm.tirx.const(0.0, "float32")
        for i in range(n_a):
            row = row + tvm.tirx.const(float(w_offset) * c[i], "float32") * RA[i, b, y0, x0].astype("float32")
        scale = BETA[b, y0, x0] * k_scale * tvm.tirx.const(s_a, "float32") if xnor else tvm.tirx.const(s_a, "float32")
        return (Y1[b, n, y0, x0] + row) * scale * AL[n] + BI[n]

    Y = te.compute((b_, n_out, oh, ow), out, name="y")
    tensors = [X, WT, AL, BI, RW] + ([BETA] if xnor else []) + [Y]
    return _emit(importer, tensors, args + [relax.const(rwc)] + beta_args, (b_, n_out, oh, ow), "bitserial_conv2d",
                 sched)


def _xnor_window_sum(X, b_: int, c_in: int, h: int, w: int, oh: int, ow: int, kernel, stride, padding,
                     dilation) -> te.Tensor:
    """XNOR-Net's K before its constant 1/(c·kh·kw): per output position the sum of the channel
    sums of |x| over the kernel window, zero padding counted (torch's avg_pool2d with
    count_include_pad). Stages "abs_sum" and "window_sum" (scheduled by _schedule_xnor_k)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    kc = te.reduce_axis((0, c_in), "k_c")
    S = te.compute((b_, h, w), lambda b, hh, ww: te.sum(te.abs(X[b, kc, hh, ww]), axis=kc), name="abs_sum")
    qh, qw = te.reduce_axis((0, kh), "k_h"), te.reduce_axis((0, kw), "k_w")

    def s_pad(b, hh, ww):
        inside = tvm.tirx.all(hh >= 0, hh < h, ww >= 0, ww < w)
        return tvm.tirx.if_then_else(inside, S[b, te.min(te.max(hh, 0), h - 1), te.min(te.max(ww, 0), w - 1)],
                                     tvm.tirx.const(0.0, "float32"))

    return te.compute((b_, oh, ow), lambda b, y0, x0: te.sum(
        s_pad(b, y0 * sh + qh * dh - ph, x0 * sw + qw * dw - pw), axis=[qh, qw]), name="window_sum")


def _amx_dense(importer, x2d, words, alpha, bias, m, k_in, n_out, xnor):
    """The ±1 dense on AMX tiles (amx_kernels.py): weights stay packed bits, unpacked tile by tile."""
    target = tvm.target.Target.current(allow_none=True)
    threads = int(target.attrs.get("num-cores", 0) or 0) if target is not None else 0
    func = amx_kernels.binary_dense(m, k_in, n_out, xnor, threads or os.cpu_count() or 1)
    args = [x2d, relax.const(amx_kernels.dense_weight_bits(words, n_out)), relax.const(alpha), relax.const(bias)]
    return _call_kernel(importer.block_builder, func, "binary_dense_amx", args, (m, n_out))


def _amx_conv(importer, x, words, alpha, bias, batch, c_in, h, w, n_out, kh, kw, ph, pw, xnor):
    """The ±1 conv on AMX tiles (amx_kernels.py), XNOR's K computed inside the kernel."""
    func = amx_kernels.binary_conv2d(batch, c_in, h, w, n_out, kh, kw, ph, pw, xnor)
    oh, ow = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    args = [x, relax.const(amx_kernels.weight_tiles(words, n_out)), relax.const(alpha), relax.const(bias)]
    return _call_kernel(importer.block_builder, func, "binary_conv2d_amx", args, (batch, n_out, oh, ow))
