"""Our CPU schedule rules must actually apply (a rule that raises is silently skipped by the
pipeline, which would leave a slow naive loop nest behind), and must pick sensible vectors."""

import numpy as np
import pytest
from tiers import zoo_sweep
import torch
import tvm
from torch import nn

import codegen
import compiler
from codegen.schedules import WinogradTransformRule
from codegen.schedules.cpu import SpatialReductionRule, largest_divisor_at_most, vector_lanes, vector_width
from codegen.frontend import import_graph
from codegen.relax_pipeline import fusion_passes
from squeezer import zoo
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


@pytest.mark.parametrize("name", zoo_sweep(zoo.ZOO, quick=("depthwise-grouped",)))
def test_spatial_reduction_rule_applies_to_every_conv_and_matmul(name):
    e = zoo.get(name)
    mod, target = fused_module(e.build(), e.example_inputs(batch=2))
    funcs = list(single_reduction_funcs(mod))
    assert funcs, "expected at least one conv/matmul/pool function"
    for fname, func in funcs:
        if any(k in fname for k in ("softmax", "layer_norm", "mean", "max")) and "conv" not in fname and "matmul" not in fname:
            continue  # row reductions are dlight's Reduction rule's job
        if "winograd_input_gemm" in fname:   # the Winograd rule's, which the generic rule declines (its producer is no epilogue)
            assert WinogradTransformRule().apply(func, target, False) is not None, fname
            assert SpatialReductionRule().apply(func, target, False) is None, fname
            continue
        assert SpatialReductionRule().apply(func, target, False) is not None, fname


def _vector_extents(func):
    found = []

    def visit(loop):
        if loop.kind == tvm.tirx.ForKind.VECTORIZED:
            found.append(int(loop.extent))

    import tvm_ffi

    tvm_ffi.structural_walk(func.body, [(tvm.tirx.For, visit)])
    return found


def _loop_extents(func, kind):
    found = []

    def visit(loop):
        if loop.kind == kind:
            found.append(int(loop.extent))

    import tvm_ffi

    tvm_ffi.structural_walk(func.body, [(tvm.tirx.For, visit)])
    return found


@pytest.mark.parametrize("rows, zmm_tile, ymm_tile", [(197, 8, 6), (13, 13, 13), (27, 9, 3)])
def test_row_counts_without_a_good_divisor_keep_whole_register_tiles(rows, zmm_tile, ymm_tile):
    """ViT's 197 tokens (a prime) got one-row tiles, re-reading the weight for every row (Linear
    768->3072: 49 ms against 6.7 ms at 196 rows): whole 8-row tiles, the rows padded to a multiple of
    8 where the block is an einsum (a predicated last tile where it is not). On AVX-512, 13 or 27 rows
    take a wider tile that divides them (13, 9 accumulators) instead of padding 23 % / 19 % more rows;
    AVX2's 16 registers: 6-row tiles of two vectors, 13 rows of one, 27 as 3s of two."""
    from codegen.schedules.vector_unit import vector_registers

    lin = nn.Linear(64, 48).eval()
    x = torch.randn(rows, 64)
    mod, target = fused_module(lin, (x,))
    tile = zmm_tile if vector_registers(target) >= 32 else ymm_tile
    ((_, func),) = list(single_reduction_funcs(mod))
    sch = SpatialReductionRule().apply(func, target, False)
    assert tile in _loop_extents(sch.mod["main"], tvm.tirx.ForKind.UNROLLED)
    np.testing.assert_allclose(codegen.build(compiler.trace(lin, (x,)))(x), lin(x).detach().numpy(), atol=1e-5)


class Attention(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.125, dim=-1) @ v


