"""Winograd F(m, 3) convolutions (codegen/winograd.py, Lavin & Gray 2016): the transforms compute
the same correlation as the direct convolution (exactly, in float64), the compiled models that take
the Winograd path match torch within the 1e-4 relative contract, and convolutions it does not fit
(or where it would be slower) keep the direct lowering."""

import numpy as np
import pytest
import torch
from torch import nn

import codegen
import compiler
from codegen import winograd
from codegen.frontend import import_graph
from codegen.options import BuildOptions
from codegen.relax_pipeline import kernel_calls, scheduled_module


def _kernels(model, x, **options):
    mod = scheduled_module(import_graph(compiler.trace(model, x))[0], BuildOptions.create("llvm", **options))
    return kernel_calls(mod)


def _winograd_calls(model, x, **options) -> int:
    return sum(n for name, n in _kernels(model, x, **options).items() if "winograd" in name)


def _assert_matches_torch(model, x):
    compiled = codegen.build(compiler.trace(model, (x,)), "llvm")
    with torch.no_grad():
        ref = model(x).numpy()
    got = np.asarray(compiled(x))
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), np.abs(got - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("m", [2, 4])
def test_transforms_reproduce_the_3x3_correlation_exactly(m):
    """Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A is the m×m valid correlation of the (m+2)² tile d with g: the
    identity the algorithm rests on, to float64 rounding."""
    a, b, g = winograd.matrices(m)
    rng = np.random.default_rng(m)
    d, w = rng.standard_normal((m + 2, m + 2)), rng.standard_normal((3, 3))
    y = a.T @ ((g @ w @ g.T) * (b.T @ d @ b)) @ a
    ref = np.array([[np.sum(d[i:i + 3, j:j + 3] * w) for j in range(m)] for i in range(m)])
    assert np.abs(y - ref).max() < 1e-12


def test_weight_transform_matches_the_per_channel_matrix_form():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 3, 5, 7)).astype(np.float32)
    u = winograd.transform_weight(w, 4)
    _, _, g = winograd.matrices(4)
    assert u.shape == (36, 5, 7) and u.dtype == np.float32
    one = g @ w[:, :, 2, 3].astype(np.float64) @ g.T
    assert np.allclose(u[:, 2, 3], one.reshape(-1), rtol=1e-6, atol=1e-6)


