"""AdaRound (passes/adaround.py, Nagel et al. 2020): the property the paper relies on — learned
up/down rounding reconstructs the layer's output at least as well as rounding to nearest — and
that its weights deploy like any others."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compiler
from compiler.errors import OptionError
from compiler.ops import IntConv2d
from passes import Quantize
from passes.adaround import adaround, nearest_weight, reconstruction_error
from passes.quantization import FakeQuantConv2d


def _calibrated(w_bits: int) -> tuple[FakeQuantConv2d, torch.Tensor]:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1)
    layer = FakeQuantConv2d.from_conv(conv, w_bits, 8, learn=False).eval()
    x = torch.randn(48, 6, 7, 7)
    layer.set_input_range(float(x.min()), float(x.max()))
    return layer, x


@pytest.mark.parametrize("w_bits", [4, 8])
def test_learned_rounding_reconstructs_the_output_better_than_nearest(w_bits):
    layer, x = _calibrated(w_bits)
    scaled = (layer.weight.detach() / layer.w_step.detach().reshape(-1, 1, 1, 1)).clone()
    nearest = reconstruction_error(layer, x, nearest_weight(layer))
    before, after = adaround(layer, x, iters=200)
    assert before == pytest.approx(nearest)
    assert after <= before
    if w_bits == 4:   # coarse grid: rounding choices matter
        assert after < before
    codes = layer.weight.detach() / layer.w_step.detach().reshape(-1, 1, 1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-4)             # on the grid
    assert float((codes.round() - scaled).abs().max()) < 1.0 + 1e-4    # each weight floor or ceil
    assert torch.equal(nearest_weight(layer), layer.weight.detach())   # the layer's own rounding keeps them


def test_quantize_with_adaround_deploys_what_its_fake_layers_compute():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5)).eval()
    x = torch.randn(16, 3, 6, 6)
    g = compiler.trace(net, (x[:2],))
    fake = Quantize(stage="calibrate", calibration=((x, None),), rounding="adaround", adaround_iters=50, w_bits=4)(g)
    deployed = Quantize(stage="deploy")(fake)
    assert isinstance(deployed.module.get_submodule("2"), IntConv2d)
    with torch.no_grad():
        assert torch.equal(fake.module(x), deployed.module(x))
    assert any("AdaRound" in line for report in fake.reports for line in report.changed)


def test_a_bad_rounding_option_names_itself():
    with pytest.raises(OptionError, match="rounding"):
        Quantize(rounding="stochastic")
    with pytest.raises(OptionError, match="adaround_iters"):
        Quantize(adaround_iters=0)
