"""What follows an integer layer folded into its kernel (codegen/int_epilogue.py) and the
transposes between NHWC regions cancelled (codegen/transpose_sinking.py): same numbers, fewer passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

import codegen
import compiler
from codegen.frontend import import_graph
from codegen.options import BuildOptions
from codegen.relax_pipeline import kernel_calls, scheduled_module
from codegen.transpose_sinking import SinkTransposes
from passes import Quantize


def _chain() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 24, 1), nn.ReLU6(), nn.Conv2d(24, 24, 3, 1, 1, groups=24), nn.ReLU6(),
                        nn.Conv2d(24, 20, 1), nn.ReLU(), nn.Conv2d(20, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 8, 3)).eval()
    return net, torch.randn(2, 8, 13, 11)


def _host_has(kernels: str) -> bool:
    from codegen.kernels.amx_kernels import amx_available
    from codegen.kernels.vnni_kernels import vnni_available
    target = BuildOptions.create("llvm").target
    return {"amx": amx_available, "vnni": vnni_available}.get(kernels, lambda t: True)(target)


@pytest.mark.parametrize("kernels", ["amx", "vnni", "generic"])
def test_an_integer_chain_compiles_to_what_the_fake_quantized_model_computes(kernels):
    if not _host_has(kernels):
        pytest.skip(f"this CPU has no {kernels}")
    net, x = _chain()
    q = Quantize(calibration=((x, None),))(compiler.trace(net, (x,)))
    ref = q.module(x).detach().numpy()
    out = codegen.build(q, "llvm", int_kernels=kernels)(x)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_activations_codes_and_padding_run_inside_the_integer_kernels():
    if not _host_has("vnni"):
        pytest.skip("this CPU has neither AMX nor VNNI")
    net, x = _chain()
    q = Quantize(calibration=((x, None),))(compiler.trace(net, (x,)))
    options = BuildOptions.create("llvm")
    calls = kernel_calls(scheduled_module(import_graph(q, options)[0], options))
    names = [n for n in calls if "transpose" not in n or "quantize" not in n]   # the model input's quantize
    # no ReLU, quantize or pad of its own; no transposes between the layers (one: the NCHW output)
    assert not [n for n in names if n.startswith(("fused_maximum", "fused_minimum", "maximum", "relu", "pad",
                                                  "int_quantize", "fused_int_quantize"))], calls
    assert len([n for n in calls if n.startswith("transpose")]) == 1, calls
    assert sum(1 for n in calls if n.endswith("_q") or "_q_" in n or n.endswith("_q1")) >= 3, calls


def _relax(build) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 5, 6), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(build(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def _permutes(mod: tvm.IRModule) -> int:
    return mod["main"].script().count("R.permute_dims")


def test_transposes_sink_through_elementwise_ops_and_cancel():
    def build(bb, x):
        t = bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
        r = bb.emit(relax.op.nn.relu(t))
        s = bb.emit(relax.op.add(r, relax.const(np.arange(4, dtype=np.float32))))   # a per-channel constant
        m = bb.emit(relax.op.multiply(s, relax.op.permute_dims(x, [0, 2, 3, 1])))
        return bb.emit(relax.op.permute_dims(m, [0, 3, 1, 2]))

    mod = _relax(build)
    out = SinkTransposes()(mod)
    assert _permutes(out) == 0
    xv = np.random.rand(1, 4, 5, 6).astype(np.float32) - 0.5
    run = lambda m: relax.VirtualMachine(tvm.compile(m, target="llvm"), tvm.cpu())["main"](  # noqa: E731
        tvm.runtime.tensor(xv)).numpy()
    np.testing.assert_allclose(run(out), run(mod), rtol=1e-6)


def test_a_transpose_read_twice_is_not_duplicated():
    def build(bb, x):
        t = bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
        a = bb.emit(relax.op.nn.relu(t))
        b = bb.emit(relax.op.sigmoid(t))
        return bb.emit(relax.op.concat([a, b], axis=3))

    out = SinkTransposes()(_relax(build))
    assert _permutes(out) == 1
