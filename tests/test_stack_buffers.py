"""Register-tile accumulators stay on the stack (codegen/stack_buffers.py): TVM 0.27 otherwise
allocates every "local" buffer from its heap workspace, two runtime calls per register tile."""

import numpy as np
import torch
import tvm
from torch import nn
from tvm import tirx

import codegen
import compiler
from codegen import stack_buffers
from codegen.frontend import import_graph
from codegen.options import BuildOptions
from codegen.relax_pipeline import scheduled_module


def _conv_kernel():
    layer = nn.Conv2d(96, 24, 1).eval()
    x = torch.randn(1, 96, 56, 56)
    options = BuildOptions.create("llvm")
    mod = scheduled_module(import_graph(compiler.trace(layer, (x,)), options)[0], options)
    (func,) = [f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc) and gv.name_hint.endswith("_prepacked")]
    return func.with_attr("global_symbol", "main"), options.target


def _compiled(func, target, pipeline):
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target, tir_pipeline=pipeline)
    return lib, (lib.mod.imports[0] if lib.mod.imports else lib.mod).inspect_source("ll")


def _run(lib, func):
    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor(rng.standard_normal([int(d) for d in p.ty.shape]).astype("float32")) for p in func.params]
    lib.mod["main"](*args)
    return args[-1].numpy()


def test_accumulators_are_stack_arrays_with_the_same_result():
    func, target = _conv_kernel()
    default_lib, default_ll = _compiled(func, target, "default")
    ours_lib, ours_ll = _compiled(func, target, stack_buffers.register())
    assert "TVMBackendAllocWorkspace" in default_ll   # what TVM does on its own: the premise
    assert "TVMBackendAllocWorkspace" not in ours_ll
    np.testing.assert_array_equal(_run(ours_lib, func), _run(default_lib, func))


def test_large_local_buffers_stay_on_the_heap():
    buf = tirx.decl_buffer((stack_buffers.STACK_BYTES_MAX // 4 + 1,), "float32", scope="local")
    node = tirx.AllocBuffer(buf)
    assert stack_buffers._on_stack(node, None) is node
    small = tirx.AllocBuffer(tirx.decl_buffer((64,), "float32", scope="local"))
    assert stack_buffers.DISABLE_LOWER_BUILTIN in stack_buffers._on_stack(small, None).annotations


def test_a_built_model_matches_torch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 24, 1)).eval()
    x = (torch.randn(1, 16, 20, 20),)
    np.testing.assert_allclose(codegen.build(compiler.trace(model, x), "llvm")(*x), model(*x).detach().numpy(),
                               rtol=1e-4, atol=1e-5)
