"""Grouped 4-bit weights (compiler/ops/int4.py): packing, the ops against an integer reference in
numpy, the Quantize pass's groups (``group_size``), and the VNNI and portable kernels against the op."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import codegen
import compiler
from compiler.errors import OptionError
from compiler.ops import Int4Conv2d, Int4Linear, IntLinear
from compiler.ops.int4 import pack_nibbles, unpack_nibbles
from passes import Quantize


def _codes_np(x: np.ndarray, scale: float, zero: int) -> np.ndarray:
    q = np.rint(x.astype(np.float32) * (np.float32(1) / np.float32(scale))) + zero
    return np.clip(q, 0, 255).astype(np.int64)


def _grouped_np(q: np.ndarray, codes: np.ndarray, scales: np.ndarray, bias: np.ndarray, group: int) -> np.ndarray:
    """(M, T, C) centred codes × (N, T, C) weights, one scale per (tap, group of ``group`` channels):
    each group's core in int64, the groups summed in float64."""
    m, taps, c = q.shape
    y = np.zeros((m, codes.shape[0]))
    col = 0
    for t in range(taps):
        for c0 in range(0, c, group):
            core = q[:, t, c0:c0 + group] @ codes[:, t, c0:c0 + group].T
            y += core.astype(np.float64) * scales[:, col].astype(np.float64)
            col += 1
    return y + bias


