"""Vectorizable exp, erf and sigmoid for LLVM targets.

TVM lowers ``exp``/``erf`` on CPU to libm calls, which LLVM cannot vectorize: softmax, sigmoid
and GELU then cost more than the matmuls around them. Installing these lowerings replaces them by
branch-free polynomials that vectorize like any other arithmetic:

* ``exp``: Cephes' range reduction (x = n·ln2 + r, two-part ln2, n rounded by adding 1.5·2^23)
  and the degree-5 minimax polynomial of Arm's optimized-routines; max relative error 1.8e-7
  (≈1.5 ulp) over the normal range, exact ±inf/NaN/0 handling; results below FLT_MIN
  (subnormals) flush to zero.
* ``erf``: the rational approximation Eigen and XLA use for float32 (clamped to [-4, 4], where
  erf is ±1 to float precision); max absolute error ~1e-7.
* ``sigmoid``: ``1 / (1 + exp(-x))`` with the same exp polynomial, specialised to the range
  sigmoid reads. TVM's own legalization goes through the general exp above, whose clamps, NaN
  and overflow selects cost as much as the polynomial; EfficientNet's SiLU epilogues (every
  expand and depthwise conv) spent about half their time there. Here x is clamped to
  [-89, 87] by compares that keep NaN (NaN then flows through the arithmetic), the negation
  is folded into the reduction's constants, and 2^n is built from the rounded sum's bits
  without a guard: n = 128 gives +inf, so sigmoid(x < -88.4) is exactly 0, as torch's
  1 / (1 + inf) is. Relative error below 2.6e-7; results below FLT_MIN flush to zero. 16
  vector operations and a division per vector (Cephes' degree-7 form with a floor and a
  conversion took 19; with SiLU's multiply and the division, 21 -> 18).

The registration is process-wide for float32 on ``llvm`` (TVM's intrinsic-lowering registry has
no narrower scope); other dtypes keep LLVM's intrinsics.
"""

from __future__ import annotations

import tvm
from tvm import tirx

_INSTALLED = False
_DEFAULT: dict = {}  # TVM's rules we replace, kept for the dtypes we leave alone
LEVEL = 200  # above TVM's own llvm rules


def float32_rule(body):
    """Wrap ``body(x, ty, ity, const)`` as a lowering for float32 scalars and vectors
    (``ty`` float32 or float32xN, ``ity`` the int32 type of the same lanes); other dtypes keep
    TVM's own rule. NaN inputs pass through (tested on the bits: fast-math flags may drop x != x)."""

    def rule(call):
        ty = str(call.ty)
        if not ty.startswith("float32"):
            return _DEFAULT[call.op.name](call)
        ity = "int32" + ty[len("float32"):]  # same lanes
        x = call.args[0]

        def const(v: float):
            return tirx.const(v, ty)

        is_nan = (tirx.reinterpret(ity, x) & tirx.const(0x7FFFFFFF, ity)) > tirx.const(0x7F800000, ity)
        return tirx.Select(is_nan, x, body(x, ty, ity, const))

    return rule


LOG2E = 1.44269504088896341
ROUND_MAGIC = 12582912.0  # 1.5 * 2^23: a float below 2^22 plus this is rounded to an integer
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 in two parts: n * LN2_HI is exact
# exp(r) - 1 on |r| <= ln2 / 2 as a degree-5 minimax polynomial (coefficients of r^5 .. r^1),
# from Arm's optimized-routines (v_expf): max relative error about 1.9e-7 with the reduction here
EXP_POLY = tuple(float.fromhex(h) for h in ("0x1.0e4020p-7", "0x1.573e2ep-5", "0x1.555e66p-3",
                                             "0x1.fffdb6p-2", "0x1.ffffecp-1"))


