"""Winograd convolution F(m×m, 3×3) for stride-1 3×3 convolutions on CPU.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016): an m×m output
tile of a 3×3 convolution is ``Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A`` for an (m+2)×(m+2) input tile d, so
the (m+2)² elementwise products, summed over input channels, become (m+2)² independent GEMMs
``V[e] (P×C) @ U[e] (C×K)`` over the P tiles: 16 multiplies per 4 outputs instead of 36 for
F(2,3), 36 per 16 instead of 144 for F(4,3). The transform matrices come from TVM's Cook-Toom
construction with the interpolation points of Barabasz et al. (arXiv 1803.10986), which bound
the fp32 error (measured against torch in tests/test_winograd.py, within the 1e-4 contract).

The weight transform ``U = G g Gᵀ`` runs once at build time on the constant weight (numpy, in
float64). It is larger than the weight ((m+2)²/9×: 4× for F(4,3)), so Winograd pays only when
the GEMMs have enough rows (tiles) per weight byte: with few tiles (resnet's 7×7 layers at
batch 1) the transformed weight would stream from memory for every call, slower than the direct
convolution. ``choose_tile`` decides; convolutions it declines keep TVM's direct lowering.

The input transform (with its zero padding) and the batched GEMM are one PrimFunc where the
transformed weight fits in L2 (``fuses_input``), scheduled block of tiles by block of tiles so the
transformed input never leaves the cache; with a larger weight they are two, the GEMM scheduled
(its weight prepacked) like any matmul. The output transform is a PrimFunc of its own, into which
bias, activation and residual add fuse. The transforms' schedule is
schedules/winograd_cpu.py's WinogradTransformRule.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax, te, tirx, topi
from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

KERNEL = 3
MIN_TILES = 32      # GEMM rows per transformed weight: below this the (m+2)²/9 larger weight streams from memory
MIN_CHANNELS = 16   # input and output channels: below, the transforms cost more than the GEMM saves
MAX_WASTE = 1.5     # computed / needed outputs (7x7 in 8x8 tiles: 1.31), still well under the 2.25-4x MAC saving
FUSED_MAX_WEIGHT_BYTES = 1 << 20   # transformed weights re-read per block of tiles: only while they stay in L2
INPUT_BLOCK = "winograd_input"
GEMM_BLOCK = "winograd_gemm"
OUTPUT_BLOCK = "winograd_output_m"  # + m


def matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, B, G) of F(m, 3), float64: ``y = Aᵀ[(G g) ⊙ (Bᵀ d)]``, shapes (m+2, m), (m+2, m+2), (m+2, 3)."""
    a, b, g = _cook_toom_convolution(_interpolation_points(m + KERNEL - 2), m, KERNEL)
    return np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(g, np.float64)


def transform_weight(w_hwio: np.ndarray, m: int) -> np.ndarray:
    """U[ξ·α+ν, c, k] = (G g[:, :, c, k] Gᵀ)[ξ, ν] for an HWIO 3×3 weight, in float64, cast back."""
    _, _, g = matrices(m)
    u = np.einsum("xi,ijck,yj->xyck", g, w_hwio.astype(np.float64), g)
    alpha = m + KERNEL - 1
    return u.reshape(alpha * alpha, *w_hwio.shape[2:]).astype(w_hwio.dtype)


