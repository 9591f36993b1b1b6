"""Concatenations along the vector axis are partitioned at their inputs' boundaries
(codegen/schedules/concat_partition.py): each part reads one input, not every input."""

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from torch import nn

import codegen
import compiler
from codegen.schedules.concat_partition import concat_boundaries
from codegen.schedules.cpu import ElementwiseRule
from test_cpu_schedule import fused_module, single_reduction_funcs
from tvm.s_tir.dlight.analysis import normalize_prim_func

_IF_THEN_ELSE = tvm.ir.Op.get("prim.if_then_else")


class DenseBlockInput(nn.Module):
    """DenseNet's pre-activation: BatchNorm and ReLU over the concatenation of earlier layers."""

    def __init__(self, widths):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(8, w, 1) for w in widths)
        self.bn = nn.BatchNorm2d(sum(widths))
        self.bn.running_mean.normal_()
        self.bn.running_var.uniform_(0.5, 2.0)
        self.head = nn.Conv2d(sum(widths), 16, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(torch.cat([c(x) for c in self.convs], 1))))


def _concat_func(model, x):
    mod, target = fused_module(model, (x,))
    ((func,),) = [[f for n, f in mod.functions.items() if "concatenate" in n.name_hint]]
    return func, target


def _choices_left(func, target) -> int:
    """if_then_else calls left in the kernel once TVM's TIR pipeline has lowered it."""
    lower = tvm.transform.Sequential([   # the stretch of TVM's TIR pipeline that folds them
        tvm.s_tir.transform.LowerInitBlock(), tvm.s_tir.transform.ConvertBlocksToOpaque(),
        tvm.s_tir.transform.LowerOpaqueBlock(), tvm.tirx.transform.FlattenBuffer(),
        tvm.tirx.transform.VectorizeLoop(True), tvm.tirx.transform.StmtSimplify()])
    with target:
        lowered = lower(tvm.IRModule({"main": func}))
    found = []
    tvm_ffi.structural_walk(lowered["main"].body,
                            [(tvm.ir.Call, lambda c: found.append(c.op.same_as(_IF_THEN_ELSE)))])
    return sum(found)


@pytest.mark.parametrize("widths", [(32, 16, 16, 16), (64, 16), (48, 32, 16), (24, 8, 40), (5, 3, 7)])
def test_concatenation_along_the_vector_axis_reads_one_input_per_part(widths):
    """TVM's concatenation is a chain of if_then_else on the channel index; vectorized over the
    channels, every vector evaluated every input (densenet121 pruned: its concat + BN + ReLU
    kernels were half the model, 0.6 ms each). Partitioned at the boundaries, lowering folds each
    part's chain to one load: no choice is left, and the result is torch's."""
    torch.manual_seed(0)
    model = DenseBlockInput(widths).eval()
    x = torch.randn(1, 8, 14, 14)
    func, target = _concat_func(model, x)
    assert _choices_left(func, target) > 0   # the stock chain, before
    scheduled = ElementwiseRule().apply(func, target, False)
    assert _choices_left(scheduled.mod["main"], target) == 0
    got = codegen.build(compiler.trace(model, (x,)))(x)
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_boundaries_are_the_inputs_offsets_and_padding_is_not_one():
    func, _ = _concat_func(DenseBlockInput((32, 16, 48)).eval(), torch.randn(1, 8, 6, 6))
    sch = tvm.s_tir.Schedule(func)
    found = {tuple(concat_boundaries(b, len(b.iter_vars) - 1))
             for b in (sch.get(i.block_rv) for i in normalize_prim_func(sch)) if b.iter_vars}
    assert (32, 48) in found

    conv = nn.Conv2d(16, 16, 3, padding=1).eval()
    mod, _ = fused_module(conv, (torch.randn(1, 16, 8, 8),))
    ((_, func),) = list(single_reduction_funcs(mod))
    sch = tvm.s_tir.Schedule(func)
    pads = [sch.get(i.block_rv) for i in normalize_prim_func(sch) if "pad" in sch.get(i.block_rv).name_hint]
    assert pads and not any(concat_boundaries(p, len(p.iter_vars) - 1) for p in pads)
