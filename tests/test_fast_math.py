"""The vectorizable exp/erf lowerings: accuracy bounds over the whole float32 range, special
values, and untouched float64."""

import math

import numpy as np
import pytest
import tvm
from tvm import te

import codegen
from codegen import fast_math


def _run(fn, values: np.ndarray) -> np.ndarray:
    fast_math.install()
    n = len(values)
    a = te.placeholder((n,), name="A", dtype=str(values.dtype))
    b = te.compute((n,), lambda i: fn(a[i]), name="B")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, b]))
    (loop,) = sch.get_loops(sch.get_sblock("B"))
    sch.vectorize(sch.split(loop, [None, 16])[1])
    lib = tvm.compile(sch.mod, target=codegen.resolve_target("llvm"))
    out = tvm.runtime.empty((n,), str(values.dtype), tvm.cpu())
    lib(tvm.runtime.tensor(values), out)
    return out.numpy()


def _inputs(lo, hi, dtype="float32"):
    rng = np.random.default_rng(0)
    grid = np.concatenate([rng.uniform(lo, hi, 1 << 16), np.linspace(lo, hi, 4096)])
    return np.concatenate([grid, [np.nan, -np.inf, np.inf, 0.0, -0.0]]).astype(dtype)


def test_exp_float32_within_a_few_ulp_and_specials():
    x = _inputs(-100, 100)
    got = _run(te.exp, x).astype(np.float64)
    with np.errstate(all="ignore"):
        ref = np.exp(x.astype(np.float64))
    normal = (ref > np.finfo(np.float32).tiny) & (ref < np.finfo(np.float32).max)
    assert np.max(np.abs(got[normal] - ref[normal]) / ref[normal]) < 2.5e-7
    tiny = ref <= np.finfo(np.float32).tiny
    assert np.all(np.abs(got[tiny] - ref[tiny]) <= np.finfo(np.float32).tiny)
    assert np.all(np.isinf(got[ref >= np.finfo(np.float32).max]))
    assert np.isnan(got[-5]) and got[-4] == 0.0 and np.isinf(got[-3]) and got[-2] == 1.0 and got[-1] == 1.0


def test_erf_float32_accuracy_and_specials():
    x = _inputs(-6, 6)
    got = _run(te.erf, x).astype(np.float64)
    ref = np.array([math.erf(v) if np.isfinite(v) else np.nan for v in x.astype(np.float64)])
    finite = np.isfinite(x)
    assert np.max(np.abs(got[finite] - ref[finite])) < 5e-7
    assert np.isnan(got[-5]) and got[-4] == -1.0 and got[-3] == 1.0 and got[-2] == 0.0


@pytest.mark.parametrize("fn, ref", [(te.exp, np.exp), (te.erf, np.vectorize(math.erf))])
def test_float64_keeps_tvm_default(fn, ref):
    x = np.linspace(-20, 20, 1000)
    np.testing.assert_allclose(_run(fn, x), ref(x), rtol=1e-14, atol=1e-300)


def test_sigmoid_float32_accuracy_and_specials():
    """The specialised sigmoid: within a few ulp of float64 over the whole range, NaN kept,
    ±inf and the ends exact as torch has them, and SiLU (x * sigmoid(x)) matching torch,
    including its NaN at -inf."""
    import torch

    x = _inputs(-120, 120)
    got = _run(te.sigmoid, x).astype(np.float64)
    ref = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    normal = np.isfinite(x) & (ref > np.finfo(np.float32).tiny)
    assert np.max(np.abs(got[normal] - ref[normal]) / ref[normal]) < 3e-7
    tiny = np.isfinite(x) & ~normal
    assert np.all(np.abs(got[tiny]) <= np.finfo(np.float32).tiny)
    assert np.isnan(got[-5]) and got[-4] == 0.0 and got[-3] == 1.0 and got[-2] == 0.5 and got[-1] == 0.5
    assert np.all(got[x < -89] == 0.0) and np.all(got[x > 17] == 1.0)
    silu = _run(lambda v: v * te.sigmoid(v), x)
    want = torch.nn.functional.silu(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(np.isnan(silu), np.isnan(want))
    finite = np.isfinite(want)
    # where sigmoid is subnormal (x < -87.3) it flushes to 0: |x * sigmoid(x)| < 89 * FLT_MIN there
    np.testing.assert_allclose(silu[finite], want[finite], rtol=4e-7, atol=89 * np.finfo(np.float32).tiny)


def test_sigmoid_float64_keeps_tvm_default():
    x = np.linspace(-30, 30, 1000)
    np.testing.assert_allclose(_run(te.sigmoid, x), 1 / (1 + np.exp(-x)), rtol=1e-14)


def test_sigmoid_rule_replaces_the_exp_legalization():
    """The rule is what lowers float32 sigmoid: one division, no general exp (whose guards it
    exists to drop), and TVM's legalization is left for float64."""
    from tvm import tirx

    lowered = fast_math._fast_sigmoid(tirx.sigmoid(tirx.Var("x", "float32")))
    assert isinstance(lowered, tirx.Div) and "exp" not in str(lowered)
    wide = tirx.sigmoid(tirx.Var("x", "float64"))
    assert fast_math._fast_sigmoid(wide).same_as(wide)