def choose_tile(batch: int, out_h: int, out_w: int, in_channels: int, out_channels: int) -> int | None:
    """The output tile m (4 or 2) for this convolution, or None where the direct one is faster:
    F(4,3) when its tiles are enough GEMM rows and at most MAX_WASTE times the outputs needed are
    computed, else F(2,3) on the same terms, else none."""
    if min(in_channels, out_channels) < MIN_CHANNELS:
        return None
    for m in (4, 2):
        th, tw = -(-out_h // m), -(-out_w // m)
        waste = th * tw * m * m / (out_h * out_w)
        if batch * th * tw >= MIN_TILES and waste <= MAX_WASTE:
            return m
    return None


def _combination(terms: list[tuple[float, tirx.PrimExpr]]) -> tirx.PrimExpr:
    """Σ cᵢ·xᵢ without the multiplies by ±1 (most of the transforms' coefficients)."""
    total = None
    for c, x in terms:
        if c == 0:
            continue
        if total is None:
            total = x if c == 1 else -x if c == -1 else tirx.const(c, "float32") * x
        else:
            total = total + x if c == 1 else total - x if c == -1 else total + tirx.const(c, "float32") * x
    return total if total is not None else tirx.const(0.0, "float32")


def _let_all(named: dict[str, tirx.PrimExpr], body: Callable[[dict], tirx.PrimExpr]) -> tirx.PrimExpr:
    """``body`` over variables bound to ``named``'s values: each value appears once in the
    expression tree however often the body uses it (without, the tree grows as (m+2)⁴ and lowering
    takes seconds per convolution)."""
    variables = {k: tirx.Var(k, "float32") for k in named}
    out = body(variables)
    for k in reversed(list(named)):
        out = tirx.Let(variables[k], named[k], out)
    return out


def _select(index: tirx.PrimExpr, choices: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """choices[index]; the schedule unrolls the loops ``index`` is made of, so this folds away."""
    out = choices[-1]
    for k in range(len(choices) - 2, -1, -1):
        out = tirx.Select(index == k, choices[k], out)
    return out


def input_transform(xp: te.Tensor, m: int, tiles_h: int, tiles_w: int) -> te.Tensor:
    """V[ξ·α+ν, p, c] = (Bᵀ d_p B)[ξ, ν] for the tile p of the padded NHWC input (written as Bᵀ(d B)
    row by row, so the unrolled code shares the inner sums)."""
    _, b, _ = matrices(m)
    alpha = m + KERNEL - 1
    n_batch, _, _, channels = (int(d) for d in xp.shape)

    def body(e, p, c):
        n = p // (tiles_h * tiles_w)
        ty = p % (tiles_h * tiles_w) // tiles_w
        tx = p % tiles_w

        loads = {f"d{i}_{j}": xp[n, ty * m + i, tx * m + j, c] for i in range(alpha) for j in range(alpha)}

        def rows(d):
            return {f"r{xi}_{j}": _combination([(b[i, xi], d[f"d{i}_{j}"]) for i in range(alpha)])
                    for xi in range(alpha) for j in range(alpha)}

        def out(r):
            return _select(e, [_combination([(b[j, nu], r[f"r{xi}_{j}"]) for j in range(alpha)])
                               for xi in range(alpha) for nu in range(alpha)])

        return _let_all(loads, lambda d: _let_all(rows(d), out))

    return te.compute((alpha * alpha, n_batch * tiles_h * tiles_w, channels), body, name=INPUT_BLOCK)


def batched_gemm(v: te.Tensor, u: te.Tensor) -> te.Tensor:
    """M[e, p, k] = Σ_c V[e, p, c] U[e, c, k]."""
    c = te.reduce_axis((0, v.shape[2]), name="c")
    return te.compute((v.shape[0], v.shape[1], u.shape[2]), lambda e, p, k: te.sum(v[e, p, c] * u[e, c, k], axis=c),
                      name=GEMM_BLOCK)


def fuses_input(weight_bytes: int) -> bool:
    """Whether the input transform goes inside the GEMM (``input_gemm``): that GEMM reads the whole
    transformed weight once per block of tiles, which pays while the weight stays in L2. Larger
    (resnet's 128..512-channel layers: 2.4-38 MB) it would stream from memory per block, and the
    transform is better made whole and the GEMM left to the matmul schedule, which sweeps each
    weight panel over all the tiles."""
    return weight_bytes <= FUSED_MAX_WEIGHT_BYTES


def input_gemm(x: te.Tensor, u: te.Tensor, m: int, pad_before: list[int], pad_after: list[int], tiles_h: int,
               tiles_w: int) -> te.Tensor:
    """M = V(pad(x)) @ U in one function, so the schedule can make the transformed input V for a
    block of tiles and multiply it while it is in cache (winograd_cpu.py): materialized whole, V is
    (m+2)²/m² times the input (2.25x for F(4,3)), written to memory and read back by the GEMM."""
    xp = topi.nn.pad(x, pad_before, pad_after)
    return batched_gemm(input_transform(xp, m, tiles_h, tiles_w), u)


def output_transform(mm: te.Tensor, m: int, out_shape: tuple[int, int, int, int], tiles_h: int, tiles_w: int) -> te.Tensor:
    """Y[n, h, w, k] = (Aᵀ M_p A)[h mod m, w mod m] for the tile p holding (h, w), straight into NHWC."""
    a, _, _ = matrices(m)
    alpha = m + KERNEL - 1

    def body(n, h, w, k):
        p = (n * tiles_h + h // m) * tiles_w + w // m

        loads = {f"m{e}": mm[e, p, k] for e in range(alpha * alpha)}

        def cols(v):
            return {f"c{xi}_{s}": _combination([(a[nu, s], v[f"m{xi * alpha + nu}"]) for nu in range(alpha)])
                    for xi in range(alpha) for s in range(m)}

        def out(c):
            return _select((h % m) * m + w % m, [_combination([(a[xi, r], c[f"c{xi}_{s}"]) for xi in range(alpha)])
                                                 for r in range(m) for s in range(m)])

        return _let_all(loads, lambda v: _let_all(cols(v), out))

    return te.compute(out_shape, body, name=f"{OUTPUT_BLOCK}{m}")


def static_ints(values) -> list[int] | None:
    """The values as ints, or None if one is symbolic (a shape or attribute known only at run time)."""
    out = []
    for v in values:
        if not isinstance(v, tirx.IntImm | int):
            return None
        out.append(int(v))
    return out


def legalize_conv2d(default: Callable) -> Callable:
    """LegalizeOps entry for ``relax.nn.conv2d``: Winograd where it applies and pays (a constant
    fp32 3×3 HWIO weight, NHWC, stride and dilation 1, one group, ``choose_tile``), else ``default``."""
    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        plan = _plan(call)
        if plan is None:
            return default(bb, call)
        m, (pt, pl, pb, pr), (n, ho, wo, k) = plan
        x, w = call.args
        th, tw = -(-ho // m), -(-wo // m)
        u_value = transform_weight(w.value.numpy(), m)
        u = relax.const(u_value)
        h, wi = int(x.ty.shape[1]), int(x.ty.shape[2])
        pad_after = [0, th * m + KERNEL - 1 - h - pt, tw * m + KERNEL - 1 - wi - pl, 0]
        if fuses_input(u_value.nbytes):
            mm = bb.emit_te(input_gemm, x, u, m, [0, pt, pl, 0], pad_after, th, tw,
                            primfunc_name_hint="winograd_input_gemm")
        else:
            xp = bb.emit_te(topi.nn.pad, x, [0, pt, pl, 0], pad_after, primfunc_name_hint="winograd_pad")
            v = bb.emit_te(input_transform, xp, m, th, tw, primfunc_name_hint="winograd_input")
            mm = bb.emit_te(batched_gemm, v, u, primfunc_name_hint="winograd_gemm")
        return bb.call_te(output_transform, mm, m, (n, ho, wo, k), th, tw, primfunc_name_hint="winograd_output")
    return legalize


def _plan(call: relax.Call):
    a = call.attrs
    x, w = call.args
    if not isinstance(w, tvm.ir.expr.Constant) or str(a.data_layout) != "NHWC" or str(a.kernel_layout) != "HWIO" \
            or str(a.out_layout) != "NHWC" or int(a.groups) != 1 or str(x.ty.dtype) != "float32" \
            or str(w.ty.dtype) != "float32" or str(a.out_dtype) not in ("", "float32"):
        return None
    strides, dilation, padding = static_ints(a.strides), static_ints(a.dilation), static_ints(a.padding)
    xs, ws = static_ints(x.ty.shape), static_ints(w.ty.shape)
    if None in (strides, dilation, padding, xs, ws) or strides != [1, 1] or dilation != [1, 1] \
            or ws[:2] != [KERNEL, KERNEL] or len(padding) != 4:
        return None
    n, h, wi, c = xs
    pt, pl, pb, pr = padding
    ho, wo, k = h + pt + pb - KERNEL + 1, wi + pl + pr - KERNEL + 1, ws[3]
    m = choose_tile(n, ho, wo, c, k) if ho > 0 and wo > 0 else None
    return None if m is None else (m, (pt, pl, pb, pr), (n, ho, wo, k))


def conv2d_legalization() -> dict[str, Callable]:
    """The ``relax.nn.conv2d`` entry of our CPU legalize map (relax_pipeline.fusion_passes)."""
    default = tvm.ir.Op.get("relax.nn.conv2d").get_attr("FLegalize")
    return {"relax.nn.conv2d": legalize_conv2d(default)}

