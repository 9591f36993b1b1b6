"""Integer quantization: the int ops against an independent integer reference, the VNNI (and
generic) kernels against the ops, and the Quantize pass (BatchNorm folding, observers, LSQ, deploy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import codegen
import compiler
from compiler.errors import OptionError, PassError
from compiler.ops import IntConv2d, IntLinear
from passes import FakeQuantConv2d, FakeQuantLinear, Quantize
from passes.quant_observers import RangeObserver, entropy_threshold, scale_and_zero


def _codes_np(x: np.ndarray, scale: float, zero: int, bits: int = 8) -> np.ndarray:
    inv = np.float32(1) / np.float32(scale)
    q = np.rint(x.astype(np.float32) * inv) + zero
    q = np.where(np.isnan(q), zero, q)
    return np.clip(q, 0, 2 ** bits - 1).astype(np.int64)


def _int_conv_np(x, codes, w_scale, bias, x_scale, zero, stride, padding, dilation):
    """The integer conv by patches, int64 throughout (independent of torch's conv)."""
    q = _codes_np(x, x_scale, zero) - zero
    patches = F.unfold(torch.from_numpy(q.astype(np.float64)), codes.shape[2:], dilation, padding, stride).numpy()
    core = np.einsum("nk,bkl->bnl", codes.reshape(codes.shape[0], -1).astype(np.int64), patches.astype(np.int64))
    scale = np.float32(x_scale) * w_scale.astype(np.float32)
    y = core.astype(np.float32) * scale[None, :, None] + bias[None, :, None]
    oh = (x.shape[2] + 2 * padding[0] - dilation[0] * (codes.shape[2] - 1) - 1) // stride[0] + 1
    return y.reshape(x.shape[0], codes.shape[0], oh, -1)


def _layer(kind: str, n: int, c: int, kernel=(3, 3), seed: int = 0, **kw):
    g = torch.Generator().manual_seed(seed)
    shape = (n, c // kw.get("groups", 1), *kernel) if kind == "conv" else (n, c)
    codes = torch.randint(-127, 128, shape, generator=g).to(torch.int8)
    w_scale, bias = torch.rand(n, generator=g) * 0.01 + 1e-3, torch.randn(n, generator=g)
    cls = IntConv2d if kind == "conv" else IntLinear
    return cls(codes, w_scale, bias, x_scale=0.037, x_zero=kw.pop("zero", 97), **kw).eval()


def test_int_ops_equal_an_integer_reference():
    x = torch.randn(2, 5, 9, 11) * 3
    x[0, 1, 2, 3] = float("nan")
    conv = _layer("conv", 7, 5, stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    ref = _int_conv_np(x.numpy(), conv.w_codes.numpy(), conv.w_scale.numpy(), conv.bias.detach().numpy(), 0.037, 97,
                       (2, 1), (1, 2), (1, 2))
    np.testing.assert_allclose(conv(x).detach().numpy(), ref, rtol=1e-6, atol=1e-6)
    lin = _layer("linear", 6, 13)
    xl = torch.randn(4, 13) * 5
    q = _codes_np(xl.numpy(), 0.037, 97) - 97
    core = q @ lin.w_codes.numpy().astype(np.int64).T
    want = core.astype(np.float32) * (np.float32(0.037) * lin.w_scale.numpy()) + lin.bias.detach().numpy()
    np.testing.assert_allclose(lin(xl).detach().numpy(), want, rtol=1e-6, atol=1e-6)


def test_grouped_int_conv_equals_its_groups_as_separate_integer_convs():
    x = torch.randn(2, 6, 9, 8) * 3
    conv = _layer("conv", 9, 6, groups=3, stride=(2, 1), padding=(1, 1))
    parts = []
    for gi in range(3):
        codes = conv.w_codes.numpy()[gi * 3:(gi + 1) * 3]
        parts.append(_int_conv_np(x.numpy()[:, gi * 2:(gi + 1) * 2], codes, conv.w_scale.numpy()[gi * 3:(gi + 1) * 3],
                                  conv.bias.detach().numpy()[gi * 3:(gi + 1) * 3], 0.037, 97, (2, 1), (1, 1), (1, 1)))
    np.testing.assert_allclose(conv(x).detach().numpy(), np.concatenate(parts, 1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="groups=4"):
        _layer("conv", 9, 6, groups=4)


def test_nan_input_quantizes_to_the_zero_point():
    lin = _layer("linear", 5, 8)
    x = torch.randn(1, 8)
    x_nan, x_zero = x.clone(), x.clone()
    x_nan[0, 3], x_zero[0, 3] = float("nan"), 0.0
    assert torch.equal(lin(x_nan), lin(x_zero))


CASES = [   # (kind, batch/rows, in, out, extra)
    ("linear", 1, 64, 16, {}), ("linear", 3, 130, 100, {}), ("linear", 17, 5, 37, {}), ("linear", 9, 256, 64, {}),
    ("conv", 1, 3, 24, dict(kernel=(3, 3), padding=(1, 1), stride=(2, 2))),
    ("conv", 2, 10, 16, dict(kernel=(1, 1))),
    ("conv", 1, 20, 40, dict(kernel=(5, 3), padding=(2, 0), dilation=(1, 2))),
    ("conv", 2, 64, 64, dict(kernel=(3, 3), padding=(1, 1))),
    ("conv", 2, 24, 24, dict(kernel=(3, 3), padding=(1, 1), groups=24)),            # depthwise
    ("conv", 1, 32, 32, dict(kernel=(5, 5), padding=(2, 2), stride=(2, 2), groups=32)),
    ("conv", 2, 12, 8, dict(kernel=(3, 3), padding=(1, 0), groups=4)),              # grouped
    ("conv", 1, 200, 8, dict(kernel=(3, 3), padding=(1, 1), groups=2)),             # int32 sums (900 taps)
]


def _host_has(kernels: str) -> bool:
    from codegen.kernels.amx_kernels import amx_available
    from codegen.kernels.vnni_kernels import vnni_available
    from codegen.options import BuildOptions

    target = BuildOptions.create("llvm").target
    return {"amx": amx_available, "vnni": vnni_available}.get(kernels, lambda t: True)(target)


@pytest.mark.parametrize("kernels", ["amx", "vnni", "generic"])
@pytest.mark.parametrize("kind,rows,c_in,n_out,extra", CASES)
def test_compiled_int_layers_match_the_op(kind, rows, c_in, n_out, extra, kernels):
    if not _host_has(kernels):
        pytest.skip(f"this CPU has no {kernels}")
    extra = dict(extra)
    kernel = extra.pop("kernel", (3, 3)) if kind == "conv" else None
    layer = _layer(kind, n_out, c_in, kernel=kernel, **extra)
    x = torch.randn(rows, c_in, 12, 10) * 2 if kind == "conv" else torch.randn(rows, c_in) * 2
    ref = layer(x).detach().numpy()
    out = codegen.build(compiler.trace(layer, (x,)), "llvm", int_kernels=kernels)(x)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_the_portable_integer_kernel_matches_where_the_cpu_has_no_vnni():
    from codegen.kernels.vnni_kernels import vnni_available
    from codegen.options import BuildOptions

    target = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake", "num-cores": 2}
    assert not vnni_available(BuildOptions.create(target).target)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = _layer("conv", 8, 3, kernel=(3, 3), padding=(1, 1))
            self.fc = _layer("linear", 5, 8 * 6 * 6, seed=1, zero=0)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    net, x = Net().eval(), torch.randn(2, 3, 6, 6)
    ref = net(x).detach().numpy()
    out = codegen.build(compiler.trace(net, (x,)), target)(x)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_bad_integer_layers_are_refused():
    with pytest.raises(ValueError, match="exceed"):
        IntLinear(torch.full((2, 3), 9), torch.ones(2), None, 0.1, 0, w_bits=4)
    with pytest.raises(ValueError, match="x_scale"):
        IntLinear(torch.ones(2, 3), torch.ones(2), None, 0.0, 0)
    with pytest.raises(ValueError, match="x_zero"):
        IntLinear(torch.ones(2, 3), torch.ones(2), None, 0.1, 300)
    with pytest.raises(OptionError):
        Quantize(observer="mse")
    with pytest.raises(OptionError):
        Quantize(w_bits=9)
    net = _net()
    g = compiler.trace(net, (torch.randn(2, 1, 8, 8),))
    with pytest.raises(PassError, match="calibration batch 1"):
        Quantize(calibration=((torch.randn(2, 1, 8, 8), None), (torch.randn(2, 5), None)))(g)
    with pytest.raises(OptionError, match="int_kernels"):
        codegen.build(compiler.trace(nn.Sequential(_layer("linear", 2, 3)), (torch.randn(1, 3),)), int_kernels="avx")


# ---- the pass ------------------------------------------------------------------------------------------
class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(torch.relu(self.dw(x)).flatten(1))


def _net():
    torch.manual_seed(0)
    net = ConvNet()
    for bn in (net.b1, net.b2):   # non-trivial statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    return net.eval()


def test_batchnorm_folding_is_exact_and_calibrated_layers_deploy_exactly():
    net, x = _net(), torch.randn(4, 1, 8, 8)
    g = compiler.trace(net, (x,))
    g.module.requires_grad_(False)
    batches = tuple((torch.randn(8, 1, 8, 8), None) for _ in range(3))
    fq = Quantize(stage="calibrate", calibration=batches)(g)
    mods = dict(fq.module.named_modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in mods.values())
    assert isinstance(mods["c1"], FakeQuantConv2d) and isinstance(mods["fc"], FakeQuantLinear)
    assert isinstance(mods["dw"], FakeQuantConv2d) and mods["dw"].groups == 16   # depthwise quantized too
    with pytest.raises(OptionError, match="layers/exclude"):   # a typo in a pattern names the option
        Quantize(layers=("c9*",))(g)
    deployed = Quantize(stage="deploy")(fq)
    assert isinstance(dict(deployed.module.named_modules())["c2"], IntConv2d)
    assert torch.equal(fq.module(x), deployed.module(x))     # the fake layer computes the integer op
    ref = g.module(x)
    with torch.no_grad():
        assert float((deployed.module(x) - ref).abs().max() / ref.abs().max()) < 0.05   # 8 bits: a few % at most
    out = codegen.build(deployed, "llvm")(x)
    np.testing.assert_allclose(out, deployed.module(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_folding_alone_preserves_the_model():
    from compiler.pass_infra import PassReport
    from passes import fold_batchnorm

    net, x = _net(), torch.randn(2, 1, 8, 8)
    g = compiler.trace(net, (x,)).copy()
    ref = g.module(x)
    fold_batchnorm(g, PassReport("fold"))
    g.recompile()
    torch.testing.assert_close(g.module(x), ref, rtol=1e-5, atol=1e-5)


def test_observers_choose_their_ranges():
    torch.manual_seed(0)
    x = torch.randn(200_000)
    x[0] = 40.0                                               # one outlier
    ranges = {}
    for method in ("minmax", "percentile", "entropy"):
        obs = RangeObserver(method, percentile=99.9)
        for part in x.split(50_000):
            obs.observe(part)
        ranges[method] = obs.range(256)
    assert ranges["minmax"][1] == pytest.approx(40.0)
    assert 2.5 < ranges["percentile"][1] < 4.0 and -4.0 < ranges["percentile"][0] < -2.5
    assert 2.0 < ranges["entropy"][1] < 10.0                  # the outlier is clipped
    assert entropy_threshold(np.abs(np.random.default_rng(0).uniform(0, 1, 100_000)), 128) > 0.95   # nothing to clip
    scale, zero = scale_and_zero(0.0, 2.55, 8)
    assert scale == pytest.approx(0.01) and zero == 0
    scale, zero = scale_and_zero(-1.0, 1.0, 8)
    assert zero in (127, 128)


def test_train_stage_learns_step_sizes():
    net, x = _net(), torch.randn(4, 1, 8, 8)
    q = Quantize(stage="train")(compiler.trace(net, (x,)))
    m = q.module.train()
    loss = m(x).square().mean()
    loss.backward()
    c2 = dict(m.named_modules())["c2"]
    assert c2.w_step.requires_grad and c2.w_step.grad is not None and c2.w_step.grad.abs().sum() > 0
    assert c2.x_step.grad is not None and c2.x_step.grad.abs() > 0
    assert c2.weight.grad is not None and c2.weight.grad.abs().sum() > 0
    deployed = Quantize(stage="deploy")(q)
    assert isinstance(dict(deployed.module.named_modules())["c2"], IntConv2d)


def test_keep_first_last_and_exclude():
    net, x = _net(), torch.randn(2, 1, 8, 8)
    g = compiler.trace(net, (x,))
    out = Quantize(keep_first_last=True, exclude=("c2",))(g)
    mods = dict(out.module.named_modules())
    assert type(mods["c1"]) is nn.Conv2d and type(mods["fc"]) is nn.Linear and type(mods["c2"]) is nn.Conv2d


def test_an_exported_int8_module_reloads_and_runs_the_same(tmp_path):
    net, x = _net(), torch.randn(2, 1, 8, 8)
    q = Quantize(calibration=((torch.randn(8, 1, 8, 8), None),))(compiler.trace(net, (x,)))
    compiled = codegen.build(q, "llvm")
    compiled.export(tmp_path / "m")
    np.testing.assert_array_equal(codegen.load(tmp_path / "m")(x), compiled(x))


def test_recipe_stages_hand_training_batches_to_calibration():
    from squeezer.recipes.stages import Recipe, Stage

    net = _net()
    g = compiler.trace(net, (torch.randn(1, 1, 8, 8),))
    data = (torch.randn(64, 1, 8, 8) * 4, torch.zeros(64, dtype=torch.long))
    out = Recipe((Stage((Quantize(stage="calibrate"),)),)).run(g, data, batch=16)
    alone = Quantize(stage="calibrate")(g)            # calibrated on the one example input
    step = lambda graph: float(dict(graph.module.named_modules())["c1"].x_step)  # noqa: E731
    assert step(out) > 2 * step(alone)                 # the wide training batches set the range


def test_int_layers_compile_for_cuda_on_the_portable_kernel():
    """No GPU here: the CUDA build must compile with every kernel bound to threads (the portable
    int32 reduction; dp4a kernels are not written yet)."""
    net = nn.Sequential(_layer("conv", 8, 3, kernel=(3, 3), padding=(1, 1)), nn.Flatten(),
                        _layer("linear", 5, 8 * 36, seed=1))
    src = codegen.build(compiler.trace(net, (torch.randn(2, 3, 6, 6),)), "cuda").kernel_source()
    assert "int_conv2d_generic_kernel" in src and "int_linear_generic_kernel" in src and "threadIdx" in src


def _families():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from classification_families import FAMILIES
    return FAMILIES


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(_families()))
def test_classification_families_quantize_build_and_match(family):
    """Each family's wiring (concat, residual, depthwise/grouped, SE, shuffles) quantized whole:
    the compiled model against the deployed torch model. Every int layer alone is exact; a float
    op between them (BatchNorm left unfolded, pooling, SE) may differ in a last bit and move one
    code, hence 1e-2 of the output's range."""
    torch.manual_seed(0)
    model = _families()[family]().eval()
    x = torch.randn(2, 3, 32, 32)
    q = Quantize(calibration=((torch.randn(2, 3, 32, 32), None),) * 2)(compiler.trace(model, (x,)))
    assert any(isinstance(m, (IntConv2d, IntLinear)) for m in q.module.modules())
    with torch.no_grad():
        ref = q.module(x).numpy()
    out = codegen.build(q, "llvm")(x)
    np.testing.assert_allclose(out, ref, atol=1e-2 * np.abs(ref).max())
