"""An average pooling after a 1x1 convolution runs first (codegen/pool_before_conv.py): DenseNet's
transitions then convolve a quarter of the pixels. Swapped where the two commute exactly (1x1,
stride 1, unpadded pooling, the conv's result used by the pooling alone), left alone elsewhere, and
the compiled model matches torch either way."""

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from torch import nn

import codegen
import compiler
from codegen.frontend import import_graph
from codegen.pool_before_conv import PoolBeforePointwiseConv
from codegen.relax_pipeline import INFERENCE_SIMPLIFICATIONS


class Transition(nn.Module):
    def __init__(self, kernel=1, bias=False, pool_padding=0, keep_conv=False, ceil=False, adaptive=None) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(32)
        self.conv = nn.Conv2d(32, 16, kernel, padding=kernel // 2, bias=bias)
        self.pool = nn.AvgPool2d(2, 2, padding=pool_padding, ceil_mode=ceil) if adaptive is None \
            else nn.AdaptiveAvgPool2d(adaptive)
        self.keep_conv = keep_conv

    def forward(self, x):
        y = self.conv(torch.relu(self.norm(x)))
        return (self.pool(y), y) if self.keep_conv else self.pool(y)


def _conv_input_heights(model: nn.Module, x: torch.Tensor) -> list[int]:
    mod = import_graph(compiler.trace(model, (x,)))[0]
    mod = PoolBeforePointwiseConv()(tvm.transform.Sequential(INFERENCE_SIMPLIFICATIONS)(mod))
    heights = []
    tvm_ffi.structural_walk(mod["main"].body, [(tvm.relax.Call, lambda c: heights.extend(
        [int(c.args[0].ty.shape[2])] if getattr(c.op, "name", "") == "relax.nn.conv2d" else []))])
    return heights


def _randomized(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model.norm.running_mean.uniform_(-0.5, 0.5)
    model.norm.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("model, swapped", [
    (Transition(), True),
    (Transition(bias=True), True),
    (Transition(ceil=True), True),                # 15x15: the last window is partial on both sides alike
    (Transition(kernel=3), False),                # a 3x3 window mixes pixels
    (Transition(pool_padding=1), False),          # the bias would be averaged into zero borders
    (Transition(keep_conv=True), False),          # the conv's own output is used too
    (Transition(bias=True, adaptive=1), True),    # a global pooling: the conv runs on one pixel
    (Transition(adaptive=(7, 7)), True),
])
def test_pool_moves_before_a_pointwise_conv_only_where_they_commute(model, swapped):
    model = _randomized(model)
    adaptive = isinstance(model.pool, nn.AdaptiveAvgPool2d)
    size = 15 if not adaptive and model.pool.ceil_mode else 28
    x = torch.randn(1, 32, size, size)
    if adaptive:
        pooled = model.pool.output_size if isinstance(model.pool.output_size, int) else model.pool.output_size[0]
    else:
        pooled = -(-size // 2) if model.pool.ceil_mode else size // 2 + model.pool.padding
    assert _conv_input_heights(model, x) == ([pooled] if swapped else [size])
    with torch.no_grad():
        ref = model(x)
    ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
    got = codegen.build(compiler.trace(model, (x,)), "llvm")(x)
    got = np.asarray(got[0] if isinstance(got, (tuple, list)) else got)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_the_cpu_pipeline_runs_the_swap_before_the_layout_change():
    from codegen.relax_pipeline import fusion_passes
    from codegen.target import host_cpu_target

    names = [p.info.name for p in fusion_passes(host_cpu_target())]
    assert names.index("PoolBeforePointwiseConv") < names.index("ConvertLayout")
