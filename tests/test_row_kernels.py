"""Row reductions in vector lanes (schedules/row_reduction.py) and activations fused across the
reshapes of a channels-last Linear (activation_reshapes.py): same results as torch."""

import re

import numpy as np
import pytest
import torch
from torch import nn

import codegen
import compiler
from codegen.frontend import import_graph
from codegen.options import BuildOptions
from codegen.relax_pipeline import kernel_calls, scheduled_module
from codegen.schedules.cpu import vector_lanes
from codegen.schedules.row_reduction import RowReductionRule, row_vector_width


def _scheduled(model, x):
    return scheduled_module(import_graph(compiler.trace(model.eval(), (x,)))[0], BuildOptions.create("llvm"))


def _matches_torch(model, x):
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    got = codegen.build(compiler.trace(model, (x,)), "llvm")(x)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def _factored_lane_widths(mod) -> list[int]:
    """The width of the vectorized loop directly around each factored (``_rf``) reduction block:
    the lanes its partial results accumulate in. A factored block whose lane loop is not the
    vectorized one (the lanes walked one by one, each a serial chain) gives no entry."""
    widths = []
    for f in mod.functions.values():
        if hasattr(f, "params"):
            lines = f.script().splitlines()
            widths += [int(m.group(1)) for line, nxt in zip(lines, lines[1:])
                       if (m := re.search(r"in T\.vectorized\(T\.int64\((\d+)\)\)", line)) and '_rf")' in nxt]
    return widths


@pytest.mark.parametrize("model, shape, width", [
    (nn.LayerNorm(768), (1, 197, 768), None), (nn.LayerNorm(96), (2, 7, 7, 96), None), (nn.Softmax(-1), (3, 5, 128), None),
    (nn.LayerNorm(48), (3, 48), None), (nn.Softmax(-1), (2, 3, 64, 64), None),   # 4-D: attention scores
    (nn.Softmax(-1), (4, 2, 49, 49), 7),   # a 7x7 window's scores (Swin, MaxViT): vectors of 7 fill each row
])
def test_row_reductions_accumulate_in_vector_lanes_and_match_torch(model, shape, width):
    """Each row's sum (and max) is factored into a vector of partial results: in the scheduled
    kernel every factored block sits directly in a vectorized loop of the lane width (a whole
    register, or the widest divisor of a row that is not whole registers), and the result matches
    torch."""
    x = torch.randn(shape)
    mod = _scheduled(model, x)
    width = width or vector_lanes(BuildOptions.create("llvm").target)
    assert _factored_lane_widths(mod) == [width] * 2   # softmax: max and sum; LayerNorm: sum and squares
    _matches_torch(model, x)


@pytest.mark.parametrize("extent, lanes, width", [(768, 16, 16), (49, 16, 7), (49, 8, 7), (60, 16, 15), (197, 16, None),
                                                  (22, 16, 11), (6, 16, 6), (96, 8, 8)])
def test_row_vector_width_is_a_register_or_the_widest_divisor_of_a_quarter_register(extent, lanes, width):
    assert row_vector_width(extent, lanes) == width


@pytest.mark.parametrize("shape", [(4, 64), (1, 197, 768)])
def test_rms_norm_matches_torch(shape):
    _matches_torch(nn.RMSNorm(shape[-1]), torch.randn(shape))


@pytest.mark.parametrize("width", [19, 13])
def test_rows_without_vector_wide_divisors_keep_the_serial_schedule(width):
    """A prime row (no divisor of at least a quarter register: 19 or 13 wide) is left to dlight's
    rule, and still matches."""
    x = torch.randn(3, width)
    mod = _scheduled(nn.LayerNorm(width), x)
    assert not any("_rf" in f.script() for gv, f in mod.functions.items() if hasattr(f, "params"))
    _matches_torch(nn.LayerNorm(width), x)


def test_row_reduction_rule_declines_reductions_not_over_the_innermost_axis():
    from codegen.relax_pipeline import fusion_passes
    import tvm

    target = BuildOptions.create("llvm").target
    mod, _, _ = import_graph(compiler.trace(nn.Softmax(1).eval(), (torch.randn(2, 64, 32),)))
    with target:
        mod = tvm.transform.Sequential(fusion_passes(target))(mod)
    funcs = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc) and "softmax" in f.script()]
    assert funcs and all(RowReductionRule().apply(f, target, False) is None for f in funcs)


class ChannelsLastMlp(nn.Module):
    """ConvNeXt's pointwise MLP: Linear on an (N, H, W, C) tensor, GELU, Linear."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(32, 64), act, nn.Linear(64, 32)

    def forward(self, x):
        return self.down(self.act(self.up(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.ReLU(), nn.Sigmoid()])
def test_an_activation_after_a_channels_last_linear_fuses_into_its_matmul(act):
    """The activation moves before the reshape torch.export puts between it and the matmul, so it
    runs in the matmul's epilogue: no kernel of its own, and the same result."""
    torch.manual_seed(0)
    model, x = ChannelsLastMlp(act), torch.randn(2, 32, 6, 6)
    calls = kernel_calls(_scheduled(model, x))
    name = {nn.GELU: "gelu", nn.SiLU: "sigmoid", nn.ReLU: "relu", nn.Sigmoid: "sigmoid"}[type(act)]  # SiLU: x * sigmoid(x)
    with_act = [k for k in calls if name in k]
    assert with_act and all("matmul" in k for k in with_act), calls
    _matches_torch(model, x)