def _exp_reduced(xc, c, sign: float = 1.0):
    """The exp split for an already clamped ``xc``: ``(t, n, y)`` with exp(sign * xc) = 2^n * y,
    n integral (a float), y in [0.7, 1.42], and t = n + ROUND_MAGIC (whose low mantissa bits hold
    n as an integer). sign = -1 folds a negation into the constants: r = sign * xc - n ln2 is
    computed as sign * (xc - sign n ln2), and r's odd powers change sign with it."""
    t = xc * c(sign * LOG2E) + c(ROUND_MAGIC)
    n = t - c(ROUND_MAGIC)
    rs = xc - n * c(sign * LN2_HI) - n * c(sign * LN2_LO)
    p5, p4, p3, p2, p1 = (c(coef * sign ** (5 - i)) for i, coef in enumerate(EXP_POLY))
    r2 = rs * rs
    q = (p5 * rs + p4) * r2 + (p3 * rs + p2)
    return t, n, (q * r2 + p1 * rs) + c(1.0)


@float32_rule
def _fast_exp(x, ty, ity, c):
    xc = tirx.max(tirx.min(x, c(88.72283935546875)), c(-87.33654475))   # ln(FLT_MAX), ln(FLT_MIN)
    _, n, y = _exp_reduced(xc, c)
    # 2^n as exponent bits, computed in integers; n = 128 (x near ln FLT_MAX) as 2^127 * 2
    ni = n.astype(ity)
    m = tirx.min(ni, tirx.const(127, ity))
    scale = tirx.reinterpret(ty, (m + tirx.const(127, ity)) << tirx.const(23, ity))
    result = y * scale * tirx.Select(ni > tirx.const(127, ity), c(2.0), c(1.0))
    return tirx.Select(x < c(-87.33654475), c(0.0), result)


_ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
              -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
             -1.42647390514189e-02)


@float32_rule
def _fast_erf(x, ty, ity, c):
    xc = tirx.max(tirx.min(x, c(4.0)), c(-4.0))
    x2 = xc * xc
    p = c(_ERF_ALPHA[0])
    for a in _ERF_ALPHA[1:]:
        p = p * x2 + c(a)
    q = c(_ERF_BETA[0])
    for b in _ERF_BETA[1:]:
        q = q * x2 + c(b)
    return xc * p / q


def _fast_sigmoid(call):
    """The sigmoid lowering (see the module docstring); other dtypes fall through to TVM's
    legalization (a lowering that returns the call unchanged is skipped)."""
    ty = str(call.ty)
    if not ty.startswith("float32"):
        return call
    ity = "int32" + ty[len("float32"):]

    def c(v: float):
        return tirx.const(v, ty)

    x = call.args[0]
    x = tirx.Select(x < c(-89.0), c(-89.0), x)   # a compare is false on NaN: NaN is kept
    x = tirx.Select(x > c(87.0), c(87.0), x)
    t, _, y = _exp_reduced(x, c, sign=-1.0)       # exp(-x) = 2^n * y
    # 2^n from t's bits: n sits in the low mantissa bits, shifted into the exponent (2^128 = inf)
    two_n = tirx.reinterpret(ty, (tirx.reinterpret(ity, t) << tirx.const(23, ity)) + tirx.const(0x3F800000, ity))
    return c(1.0) / (y * two_n + c(1.0))


def install() -> None:
    """Register the lowerings once per process."""
    global _INSTALLED
    if _INSTALLED:
        return
    for name, rule in (("tirx.exp", _fast_exp), ("tirx.erf", _fast_erf)):
        op = tvm.ir.Op.get(name)
        _DEFAULT[name] = op.get_attr("llvm.FLowerIntrinsic") or op.get_attr("default.FLowerIntrinsic")
        if _DEFAULT[name] is None:
            raise RuntimeError(f"TVM has no llvm lowering for {name} to fall back on")
        tvm.tirx.op.register_intrin_lowering(name, target="llvm", f=rule, level=LEVEL)
    tvm.tirx.op.register_intrin_lowering("tirx.sigmoid", target="llvm", f=_fast_sigmoid, level=LEVEL)
    _INSTALLED = True
