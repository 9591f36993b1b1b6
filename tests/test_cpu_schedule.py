"""Our CPU schedule rules must actually apply (a rule that raises is silently skipped by the
pipeline, which would leave a slow naive loop nest behind), and must pick sensible vectors."""

import numpy as np
import pytest
import torch
import tvm
from torch import nn

import codegen
import compiler
from codegen.cpu_schedule import SpatialReductionRule, largest_divisor_at_most
from codegen.frontend import import_graph
from codegen.relax_pipeline import fusion_passes
from compiler import zoo
from tvm.s_tir.dlight.analysis import normalize_prim_func


def fused_module(model, x):
    target = codegen.resolve_target("llvm")
    mod, _, _ = import_graph(compiler.trace(model, x))
    with target:
        return tvm.transform.Sequential(fusion_passes(target))(mod), target


def single_reduction_funcs(mod):
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        infos = normalize_prim_func(tvm.s_tir.Schedule(func))
        if infos and sum(not i.is_injective() for i in infos) == 1:
            yield gv.name_hint, func


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_spatial_reduction_rule_applies_to_every_conv_and_matmul(name):
    e = zoo.get(name)
    mod, target = fused_module(e.build(), e.example_inputs(batch=2))
    funcs = list(single_reduction_funcs(mod))
    assert funcs, "expected at least one conv/matmul/pool function"
    for fname, func in funcs:
        if any(k in fname for k in ("softmax", "layer_norm", "mean", "max")) and "conv" not in fname and "matmul" not in fname:
            continue  # row reductions are dlight's Reduction rule's job
        assert SpatialReductionRule().apply(func, target, False) is not None, fname


def _vector_extents(func):
    found = []

    def visit(loop):
        if loop.kind == tvm.tirx.ForKind.VECTORIZED:
            found.append(int(loop.extent))

    import tvm_ffi

    tvm_ffi.structural_walk(func.body, [(tvm.tirx.For, visit)])
    return found


def test_grouped_conv_vectors_do_not_straddle_groups():
    conv = nn.Conv2d(8, 32, 3, padding=1, groups=4).eval()  # 8 output channels per group
    x = torch.randn(2, 8, 8, 8)
    mod, target = fused_module(conv, x)
    ((fname, func),) = [(n, f) for n, f in single_reduction_funcs(mod) if "conv" in n]
    sch = SpatialReductionRule().apply(func, target, False)
    extents = _vector_extents(sch.mod["main"])
    assert extents and all(8 % e == 0 for e in extents), extents
    m = codegen.build(compiler.trace(conv, x))
    np.testing.assert_allclose(m(x), conv(x).detach().numpy(), atol=1e-4)


def test_concat_vectors_respect_the_boundary():
    class Cat(nn.Module):
        def forward(self, a, b):
            return torch.cat([a, b], dim=-1)

    a, b = torch.randn(4, 16, 16), torch.randn(4, 16, 8)
    m = codegen.build(compiler.trace(Cat(), (a, b)))
    np.testing.assert_array_equal(m(a, b), torch.cat([a, b], -1).numpy())


def test_largest_divisor():
    assert largest_divisor_at_most(24, 16) == 12
    assert largest_divisor_at_most(7, 16) == 7
    assert largest_divisor_at_most(13, 8) == 1