class ResidualBlock(nn.Module):
    """resnet's basic block: the output transform carries BN's bias, ReLU and the residual add."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


def _randomize_bn(model):
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("shape, cin, cout, pad", [
    ((1, 32, 24, 24), 32, 48, 1),    # F(4,3), tiles divide the output
    ((2, 16, 13, 17), 16, 32, 1),    # partial last tiles, non-square, batch 2
    ((1, 24, 30, 30), 24, 16, 0),    # no padding: 28x28 output
    ((1, 64, 14, 14), 64, 64, 1),    # too few 4x4 tiles: F(2,3)
    ((1, 16, 4, 148), 16, 24, 1),    # 37 tiles, a prime: blocks of 8, the last one partial
    ((1, 192, 16, 16), 192, 192, 1),  # a 2.4 MB transformed weight: transform and GEMM apart
])
def test_winograd_convs_match_torch(shape, cin, cout, pad):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=pad), nn.ReLU()).eval()
    x = torch.randn(*shape)
    out_h, out_w = (d + 2 * pad - 2 for d in shape[2:])
    alpha = winograd.choose_tile(shape[0], out_h, out_w, cin, cout) + 2
    fused = winograd.fuses_input(alpha * alpha * cin * cout * 4)
    assert fused == (cin < 192)
    assert _winograd_calls(model, (x,)) == (2 if fused else 3), "expected the Winograd path for this conv"
    _assert_matches_torch(model, x)


@pytest.mark.parametrize("tiles_h, tiles_w, zmm_rows, ymm_rows", [(14, 14, 7, 4), (1, 37, 8, 6)])
def test_transformed_input_is_made_per_block_of_tiles(tiles_h, tiles_w, zmm_rows, ymm_rows):
    """The input transform runs inside the GEMM's loop over blocks of tiles, into a buffer of one
    block (what keeps it in cache), not into a whole-image V the GEMM reads back. A block is the
    GEMM's register tile: 8 rows (7 dividing 196 tiles) of AVX-512's 32 registers, 6 (4 dividing
    196) of AVX2's 16; a prime count's last block is partial."""
    import tvm
    import tvm_ffi
    from tvm import s_tir, te

    from codegen.schedules import WinogradTransformRule
    from codegen.schedules.vector_unit import vector_registers
    from codegen.target import host_cpu_target

    c, k, m = 32, 48, 4
    x = te.placeholder((1, tiles_h * m, tiles_w * m, c), name="x")
    u = te.placeholder((36, c, k), name="u")
    func = te.create_prim_func([x, u, winograd.input_gemm(x, u, m, [0, 1, 1, 0], [0, 1, 1, 0], tiles_h, tiles_w)])
    target = host_cpu_target()
    rows = zmm_rows if vector_registers(target) >= 32 else ymm_rows
    sch = WinogradTransformRule().apply(func, target, False)
    assert isinstance(sch, s_tir.Schedule)
    compacted = tvm.transform.Sequential([   # buffers shrink to the region each loop needs
        s_tir.transform.LowerInitBlock(), s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(), s_tir.transform.CompactBufferAllocation()])(sch.mod)
    shapes = []
    tvm_ffi.structural_walk(compacted["main"].body, [(s_tir.SBlock, lambda n: shapes.extend(
        [int(d) for d in b.shape] for b in n.alloc_buffers))])
    assert [36, rows, c] in shapes, shapes


def test_the_generic_rule_declines_the_fused_input_transform():
    """Should the Winograd rule ever decline, the matmul rule must not take the input transform, a
    producer, for an epilogue: placed under its tile loop it read the padding before it was made
    (wrong results on a 48-channel conv)."""
    from tvm import te

    from codegen.schedules.cpu import SpatialReductionRule
    from codegen.target import host_cpu_target

    x, u = te.placeholder((1, 24, 24, 32), name="x"), te.placeholder((36, 32, 48), name="u")
    func = te.create_prim_func([x, u, winograd.input_gemm(x, u, 4, [0, 1, 1, 0], [0, 1, 1, 0], 6, 6)])
    assert SpatialReductionRule().apply(func, host_cpu_target(), False) is None


def test_residual_block_fuses_its_epilogue_into_the_output_transform():
    torch.manual_seed(0)
    model = _randomize_bn(ResidualBlock(32))
    x = torch.randn(1, 32, 28, 28)
    calls = _kernels(model, (x,))
    outputs = [name for name in calls if "winograd_output" in name]
    assert len(outputs) == 2 and any("add" in name for name in outputs), calls
    assert not [name for name in calls if name.startswith(("add", "relu", "fused_add", "maximum"))], calls
    _assert_matches_torch(model, x)


def test_an_activation_reading_its_input_twice_folds_into_the_output_transform():
    """SiLU is x * sigmoid(x): the bias add feeds two blocks. Folded into the transform's write one
    at a time, the first took the add's result with it and the build failed ("T_add_intermediate is
    used before its definition": every FusedMBConv of torchvision's efficientnet_v2)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1), nn.SiLU()).eval()
    x = torch.randn(1, 24, 28, 28)
    calls = _kernels(model, (x,))
    assert sum(n for name, n in calls.items() if "winograd" in name) == 2, calls
    assert all("winograd" in name or name.startswith("transpose") for name in calls), calls   # no epilogue kernel
    _assert_matches_torch(model, x)


@pytest.mark.parametrize("conv, shape", [
    (nn.Conv2d(32, 32, 3, stride=2, padding=1), (1, 32, 28, 28)),   # strided
    (nn.Conv2d(32, 32, 3, padding=2, dilation=2), (1, 32, 28, 28)),  # dilated
    (nn.Conv2d(32, 32, 3, padding=1, groups=4), (1, 32, 28, 28)),    # grouped
    (nn.Conv2d(32, 32, 5, padding=2), (1, 32, 28, 28)),              # 5x5
    (nn.Conv2d(8, 32, 3, padding=1), (1, 8, 28, 28)),                # too few input channels
    (nn.Conv2d(256, 256, 3, padding=1), (1, 256, 7, 7)),             # 4 tiles: weight-bound
])
def test_convs_winograd_does_not_fit_keep_the_direct_lowering(conv, shape):
    torch.manual_seed(0)
    model = nn.Sequential(conv, nn.ReLU()).eval()
    x = torch.randn(*shape)
    assert _winograd_calls(model, (x,)) == 0
    _assert_matches_torch(model, x)


def test_stock_lowering_baseline_has_no_winograd():
    """default_schedules=False is TVM's own lowering, what tuning alone is measured against."""
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1)).eval()
    x = (torch.randn(1, 32, 24, 24),)
    assert _winograd_calls(model, x) > 0
    assert _winograd_calls(model, x, default_schedules=False) == 0


def test_tile_choice_follows_tiles_per_weight():
    assert winograd.choose_tile(1, 56, 56, 64, 64) == 4
    assert winograd.choose_tile(1, 14, 14, 256, 256) == 2      # 16 tiles of 4x4 are too few
    assert winograd.choose_tile(1, 7, 7, 512, 512) is None     # 16 tiles of 2x2 as well
    assert winograd.choose_tile(16, 7, 7, 512, 512) == 4       # batch 16: 64 tiles
    assert winograd.choose_tile(1, 56, 56, 3, 64) is None
