"""Constant folding in numpy (codegen/numpy_folding.py, prepack_folding.py): every call it folds
gives the same bits as TVM's FoldConstant, which builds and runs the kernel; what it does not fold
exactly it leaves, and the build still folds it and matches torch."""

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.script import tirx as T

import codegen
import compiler
from codegen.numpy_folding import numpy_fold_constants
from codegen.prepack_folding import evaluate_scatter

RNG = np.random.default_rng(0)
F = RNG.standard_normal((2, 3, 4)).astype("float32")
G = (RNG.standard_normal((2, 3, 4)) * 10).astype("float32")
I = RNG.integers(-50, 50, (2, 3, 4)).astype("int64")
J = RNG.integers(-50, 50, (2, 3, 4)).astype("int64")


def _c(a):
    return relax.const(a, str(a.dtype))


CALLS = {
    "permute_dims": lambda: relax.op.permute_dims(_c(F), [2, 0, 1]),
    "permute_dims reversed": lambda: relax.op.permute_dims(_c(F)),
    "reshape": lambda: relax.op.reshape(_c(F), (4, 6)),
    "expand_dims": lambda: relax.op.expand_dims(_c(F), [0, -1]),
    "squeeze": lambda: relax.op.squeeze(relax.op.expand_dims(_c(F), [1])),
    "broadcast_to": lambda: relax.op.broadcast_to(_c(F[:1]), (3, 3, 4)),
    "strided_slice": lambda: relax.op.strided_slice(_c(F), axes=[1, 2], begin=[1, 0], end=[3, 4], strides=[1, 2]),
    "strided_slice from the end": lambda: relax.op.strided_slice(_c(F), axes=[2], begin=[-3], end=[-1]),
    "concat": lambda: relax.op.concat([_c(F), _c(G)], axis=1),
    "astype int to float": lambda: relax.op.astype(_c(I), "float32"),
    "astype float32 to float16": lambda: relax.op.astype(_c(G), "float16"),
    "where": lambda: relax.op.where(relax.op.less(_c(F), _c(G)), _c(F), _c(G)),
    "full": lambda: relax.op.full((2, 5), relax.const(1.25, "float32"), "float32"),
    "arange": lambda: relax.op.arange(3, 40, 4, "int64"),
    "add with a scalar": lambda: relax.op.add(_c(F), relax.const(1e-5, "float32")),
    "subtract": lambda: relax.op.subtract(_c(F), _c(G)),
    "multiply": lambda: relax.op.multiply(_c(F), _c(G)),
    "divide": lambda: relax.op.divide(_c(F), _c(G)),
    "sqrt": lambda: relax.op.sqrt(relax.op.multiply(_c(F), _c(F))),
    "rsqrt": lambda: relax.op.rsqrt(relax.op.add(relax.op.multiply(_c(G), _c(G)), relax.const(1.0, "float32"))),
    "negative": lambda: relax.op.negative(_c(F)),
    "equal": lambda: relax.op.equal(_c(I), _c(J)),
    "greater_equal": lambda: relax.op.greater_equal(_c(F), _c(G)),
    "integer add": lambda: relax.op.add(_c(I), _c(J)),
    "integer multiply": lambda: relax.op.multiply(_c(I), _c(J)),
    "bitwise_and": lambda: relax.op.bitwise_and(_c(I), _c(J)),
    "index_tensor": lambda: relax.op.index_tensor(_c(F), [_c(np.array([1, 0, 1])), _c(np.array([[2], [0]]))]),
}


def _module(expr) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    with bb.function("main", []):
        with bb.dataflow():
            out = bb.emit_output(expr)
        bb.emit_func_output(out)
    return bb.get()


def _folded_value(mod: tvm.IRModule):
    """The constant ``main`` returns once folded, or None if a call is left."""
    body = mod["main"].body
    bound = {b.var: b.value for block in body.blocks for b in block.bindings}
    value = body.body
    while value in bound:
        value = bound[value]
    return value.value.numpy() if isinstance(value, tvm.ir.expr.Constant) else None


def _kernel_value(mod: tvm.IRModule) -> np.ndarray:
    """The call's value from TVM's own kernel for it, built and run (no numpy folding)."""
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return vm["main"]().numpy()


@pytest.mark.parametrize("name", list(CALLS))
def test_each_fold_gives_foldconstants_bits(name):
    mod = _module(CALLS[name]())
    ours = _folded_value(relax.transform.DeadCodeElimination()(numpy_fold_constants(mod)))
    assert ours is not None, f"{name} was not folded"
    tvms = _kernel_value(mod)
    assert ours.dtype == tvms.dtype and ours.shape == tvms.shape
    assert np.array_equal(ours.view(np.uint8), tvms.view(np.uint8)), name