def _layer(kind: str, n: int, c: int, group: int, kernel=(3, 3), seed: int = 0, **kw):
    g = torch.Generator().manual_seed(seed)
    shape = (n, c, *kernel) if kind == "conv" else (n, c)
    codes = torch.randint(-7, 8, shape, generator=g).to(torch.int8)
    taps = kernel[0] * kernel[1] if kind == "conv" else 1
    scales = torch.rand(n, taps * -(-c // group), generator=g) * 0.1 + 1e-2
    cls = Int4Conv2d if kind == "conv" else Int4Linear
    return cls(codes, scales, torch.randn(n, generator=g), x_scale=0.037, x_zero=kw.pop("zero", 97), group_size=group,
               **kw).eval()


def test_nibbles_round_trip_every_code_and_odd_lengths():
    codes = torch.arange(-7, 8).repeat(3, 1)[:, :13]
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 7)
    assert torch.equal(unpack_nibbles(packed, 13), codes.to(torch.int8))


def test_int4_ops_equal_a_grouped_integer_reference():
    lin = _layer("linear", 6, 100, 32)                 # groups of 32, 32, 32, 4
    x = torch.randn(5, 100) * 3
    q = (_codes_np(x.numpy(), 0.037, 97) - 97)[:, None, :]
    scales = np.float32(0.037) * lin.w_scale.numpy()
    want = _grouped_np(q, lin.codes().numpy().astype(np.int64)[:, None, :], scales, lin.bias.detach().numpy(), 32)
    np.testing.assert_allclose(lin(x).detach().numpy(), want, rtol=1e-6, atol=1e-5)

    conv = _layer("conv", 7, 20, 8, stride=(2, 1), padding=(1, 1), dilation=(1, 2))
    x = torch.randn(2, 20, 9, 11)
    q = torch.from_numpy((_codes_np(x.numpy(), 0.037, 97) - 97).astype(np.float64))
    patches = F.unfold(q, (3, 3), (1, 2), (1, 1), (2, 1)).numpy()               # (B, C·9, L), rows (c, ky, kx)
    b, _, l = patches.shape
    rows = patches.reshape(b, 20, 9, l).transpose(0, 3, 2, 1).reshape(b * l, 9, 20).astype(np.int64)
    codes = conv.codes().numpy().astype(np.int64).transpose(0, 2, 3, 1).reshape(7, 9, 20)
    want = _grouped_np(rows, codes, np.float32(0.037) * conv.w_scale.numpy(), conv.bias.detach().numpy(), 8)
    got = conv(x).detach().numpy().transpose(0, 2, 3, 1).reshape(b * l, 7)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


def test_packed_storage_is_about_half_of_int8():
    n, k = 256, 1024
    codes, bias = torch.randint(-7, 8, (n, k)).to(torch.int8), torch.zeros(n)
    four = Int4Linear(codes, torch.ones(n, k // 128), bias, 0.1, 0, group_size=128)
    eight = IntLinear(codes, torch.ones(n), bias, 0.1, 0, w_bits=4)
    assert four.stored_bytes() <= 0.55 * eight.stored_bytes()


def _outlier_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        net[0].weight[:, :8] *= 30        # a few input channels with large weights: per-channel steps coarsen
    return net


def test_groups_fit_their_own_range_and_beat_per_channel_scales_at_4_bits():
    net, x = _outlier_net(), torch.randn(64, 256)
    ref, weight = net(x).detach(), net[0].weight.detach().double()
    err, weight_err = {}, {}
    for group in (0, 32):
        q = Quantize(w_bits=4, group_size=group, calibration=(x,))(compiler.trace(net, (x[:2],)))
        err[group] = float((q(x).detach() - ref).abs().max())
        layer = q.module.get_submodule("0")
        weight_err[group] = float((layer.dense_weight() - weight).square().mean())
        if group:
            assert isinstance(layer, Int4Linear) and layer.w_scale.shape == (64, 8)
            codes = layer.codes().reshape(64, 8, 32).abs().amax(2)
            assert bool((codes == 7).all())             # each group's largest weight is a full-scale code
    assert weight_err[32] < 0.5 * weight_err[0] and err[32] < err[0]


def test_grouped_layers_deploy_exactly_what_the_fake_quantized_model_computes():
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                        nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(24 * 16, 10)).eval()
    x = torch.randn(4, 3, 8, 8)
    fake = Quantize(stage="calibrate", w_bits=4, group_size=8)(compiler.trace(net, (x,)))
    deployed = Quantize(stage="deploy", w_bits=4, group_size=8)(fake)
    kinds = {n: type(m).__name__ for n, m in deployed.module.named_children()}
    assert kinds["3"] == "Int4Conv2d" and kinds["5"] == "Int4Linear"
    assert kinds["0"] == "IntConv2d" and kinds["2"] == "IntConv2d"   # 3 channels < a group; depthwise: per channel
    torch.testing.assert_close(deployed(x), fake(x), rtol=0, atol=0)


def test_qat_learns_group_steps():
    net, x = _outlier_net(), torch.randn(16, 256)
    g = Quantize(stage="train", w_bits=4, group_size=32, calibration=(x,))(compiler.trace(net, (x,)))
    layer = g.module.train().get_submodule("0")
    g.module(x).square().mean().backward()
    assert layer.w_step.grad is not None and layer.w_step.grad.shape == (64, 8) and layer.w_step.grad.abs().sum() > 0


def test_bad_group_options_are_refused():
    with pytest.raises(OptionError, match="group_size"):
        Quantize(w_bits=4, group_size=12)
    with pytest.raises(OptionError, match="group_size.*w_bits"):
        Quantize(w_bits=8, group_size=32)
    with pytest.raises(ValueError, match="w_scale must be"):
        Int4Linear(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 3), None, 0.1, 0, group_size=32)
    with pytest.raises(ValueError, match="exceed"):
        Int4Linear(torch.full((4, 64), 8, dtype=torch.int8), torch.ones(4, 2), None, 0.1, 0, group_size=32)


def _host_has_vnni() -> bool:
    from codegen.kernels.vnni_kernels import vnni_available
    from codegen.options import BuildOptions
    return vnni_available(BuildOptions.create("llvm").target)


CASES = [
    ("linear", 1, 4096 // 8, 48, 128, {}),            # a GEMV: one row, three column vectors
    ("linear", 7, 100, 40, 32, {}),                   # a short last group, ragged columns
    ("conv", 2, 20, 24, 8, dict(kernel=(3, 3), padding=(1, 1), stride=(2, 1))),
    ("conv", 1, 16, 16, 16, dict(kernel=(1, 1))),
    ("conv", 1, 12, 8, 8, dict(kernel=(5, 3), padding=(2, 0), dilation=(1, 2))),
]


@pytest.mark.parametrize("kernels", ["vnni", "generic"])
@pytest.mark.parametrize("kind,rows,c_in,n_out,group,extra", CASES)
def test_compiled_int4_layers_match_the_op(kind, rows, c_in, n_out, group, extra, kernels):
    if kernels == "vnni" and not _host_has_vnni():
        pytest.skip("this CPU has no AVX512-VNNI")
    extra = dict(extra)
    kernel = extra.pop("kernel", (3, 3)) if kind == "conv" else None
    layer = _layer(kind, n_out, c_in, group, kernel=kernel, **extra)
    x = torch.randn(rows, c_in, 10, 9) * 2 if kind == "conv" else torch.randn(rows, c_in) * 2
    ref = layer(x).detach().numpy()
    out = codegen.build(compiler.trace(layer, (x,)), "llvm", int_kernels=kernels)(x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_a_quantized_int4_network_builds_with_fused_epilogues_and_reloads(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU6(),
                        nn.Flatten(), nn.Linear(32 * 36, 10)).eval()
    x = torch.randn(2, 3, 6, 6)
    q = Quantize(w_bits=4, group_size=16, calibration=(torch.randn(16, 3, 6, 6),))(compiler.trace(net, (x,)))
    compiled = codegen.build(q, "llvm")
    np.testing.assert_allclose(compiled(x), q(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    from compiler import serialization
    serialization.save(q, tmp_path / "g.safetensors")
    again = serialization.load(tmp_path / "g.safetensors")
    torch.testing.assert_close(again(x), q(x), rtol=0, atol=0)


def test_int4_layers_compile_for_cuda_on_the_portable_kernel():
    layer = _layer("linear", 32, 64, 32)
    src = codegen.build(compiler.trace(layer, (torch.randn(2, 64),)), "cuda").kernel_source()
    assert "int4_linear_generic" in src and "threadIdx" in src