@pytest.mark.parametrize("tokens", [197, 53])
def test_activation_matmul_with_prime_or_odd_columns_is_padded_to_whole_vectors(tokens):
    """Q@Kᵀ over ViT's 197 tokens has 197 output columns (a prime, and both operands are
    activations, so no constant can be padded): its iteration domain is padded to whole vectors
    (pad_einsum) instead of running scalar (4.2 -> 0.85 ms per call on znver4); same result."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, tokens, 64) for _ in range(3))
    mod, target = fused_module(Attention(), (q, k, v))
    scores = [f for n, f in single_reduction_funcs(mod) if "matmul" in n
              and [int(d) for d in f.params[-1].ty.shape][-2:] == [tokens, tokens]]
    assert scores
    for func in scores:
        sch = SpatialReductionRule().apply(func, target, False)
        assert sch is not None and min(_vector_extents(sch.mod["main"]), default=1) >= 8
    got = codegen.build(compiler.trace(Attention(), (q, k, v)))(q, k, v)
    ref = Attention()(q, k, v).numpy()
    assert np.abs(np.asarray(got) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_short_reductions_unroll_only_when_reads_are_contiguous_along_the_vector():
    """A depthwise window (NHWC: every read contiguous in channels) is unrolled whole; an NCHW
    global pool reduces along the contiguous axis and vectorizes across channels with strided
    gathers: unrolled, ConvNeXt's 7x7x768 mean took LLVM minutes to compile."""
    dw = nn.Conv2d(32, 32, 3, padding=1, groups=32).eval()
    mod, target = fused_module(dw, (torch.randn(1, 32, 16, 16),))
    ((_, func),) = [(n, f) for n, f in single_reduction_funcs(mod) if "conv" in n]
    assert 3 in _loop_extents(SpatialReductionRule().apply(func, target, False).mod["main"], tvm.tirx.ForKind.UNROLLED)
    pool = nn.AdaptiveAvgPool2d(1).eval()
    mod, target = fused_module(pool, (torch.randn(1, 768, 7, 7),))
    ((_, func),) = list(single_reduction_funcs(mod))
    sch = SpatialReductionRule().apply(func, target, False)
    assert 7 not in _loop_extents(sch.mod["main"], tvm.tirx.ForKind.UNROLLED)


@pytest.mark.parametrize("k, stride, hw, groups", [(3, 1, 28, 32), (3, 2, 29, 32), (5, 1, 20, 32), (3, 1, 7, 32),
                                                   (3, 1, 28, 2), (3, 2, 28, 2), (7, 1, 28, 32), (5, 1, 28, 2)])
