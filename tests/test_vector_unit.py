"""The CPU schedules size their vectors and register tiles from the target's own features: an
AVX2 CPU has 8-lane ymm registers and 16 of them, not AVX-512's 32 zmm (TVM 0.27's
``llvm_get_vector_width`` says 512 for every x86 CPU, and the tiles built on it spilled every
accumulator: resnet18 ran 1.6x slower on an AVX2 machine)."""

import math
import re

import numpy as np
import pytest
import torch
import tvm
from torch import nn

import codegen
import compiler
from codegen.schedules.cpu import tile_plan
from codegen.schedules.vector_unit import vector_lanes, vector_registers


@pytest.mark.parametrize("spec, lanes, registers", [
    ({"kind": "llvm", "mcpu": "skylake-avx512"}, 16, 32),
    ({"kind": "llvm", "mcpu": "znver4"}, 16, 32),
    ({"kind": "llvm", "mcpu": "haswell"}, 8, 16),
    ({"kind": "llvm", "mcpu": "znver3"}, 8, 16),
    ({"kind": "llvm", "mcpu": "x86-64"}, 4, 16),   # SSE2 only
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-n1"}, 4, 32),
])
def test_the_vector_unit_follows_the_target_features(spec, lanes, registers):
    target = tvm.target.Target(spec)
    assert vector_lanes(target) == lanes
    assert vector_registers(target) == registers


@pytest.mark.parametrize("lanes, registers", [(16, 32), (8, 16), (4, 16)])
def test_register_tiles_fit_the_register_file(lanes, registers):
    """Every tile's accumulators, its weight vectors and one broadcast input fit in the registers."""
    for rows in range(1, 230):
        for ext in (4, 8, 16, 24, 32, 48, 64, 72, 128, 768, 1000):
            jf, rf = tile_plan(rows, ext, lanes, registers=registers)
            vectors = math.ceil(jf / lanes)
            assert (rf or 1) * vectors + vectors + 1 <= registers, (rows, ext, jf, rf)


def test_avx2_tiles_take_two_vectors_and_six_rows():
    assert tile_plan(60, 128, 8, registers=16) == (16, 6)
    assert tile_plan(56, 128, 8, registers=16) == (16, 4)   # no 6 divides 56: 4 rows of two vectors
    assert tile_plan(56, 8, 8, registers=16) == (8, 8)       # one vector a row: up to 12 rows
    assert tile_plan(197, 768, 8, registers=16) == (16, None)   # a prime: padded to whole tiles


def test_a_group_of_two_vectors_is_one_tile_and_vectors_stay_inside_groups():
    """RegNet's 16-channel groups: two ymm vectors a tile on AVX2 (each broadcast input serves
    both), one zmm on AVX-512; 8-channel and 24-channel groups keep vectors inside a group."""
    assert tile_plan(56, 400, 8, 16, registers=16) == (16, 4)
    assert tile_plan(49, 400, 16, 16, registers=32)[0] == 16
    assert tile_plan(49, 256, 8, 8, registers=16)[0] == 8
    assert 24 % tile_plan(49, 240, 8, 24, registers=16)[0] == 0
    for lanes, registers in ((16, 32), (8, 16), (4, 16)):
        for group in (2, 4, 8, 12, 16, 24, 32, 48, 64):
            jf, rf = tile_plan(56, 4 * group, lanes, group, registers=registers)
            assert group % jf == 0 and (rf or 1) * -(-jf // lanes) + -(-jf // lanes) + 1 <= registers, (lanes, group)


@pytest.mark.parametrize("groups", [25, 10, 4])
def test_an_avx2_grouped_conv_matches_torch(groups):
    """16 and 40 channels a group (two vectors a tile, and two of eight lanes), 100 (the group's
    gcd with the width)."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(400, 400, 3, padding=1, groups=groups), nn.ReLU()).eval()
    x = torch.randn(1, 400, 7, 7)
    built = codegen.build(compiler.trace(conv, (x,)), target={"kind": "llvm", "mcpu": "haswell"})
    with torch.no_grad():
        ref = conv(x).numpy()
    np.testing.assert_allclose(built(x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _avx2_conv_asm_and_output(x):
    conv = nn.Conv2d(64, 64, 1).eval()
    built = codegen.build(compiler.trace(conv, (x,)), target={"kind": "llvm", "mcpu": "haswell"})
    with torch.no_grad():
        ref = conv(x).numpy()
    return built.library.mod.imports[0].inspect_source("asm"), built, ref


def test_an_avx2_build_keeps_its_accumulators_in_registers():
    """A 1x1 conv built for an AVX2 CPU moves (almost) no ymm register to or from the stack; tiled
    for AVX-512 it did so 76 times (every accumulator spilled and reloaded in the FMA loop)."""
    x = torch.randn(1, 64, 56, 56)
    asm, built, ref = _avx2_conv_asm_and_output(x)
    fmas = [line for line in asm.splitlines() if "vfmadd" in line and "ymm" in line]
    stack = [line for line in asm.splitlines() if re.search(r"vmov\w*\s.*\(%rsp\).*ymm|vmov\w*\s.*ymm.*\(%rsp\)", line)]
    assert fmas, "the conv's FMAs are ymm FMAs"
    assert len(stack) <= 4, stack
    if tvm.target.codegen.target_has_features("avx2", codegen.resolve_target("llvm")):   # runs here
        np.testing.assert_allclose(built(x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
