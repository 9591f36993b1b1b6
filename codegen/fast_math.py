"""Vectorizable exp, erf and sigmoid for LLVM targets.

TVM lowers ``exp``/``erf`` on CPU to libm calls, which LLVM cannot vectorize: softmax, sigmoid
and GELU then cost more than the matmuls around them. Installing these lowerings replaces them by
branch-free polynomials that vectorize like any other arithmetic:

* ``exp``: Cephes' range reduction (x = n·ln2 + r, two-part ln2) and a degree-6 polynomial;
  max relative error 1.2e-7 (≈1 ulp) over the normal range, exact ±inf/NaN/0 handling; results
  below FLT_MIN (subnormals) flush to zero.
* ``erf``: the rational approximation Eigen and XLA use for float32 (clamped to [-4, 4], where
  erf is ±1 to float precision); max absolute error ~1e-7.
* ``sigmoid``: ``1 / (1 + exp(-x))`` with the same exp polynomial, specialised to the range
  sigmoid reads. TVM's own legalization goes through the general exp above, whose clamps, NaN
  and overflow selects cost as much as the polynomial; EfficientNet's SiLU epilogues (every
  expand and depthwise conv) spent about half their time there. Here -x is clamped to
  [-87, 89] by compares that keep NaN (NaN then flows through the arithmetic), and 2^n is
  built from the exponent bits without a guard: n = 128 gives +inf, so sigmoid(x < -88.4)
  is exactly 0, as torch's 1 / (1 + inf) is. Relative error below 4e-7; results below
  FLT_MIN flush to zero.

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


def _exp_reduced(xc, c):
    """Cephes' exp split for an already clamped ``xc``: ``(n, y)`` with exp(xc) = 2^n * y,
    n integral (as a float) and y in [0.7, 1.42]."""
    n = tirx.floor(xc * c(1.44269504088896341) + c(0.5))
    r = xc - n * c(0.693359375) - n * c(-2.12194440e-4)
    y = (((((c(1.9875691500e-4) * r + c(1.3981999507e-3)) * r + c(8.3334519073e-3)) * r
           + c(4.1665795894e-2)) * r + c(1.6666665459e-1)) * r + c(5.0000001201e-1)) * (r * r) + r + c(1.0)
    return n, y


@float32_rule
def _fast_exp(x, ty, ity, c):
    xc = tirx.max(tirx.min(x, c(88.72283935546875)), c(-87.33654475))   # ln(FLT_MAX), ln(FLT_MIN)
    n, y = _exp_reduced(xc, c)
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

    z = c(0.0) - call.args[0]
    z = tirx.Select(z > c(89.0), c(89.0), z)     # a compare is false on NaN: NaN is kept
    z = tirx.Select(z < c(-87.0), c(-87.0), z)
    n, y = _exp_reduced(z, c)
    two_n = tirx.reinterpret(ty, (n.astype(ity) + tirx.const(127, ity)) << tirx.const(23, ity))  # 2^128 = inf
    return c(1.0) / (c(1.0) + y * two_n)


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
