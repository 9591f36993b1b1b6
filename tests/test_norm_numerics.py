"""Layer, group and instance norm are computed in two passes (codegen/norm_numerics.py): a channel
whose mean is large next to its spread lost most of its digits in topi's E[x²] − E[x]² (the fuzzer
found GroupNorm after a rank-1 low-rank conv 4e-4 off; torch is 6e-6 from float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import codegen
import compiler


def _offset_input(shape, seed: int = 0) -> torch.Tensor:
    """Every element 0.4 plus noise of 1e-3: mean² is 1e5 times the variance."""
    g = torch.Generator().manual_seed(seed)
    return 0.4 + 1e-3 * torch.randn(*shape, generator=g)


LAYERS = [
    ("group_norm", nn.GroupNorm(6, 6), (2, 6, 5, 7)),
    ("group_norm_2_per_group", nn.GroupNorm(2, 6), (1, 6, 4, 4)),
    ("layer_norm_last", nn.LayerNorm(16), (3, 5, 16)),
    ("layer_norm_two_axes", nn.LayerNorm((4, 6)), (2, 3, 4, 6)),
    ("instance_norm", nn.InstanceNorm2d(3, affine=True), (2, 3, 6, 5)),
]


@pytest.mark.parametrize("default_schedules", [True, False])
@pytest.mark.parametrize("name,layer,shape", LAYERS, ids=[n for n, _, _ in LAYERS])
def test_norms_keep_their_digits_when_the_mean_dwarfs_the_spread(name, layer, shape, default_schedules):
    import copy

    layer = copy.deepcopy(layer)   # shared by the parametrizations
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p))
    model = nn.Sequential(layer).eval()
    x = _offset_input(shape)
    got = np.asarray(codegen.build(compiler.trace(model, (x,)), "llvm", default_schedules=default_schedules)(x))
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double()).numpy()
    scale = np.abs(exact).max()
    # torch float32 lands ~1e-6 × scale from float64 here; topi's one-pass variance was ~1e-3 off
    assert np.abs(got - exact).max() <= 2e-5 * scale, name


@pytest.mark.parametrize("default_schedules", [True, False])
def test_the_low_rank_group_norm_case_the_fuzzer_found(default_schedules):
    """Branch 7 of the long profile's seed-8000 failure: a 3→3 1×1 conv of rank 1 (one output
    channel scaled by 0.0011, bias −0.37), split by ``low-rank:rank=1``, concatenated with its
    input, then GroupNorm(6, 6): 4.2e-4 from float64 before (scale 2.4), torch 5.8e-6."""
    from fuzz_models import Concat

    conv = nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        u = torch.tensor([0.08882997, 0.00113279, 0.81396824])
        v = torch.tensor([0.62698835, -0.3822071, -0.36227024])
        conv.weight.copy_(torch.outer(u, v)[:, :, None, None])
        conv.bias.copy_(torch.tensor([0.48183113, -0.36896014, -0.41630447]))
    model = nn.Sequential(Concat(conv), nn.GroupNorm(6, 6)).eval()
    graph = compiler.parse_pass_spec("low-rank:rank=1,only_if_fewer_macs=false")(
        compiler.trace(model, (torch.randn(1, 3, 5, 7),)))
    worst = 0.0
    for seed in range(4):
        x = torch.randn(1, 3, 5, 7, generator=torch.Generator().manual_seed(seed))
        got = np.asarray(codegen.build(graph, "llvm", default_schedules=default_schedules)(x))
        with torch.no_grad():
            exact = graph.module.double()(x.double()).numpy()
            graph.module.float()
        worst = max(worst, float(np.abs(got - exact).max() / np.abs(exact).max()))
    assert worst <= 2e-5, worst