def test_depthwise_padding_is_made_per_output_row(k, stride, hw, groups):
    """A depthwise or grouped 3x3 conv's (a depthwise 5x5's) zero padding is made inside the
    parallel loop over (bands of) output rows, just before the window reads it (a whole padded
    copy of a 112x112x96 activation went to memory and back; regnet's 16-channel groups ran 12 %
    slower at batch 16); a depthwise window whose padded image fits a band's buffer is padded per
    block of channels, on any map; a grouped conv with fewer than MIN_PAD_ROWS output rows, or a
    grouped 5x5, stays one pass. Same result either way."""
    from codegen.schedules.cpu import MIN_PAD_ROWS

    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(32, 32, k, stride=stride, padding=k // 2, groups=groups), nn.ReLU6()).eval()
    x = torch.randn(1, 32, hw, hw)
    mod, target = fused_module(conv, (x,))
    ((_, func),) = [(n, f) for n, f in single_reduction_funcs(mod) if "conv" in n]
    body = SpatialReductionRule().apply(func, target, False).mod["main"].body.block.body
    top_level = [s for s in (body.seq if hasattr(body, "seq") else [body])]
    per_row = groups == 32 or (hw + stride - 1) // stride >= MIN_PAD_ROWS and k == 3
    assert len(top_level) == (1 if per_row else 2), "padding is a pass of its own" if per_row else "expected one"
    got = codegen.build(compiler.trace(conv, (x,)))(x)
    np.testing.assert_allclose(got, conv(x).detach().numpy(), atol=1e-5)


def test_pad_band_keeps_enough_bands_and_a_bounded_buffer(monkeypatch):
    """Bands of output rows: the largest divisor of the height leaving MIN_PAD_ROWS bands (two per
    core where there are more cores) and a band buffer within PAD_BAND_BYTES; one row where no
    larger band qualifies."""
    from codegen.schedules import pad_rows
    from codegen.schedules.pad_rows import PAD_BAND_BYTES, PaddedInput, pad_band

    monkeypatch.setattr(pad_rows, "available_cores", lambda: 2)
    f32 = 4
    assert pad_band(56, 1, PaddedInput((1, 58, 58, 144), f32)) == 4        # 14 bands of 4 rows
    assert pad_band(112, 1, PaddedInput((1, 114, 114, 32), f32)) == 8
    assert pad_band(56, 1, PaddedInput((1, 114, 114, 96), f32)) == 4       # stride 2: 10 input rows a band
    assert pad_band(14, 1, PaddedInput((1, 16, 16, 384), f32)) == 1        # 14 rows: one each
    assert pad_band(13, 1, PaddedInput((1, 15, 15, 64), f32)) == 1         # a prime height
    assert pad_band(56, 16, PaddedInput((16, 58, 58, 144), f32)) == 28     # batch 16: bounded by the buffer
    assert (28 + 2) * f32 * 58 * 144 <= PAD_BAND_BYTES < (56 + 2) * f32 * 58 * 144
    assert pad_band(56, 16, PaddedInput((16, 58, 58, 144), 1)) == 56       # int8: four times the rows fit
    assert pad_band(28, 1, PaddedInput((1, 30, 30), f32)) == 1             # not NHWC: one row
    monkeypatch.setattr(pad_rows, "available_cores", lambda: 16)
    assert pad_band(112, 1, PaddedInput((1, 114, 114, 32), f32)) == 2      # 56 bands for 16 cores


@pytest.mark.parametrize("hw, stride, k, groups, batch", [(56, 1, 3, 32, 1), (56, 2, 3, 32, 1), (30, 1, 3, 32, 1),
                                                          (56, 1, 5, 32, 1), (28, 1, 3, 32, 2), (56, 1, 3, 2, 1)])
def test_depthwise_padding_bands_hold_several_rows_and_match_torch(hw, stride, k, groups, batch, monkeypatch):
    """A depthwise (or grouped) conv on a large map pads bands of several output rows, each input
    row copied about once rather than k times; the result is the same as torch's."""
    from codegen.schedules import pad_rows

    monkeypatch.setattr(pad_rows, "available_cores", lambda: 2)
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(32, 32, k, stride=stride, padding=k // 2, groups=groups), nn.ReLU6()).eval()
    x = torch.randn(batch, 32, hw, hw)
    mod, target = fused_module(conv, (x,))
    ((_, func),) = [(n, f) for n, f in single_reduction_funcs(mod) if "conv" in n]
    sch = SpatialReductionRule().apply(func, target, False)
    (parallel,) = _loop_extents(sch.mod["main"], tvm.tirx.ForKind.PARALLEL)
    rows = batch * ((hw + stride - 1) // stride)
    lanes = vector_lanes(target)   # the bands may share the parallel loop with blocks of channels
    blocks = [b for b in (1, 32 // vector_width(32, lanes, 2 * lanes)) if parallel % b == 0]
    assert any(parallel // b < rows and rows % (parallel // b) == 0 for b in blocks), (parallel, rows)
    got = codegen.build(compiler.trace(conv, (x,)))(x)
    np.testing.assert_allclose(got, conv(x).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("channels, hw, k, stride, batch", [(704, 7, 5, 1, 1), (672, 14, 3, 1, 1), (416, 14, 5, 2, 1),
                                                            (96, 7, 3, 1, 1), (88, 9, 3, 1, 2), (240, 28, 5, 1, 1)])
def test_small_map_depthwise_pads_per_channel_block_and_matches_torch(channels, hw, k, stride, batch, monkeypatch):
    """A depthwise window over a small map (late stages) pads and sweeps each block of channels in
    its own parallel task: no separate padded copy, and tasks enough to share without one-row
    bands (7x7x704: 22 blocks); with few blocks (96 channels at 7x7) the rows are split too."""
    from codegen.schedules import pad_rows

    monkeypatch.setattr(pad_rows, "available_cores", lambda: 2)
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(channels, channels, k, stride=stride, padding=k // 2, groups=channels),
                         nn.SiLU()).eval()
    x = torch.randn(batch, channels, hw, hw)
    mod, target = fused_module(conv, (x,))
    ((_, func),) = [(n, f) for n, f in single_reduction_funcs(mod) if "conv" in n]
    sched = SpatialReductionRule().apply(func, target, False).mod["main"]
    body = sched.body.block.body
    assert not hasattr(body, "seq") or len(body.seq) == 1, "padding is a pass of its own"
    (parallel,) = _loop_extents(sched, tvm.tirx.ForKind.PARALLEL)
    assert parallel >= pad_rows.MIN_PAD_ROWS, parallel   # tasks to share
    if channels >= 32 * pad_rows.MIN_PAD_ROWS:   # blocks enough: whole maps, no bands
        lanes = vector_lanes(target)   # blocks of one or two vectors
        assert parallel in (batch * channels // (2 * lanes), batch * channels // lanes), parallel
    got = codegen.build(compiler.trace(conv, (x,)))(x)
    np.testing.assert_allclose(got, conv(x).detach().numpy(), atol=1e-5, rtol=1e-5)


def test_a_conv_whose_width_has_no_good_divisor_matches_torch():
    conv = nn.Conv2d(16, 32, 3, padding=1).eval()
    x = torch.randn(1, 16, 13, 13)   # SqueezeNet's last stage: 13 columns, a prime
    np.testing.assert_allclose(codegen.build(compiler.trace(conv, (x,)))(x), conv(x).detach().numpy(), atol=1e-4)


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


def test_tile_plan_takes_one_vector_per_row_where_only_that_divides_the_rows():
    from codegen.schedules.cpu import tile_plan

    # AVX-512: 16 lanes, 32 registers (AVX2's tiles: tests/test_vector_unit.py)
    assert tile_plan(27, 128, 16, registers=32) == (16, 9)      # squeezenet's 27x27 maps: no padded rows
    assert tile_plan(56, 128, 16, registers=32) == (32, 8)      # two vectors where a row tile divides
    assert tile_plan(197, 768, 16, registers=32) == (32, None)  # ViT's prime token count: padded rows
    assert tile_plan(1, 1000, 16, registers=32)[1] is None


def test_largest_divisor():
    assert largest_divisor_at_most(24, 16) == 12
    assert largest_divisor_at_most(7, 16) == 7
    assert largest_divisor_at_most(13, 8) == 1


def test_padded_width_only_for_widths_without_a_vector_divisor():
    from codegen.pad_columns import padded_width

    assert padded_width(53, 16) == 64 and padded_width(75, 16) == 80   # prime; only 15-lane vectors
    assert all(padded_width(n, 16) is None for n in (10, 16, 24, 40, 48, 64))
    assert padded_width(120, 16) == 128 and padded_width(1000, 16) == 1008   # half vectors, < 1/8 more work


@pytest.mark.parametrize("layer, shape", [(nn.Linear(75, 53), (3, 75)),
                                          (nn.Conv2d(64, 53, 1), (1, 64, 13, 13)),
                                          (nn.Linear(64, 53), (1, 13, 64)),
                                          pytest.param(nn.Linear(40, 75), (1, 40), marks=pytest.mark.slow),
                                          pytest.param(nn.Conv2d(8, 53, 3, padding=1), (2, 8, 9, 9),
                                                       marks=pytest.mark.slow)])
def test_odd_output_widths_run_on_padded_weights_with_the_same_result(layer, shape):
    """53 or 75 outputs: the constant weight is zero-padded to whole vectors and the extra columns
    sliced off (scalar code otherwise: 6.7x slower for a 32->53 conv); the result must not change.
    With 13 rows the domain is also padded to whole row tiles, and the slice must stay a copy of
    its own: folded into the padded result's copy it wrote 64 columns into the 53 (wrong output)."""
    torch.manual_seed(0)
    model = nn.Sequential(layer, nn.ReLU()).eval()
    x = torch.randn(*shape)
    mod, _ = fused_module(model, (x,))
    assert any("strided_slice" in gv.name_hint for gv in mod.functions), "expected the padded kernel + slice"
    g = compiler.trace(model, (x,))
    np.testing.assert_allclose(codegen.build(g)(x), g.run_example().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cin, cout, hw", [(16, 72, 14), (24, 64, 14), (32, 128, 27)])
def test_a_pointwise_conv_is_one_pass_over_memory(cin, cout, hw):
    """A 1x1 conv's input is read where it lies (its no-op padding is no copy), the bias/ReLU
    epilogue of a column-padded one (72 outputs on 80 padded) runs per register tile, and 27-wide
    rows take a 9-row tile instead of a padded copy: one parallel loop nest, no full-size copy
    stored and re-read (mobilenet_v3_small at batch 16 ran 18 % slower with them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(cin, cout, 1), nn.ReLU()).eval()
    x = (torch.randn(2, cin, hw, hw),)
    funcs = [f for gv, f in _scheduled(model, x).functions.items()
             if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in gv.name_hint and "weight_prepack" not in gv.name_hint]
    assert len(funcs) == 1
    assert len(_loop_extents(funcs[0], tvm.tirx.ForKind.PARALLEL)) == 1, funcs[0].script()
    assert "pad_temp" not in funcs[0].script()
    got = codegen.build(compiler.trace(model, x), "llvm")(*x)
    np.testing.assert_allclose(got, model(*x).detach().numpy(), rtol=1e-5, atol=1e-5)


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int = 480, squeezed: int = 20) -> None:
        super().__init__()
        self.stem = nn.Conv2d(16, channels, 1)   # puts the feature map in the kernels' NHWC layout
        self.reduce, self.expand = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1)

    def forward(self, x):
        x = self.stem(x)
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


def test_a_squeeze_excite_gate_is_applied_in_parallel():
    """The gate's broadcast multiply over the feature map is larger than the small 1x1 conv that
    makes the gate: it keeps its own parallel loop nest instead of running under the conv's serial
    tile loop (efficientnet_b0's SE blocks took 15x longer on one thread)."""
    torch.manual_seed(0)
    model = _SqueezeExcite().eval()
    x = (torch.randn(1, 16, 14, 14),)
    funcs = [f for gv, f in _scheduled(model, x).functions.items()
             if isinstance(f, tvm.tirx.PrimFunc) and "multiply" in gv.name_hint and "weight_prepack" not in gv.name_hint]
    assert len(funcs) == 1
    assert _loop_extents(funcs[0], tvm.tirx.ForKind.PARALLEL), funcs[0].script()
    got = codegen.build(compiler.trace(model, x), "llvm")(*x)
    np.testing.assert_allclose(got, model(*x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_widths_that_vectorize_are_left_alone():
    mod, _ = fused_module(nn.Sequential(nn.Linear(40, 48), nn.ReLU()).eval(), (torch.randn(1, 40),))
    assert not any("strided_slice" in gv.name_hint for gv in mod.functions)


@pytest.mark.parametrize("layer, shape", [
    (nn.Linear(1, 3), (1, 1)),                           # the case: bias was added twice
    pytest.param(nn.Linear(1, 300), (64, 1), marks=pytest.mark.slow),      # large enough to run parallel
    pytest.param(nn.Conv2d(1, 4, 1), (1, 1, 5, 5), marks=pytest.mark.slow),
    pytest.param(nn.Conv2d(1, 40, 1), (2, 1, 30, 30), marks=pytest.mark.slow),
    (nn.Sequential(nn.Linear(1, 3), nn.ReLU()), (4, 1)),  # bias and activation epilogue
])
def test_a_reduction_of_length_one_is_still_a_reduction(layer, shape):
    """A Linear or conv with one input feature has a reduction of length 1; normalized, its block
    looks injective but keeps its init, and an epilogue inlined into it ran in the init and in the
    update (the bias added twice). Our rules must schedule it as a reduction."""
    torch.manual_seed(0)
    layer = layer.eval()
    x = torch.randn(shape)
    with torch.no_grad():
        expected = layer(x).numpy()
    for default_schedules in (True, False):
        got = codegen.build(compiler.trace(layer, (x,)), "llvm", default_schedules=default_schedules)(x)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_low_rank_at_rank_one_compiles_exactly():
    """Low-rank splitting at rank 1 creates layers with one input feature (the issue's mlp case:
    the compiled error was as large as the output)."""
    from passes import LowRankSplit

    entry = zoo.get("mlp")
    x = entry.example_inputs(batch=2)
    split = LowRankSplit(rank=1)(compiler.trace(entry.build(), x))
    with torch.no_grad():
        expected = split.module(*x).numpy()
    np.testing.assert_allclose(codegen.build(split, "llvm")(*x), expected, rtol=1e-4, atol=1e-5)


def _scheduled(model, x):
    from codegen.options import BuildOptions
    from codegen.relax_pipeline import scheduled_module

    options = BuildOptions.create("llvm")
    return scheduled_module(import_graph(compiler.trace(model, x))[0], options)


def test_constant_weights_are_prepacked_once_at_build_time():
    """Conv and Linear weights read along the vector axis are stored blocked ([N/jf, ..., jf]) so a
    register tile streams one contiguous run of them; the repacking is folded into the constant,
    so no kernel of ``main`` repacks at run time, and the result is the same."""
    from codegen.relax_pipeline import kernel_calls

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 1), nn.Flatten(),
                          nn.Linear(64 * 6 * 6, 96)).eval()
    x = (torch.randn(1, 16, 6, 6),)
    calls = kernel_calls(_scheduled(model, x))
    assert sum(name.endswith("_prepacked") for name in calls) == 3, calls
    assert not any("preproc" in name or "layout" in name for name in calls), calls
    got = codegen.build(compiler.trace(model, x), "llvm")(*x)
    ref = model(*x).detach().numpy()
    assert np.abs(np.asarray(got) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_runtime_weights_are_not_repacked_per_call():
    """Weights that are module parameters (encoded compressed layers, decoded at load) are not
    layout-free: prepacking them would repack on every call."""
    from codegen.relax_pipeline import kernel_calls
    from codegen.frontend import lift_runtime_weights
    from codegen.lowering.context import RuntimeWeights
    from codegen.options import BuildOptions
    from codegen.relax_pipeline import scheduled_module
    from passes.sparsity import Sparsify

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).eval()
    x = (torch.randn(4, 64),)
    g = Sparsify(sparsity=0.9)(compiler.trace(model, x))
    options = BuildOptions.create("llvm", sparse_kernels="dense")
    store = RuntimeWeights()
    mod = lift_runtime_weights(import_graph(g, options, store)[0], store)[0]
    calls = kernel_calls(scheduled_module(mod, options))
    assert not any("preproc" in name or "layout" in name for name in calls), calls
    compiled = codegen.build(g, "llvm", sparse_kernels="dense")
    np.testing.assert_allclose(compiled(*x), g.run_example().numpy(), atol=1e-4)


def _rule_schedule(model, x):
    mod, target = fused_module(model.eval(), (x,))
    ((_, func),) = [(n, f) for n, f in single_reduction_funcs(mod) if "conv" in n]
    return SpatialReductionRule().apply(func, target, False), target


def _block(sch, suffix):
    import re

    (name,) = [n for n in re.findall(r'T\.sblock\("([^"]+)"\)', sch.mod["main"].script()) if n.endswith(suffix)]
    return sch.get_sblock(name)


@pytest.mark.parametrize("k, stride, hw, groups", [(3, 1, 28, 144), (3, 2, 28, 144), (3, 1, 7, 1), (1, 1, 14, 1)])
def test_accumulators_and_row_padding_fit_in_registers(k, stride, hw, groups):
    """A register tile's accumulators are zeroed inside the loop over tiles, not for a whole output
    row before it (with the per-row padding, a depthwise conv's accumulators were a 28x144 array in
    memory); the per-row zero padding is vectorized one register at a time (a 144-lane select around
    a load was scalarized: mobilenet_v2's 56x56x144 depthwise ran at 5 % of peak)."""
    conv = nn.Conv2d(144, 144, k, stride=stride, padding=k // 2, groups=groups)
    sch, target = _rule_schedule(conv, torch.randn(1, 144, hw, hw))
    init, update = _block(sch, "_init"), _block(sch, "_update")
    update_loops = sch.get_loops(update)
    kinds = [iv.iter_type for iv in sch.get(update).iter_vars]
    first_reduction = next(k for k, kind in enumerate(kinds) if kind == tvm.tirx.IterVar.CommReduce)
    tile_loops = len(update_loops) - sum(kind == tvm.tirx.IterVar.CommReduce for kind in kinds) - 2
    assert first_reduction >= 0 and tile_loops >= 1
    init_loops = sch.get_loops(init)
    assert len(init_loops) == tile_loops + 2, "the accumulators are zeroed per register tile"
    assert all(sch.get(a).same_as(sch.get(b)) for a, b in zip(init_loops[:tile_loops], update_loops[:tile_loops]))
    assert max(_vector_extents(sch.mod["main"])) <= 2 * vector_lanes(target)


@pytest.mark.parametrize("cin, cout, stride, hw", [(512, 512, 1, 7), (256, 256, 2, 28)])
def test_a_conv_with_a_large_weight_sweeps_each_weight_panel_once(cin, cout, stride, hw):
    """resnet's last 3x3 convs (512 channels on 7x7 maps: 9.4 MB of weight, 0.1 MB of input) and
    resnet50's stride-2 256-channel one (2.4 MB, more than a core's L2) take the weight's column
    tiles outermost, so each thread reads its part of the weight once; rows outermost (their window
    padding made per output row) re-read the whole weight per row: half ONNX Runtime's speed on
    the first, 30 % slower on the second."""
    import re

    mod = _scheduled(nn.Conv2d(cin, cout, 3, stride=stride, padding=1).eval(), (torch.randn(1, cin, hw, hw),))
    (script,) = [f.script() for gv, f in mod.functions.items() if "conv2d" in gv.name_hint and gv.name_hint.endswith("_prepacked")]
    update = script[script.index('T.sblock("conv2d_nhwc_update")'):]
    channel = re.search(rf"v3 = T\.axis\.spatial\(T\.int64\({cout}\), (.*)\)\n", update).group(1)
    # the parallel loop's slow part is the channel tile (rows inside it), not its fast part
    assert re.match(r"\w+ // T\.int64\((\d+)\) \* T\.int64\(\d+\)", channel), channel


def _kernel_script(model, x, kind):
    mod = _scheduled(model.eval(), x)
    (script,) = [f.script() for gv, f in mod.functions.items() if kind in gv.name_hint and "prepacked" in gv.name_hint]
    return script


@pytest.mark.parametrize("layer, shape, prefetches", [
    (nn.Linear(2048, 512), (49, 2048), True),               # resnet50's 7x7 stage as a matmul: 4 MB of weight
    (nn.Conv2d(512, 512, 3, padding=1), (1, 512, 7, 7), True),  # resnet's last 3x3 convs: 9.4 MB
    (nn.Linear(256, 256), (49, 256), False),                # 0.25 MB: stays in cache, nothing to hide
])
def test_weight_outer_kernels_prefetch_the_next_weight_panel(layer, shape, prefetches):
    """A kernel that sweeps each weight panel over its row tiles prefetches the next panel while it
    computes (codegen/schedules/weight_prefetch.py), only where the weight is large, and the
    chunked reduction computes the same result."""
    torch.manual_seed(0)
    x = (torch.randn(*shape),)
    kind = "conv2d" if isinstance(layer, nn.Conv2d) else "matmul"
    assert ("llvm.prefetch" in _kernel_script(layer, x, kind)) == prefetches
    ref = layer(*x).detach().numpy()
    got = np.asarray(codegen.build(compiler.trace(layer.eval(), x), "llvm")(*x))
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_a_classifier_gemv_runs_on_every_core():
    """1000 outputs are few, but each reduces 1280 inputs from 5 MB of weight: the GEMV is split
    between threads (on one core it streamed the weight at half the memory bandwidth)."""
    torch.manual_seed(0)
    layer, x = nn.Linear(1280, 1000), (torch.randn(1, 1280),)
    script = _kernel_script(layer, x, "matmul")
    assert "T.parallel(" in script
    np.testing.assert_allclose(codegen.build(compiler.trace(layer.eval(), x), "llvm")(*x),
                               layer(*x).detach().numpy(), rtol=1e-4, atol=1e-5)