@pytest.mark.parametrize("name,call", [
    ("NaN input", lambda: relax.op.less(_c(np.array([np.nan, 1.0], "float32")), _c(np.ones(2, "float32")))),
    ("float to integer cast", lambda: relax.op.astype(_c(G), "int32")),
    ("integer divide", lambda: relax.op.divide(_c(I), _c(np.maximum(np.abs(J), 1)))),
    ("transcendental", lambda: relax.op.exp(_c(F))),
    ("reversed slice", lambda: relax.op.strided_slice(_c(F), axes=[2], begin=[3], end=[0], strides=[-1])),
    ("negative index", lambda: relax.op.index_tensor(_c(F), [_c(np.array([-1, 0]))])),
])
def test_what_is_not_exact_in_numpy_is_left_to_foldconstant(name, call):
    mod = _module(call())
    assert _folded_value(numpy_fold_constants(mod)) is None, name
    assert _kernel_value(mod).shape   # TVM's kernel still computes it


@T.prim_func(private=True, s_tir=True)
def _prepack(w: T.Buffer((3, 3, 4, 32), "float32"), packed: T.Buffer((2, 3, 3, 4, 16), "float32")):
    for a0, a1, a2, a3 in T.grid(3, 3, 4, 32):
        with T.sblock("pack"):
            v0, v1, v2, v3 = T.axis.remap("SSSS", [a0, a1, a2, a3])
            packed[v3 // 16, v0, v1, v2, v3 % 16] = w[v0, v1, v2, v3]


@T.prim_func(private=True, s_tir=True)
def _scaled(w: T.Buffer((4, 8), "float32"), out: T.Buffer((8, 4), "float32")):
    for a0, a1 in T.grid(4, 8):
        with T.sblock("pack"):
            v0, v1 = T.axis.remap("SS", [a0, a1])
            out[v1, v0] = w[v0, v1] * T.float32(2)


def test_a_weight_prepack_scatter_matches_the_built_kernel():
    w = RNG.standard_normal((3, 3, 4, 32)).astype("float32")
    ours = evaluate_scatter(_prepack, w, [2, 3, 3, 4, 16], "float32")
    lib = tvm.compile(tvm.IRModule({"main": _prepack.with_attr("global_symbol", "main")}), target="llvm")
    out = tvm.runtime.tensor(np.zeros((2, 3, 3, 4, 16), "float32"))
    lib["main"](tvm.runtime.tensor(w), out)
    assert ours is not None and np.array_equal(ours, out.numpy())
    assert evaluate_scatter(_scaled, w[0, 0], [8, 4], "float32") is None   # arithmetic on the value
    assert evaluate_scatter(_prepack, w, [2, 3, 3, 4, 17], "float32") is None   # elements left unwritten


def test_a_conv_bn_net_folds_without_foldconstant_and_matches_torch():
    """BatchNorm folded into the weights, their layout permute and the schedules' prepacking all
    fold here: TVM's FoldConstant (which builds a kernel per call) is left nothing to do."""
    from unittest import mock

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 32, 3, padding=1, bias=False), torch.nn.BatchNorm2d(32),
                                torch.nn.ReLU(), torch.nn.Conv2d(32, 16, 1), torch.nn.Flatten(),
                                torch.nn.Linear(16 * 8 * 8, 10)).eval()
    model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 8, 8, 8)
    left_to_tvm = []
    stock = relax.transform.FoldConstant

    def counting():
        inner = stock()

        @tvm.transform.module_pass(opt_level=0, name="CountingFoldConstant")
        def run(mod, _ctx):
            left_to_tvm.extend(_calls_on_constants(mod))
            return inner(mod)
        return run

    with mock.patch.object(relax.transform, "FoldConstant", counting):
        got = codegen.build(compiler.trace(model, x), "llvm")(x)
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    assert not left_to_tvm


def _calls_on_constants(mod: tvm.IRModule) -> list[str]:
    """The calls of ``main`` whose tensor arguments are all constants: what FoldConstant would build."""
    bound, found = {}, []
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            value = bound.get(b.value, b.value)
            bound[b.var] = value
            if not isinstance(value, relax.Call):
                continue
            args = list(value.args)
            if isinstance(value.op, tvm.ir.Op) and value.op.name == "relax.call_tir":
                args = list(args[1].fields)
            args = [bound.get(a, a) for a in args if not isinstance(a, relax.ShapeExpr)]
            if args and all(isinstance(a, tvm.ir.expr.Constant) for a in args):
                found.append(str(value.args[0]) if value.op.name == "relax.call_tir" else value.op.name)
    return found
