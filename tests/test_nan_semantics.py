"""NaN in → NaN out, as in torch (codegen/nan_semantics.py): TVM's stock ReLU, clip, maximum and max
pooling dropped NaN (an all-NaN image gave finite logits)."""

import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

import codegen
import compiler


class EveryNanDroppingOp(nn.Module):
    """One output per op whose stock TVM lowering turned NaN into a number."""

    def forward(self, x):
        z = torch.zeros_like(x)
        return (F.relu(x), F.relu6(x), F.hardtanh(x), x.clamp(-0.5, 0.5), F.elu(x), F.selu(x), F.celu(x),
                F.max_pool2d(x, 2), F.max_pool2d(x, 3, 2, 1), F.max_pool2d(x, 3, 2, 1, ceil_mode=True),
                F.max_pool1d(x.flatten(2), 3), torch.maximum(x, z), torch.maximum(z, x), torch.minimum(x, z),
                torch.minimum(z, x), x.amax(dim=1), x.amin(dim=(2, 3)), torch.max(x, dim=3)[0], torch.max(x, dim=3)[1],
                torch.min(x, dim=1)[0], torch.min(x, dim=1)[1],
                x.argmax(dim=2), x.argmin(dim=3, keepdim=True), x.argmax(), x.flatten(1).argmin(1))


def _special_input() -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 7)
    x[0, 0, 0, 0] = x[1, 3, 6, 6] = x[0, 2, 3, 4] = float("nan")
    x[0, 1, 2, 2], x[1, 1, 0, 5], x[1, 0, 4, 4] = float("inf"), float("-inf"), float("-inf")
    return x


def assert_same_specials(ref: np.ndarray, got: np.ndarray, what: str) -> None:
    """Same NaN positions, same infinities, finite values within the 1e-4 contract."""
    assert np.array_equal(np.isnan(ref), np.isnan(got)), f"{what}: NaN positions differ"
    inf = np.isinf(ref)
    assert np.array_equal(inf, np.isinf(got)) and np.array_equal(ref[inf], got[inf]), f"{what}: infinities differ"
    fin = np.isfinite(ref)
    assert np.allclose(got[fin], ref[fin], rtol=0, atol=1e-4 * max(1.0, float(np.abs(ref[fin]).max(initial=0)))), what


@pytest.mark.parametrize("default_schedules", [True, False])
def test_every_op_keeps_nan_and_inf_like_torch(default_schedules):
    x = _special_input()
    module = EveryNanDroppingOp().eval()
    compiled = codegen.build(compiler.trace(module, (torch.randn(2, 4, 7, 7),)), "llvm",
                             default_schedules=default_schedules)
    got = compiled(x)
    for i, (ref, out) in enumerate(zip(module(x), got)):
        assert_same_specials(ref.numpy(), np.asarray(out), f"output {i}")


def test_nan_image_gives_nan_logits_through_a_cnn():
    """The reported case: conv → ReLU → max pool → linear turned an all-NaN image into finite logits."""
    from squeezer import zoo

    entry = zoo.get("lenet5")
    model = entry.build().eval()
    compiled = codegen.build(compiler.trace(model, entry.example_inputs()), "llvm")
    x = torch.full_like(entry.example_inputs()[0], float("nan"))
    assert np.isnan(np.asarray(compiled(x))).all()
    one = entry.example_inputs()[0].clone()
    one[0, 0, 5, 5] = float("nan")
    assert_same_specials(model(one).detach().numpy(), np.asarray(compiled(one)), "one NaN pixel")


def test_relu6_and_hardswish_fused_into_a_vectorized_conv_keep_nan_and_inf():
    """Clip with constant bounds becomes min/max fused into the conv's vectorized epilogue, lowered
    to single max/min instructions in NaN-keeping operand order (no bit test): NaN and +-inf
    after the conv must still come out as torch gives them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU6(), nn.Conv2d(32, 32, 3, padding=1, groups=32),
                          nn.Hardswish(), nn.Conv2d(32, 48, 1), nn.Hardtanh(-0.5, 2.0)).eval()
    compiled = codegen.build(compiler.trace(model, (torch.randn(1, 3, 12, 12),)), "llvm")
    x = torch.randn(1, 3, 12, 12)
    x[0, 0, 3, 4], x[0, 1, 8, 8], x[0, 2, 0, 11] = float("nan"), float("inf"), float("-inf")
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.isnan(ref).any()
    assert_same_specials(ref, np.asarray(compiled(x)), "conv + relu6/hardswish/hardtanh")


def test_nan_rules_build_for_cuda():
    """The same legalizations on a CUDA target (source only, no GPU needed): every kernel binds threads
    and none needs a global scratch buffer (the arg-reductions return values and indices both)."""
    codegen.build(compiler.trace(EveryNanDroppingOp().eval(), (torch.randn(2, 4, 7, 7),)),
                  {"kind": "cuda", "arch": "sm_90"})


@pytest.mark.parametrize("a_mode", ["sign", "unsigned"])
def test_quantized_activations_give_nan_a_code_in_the_op_and_the_kernel(a_mode):
    """Binarized/quantized activations have no NaN: sign(NaN) is -1 (NaN >= 0 is false) and
    DoReFa's code of NaN is 0, in the torch op and the compiled kernel alike (they differed)."""
    from compiler.ops.bitserial import BitLinear

    torch.manual_seed(0)
    layer = BitLinear(torch.rand(1, 8, 40) < 0.5, [2.0], -1.0, torch.ones(8), torch.zeros(8), a_mode, a_bits=2)
    x = torch.rand(3, 40)
    x[0, 5] = x[2, 0] = float("nan")
    compiled = codegen.build(compiler.trace(nn.Sequential(layer), (x,)), "llvm")
    assert_same_specials(layer(x).detach().numpy(), np.asarray(compiled(x)), a_mode)


def test_gelu_of_infinity_is_the_limit():
    """The one documented difference from torch (README): GELU(+inf) = +inf here, NaN in torch 2.13's
    CPU kernel; -inf and NaN give NaN in both."""
    x = torch.tensor([[float("inf"), float("-inf"), float("nan"), 1.0]])
    got = np.asarray(codegen.build(compiler.trace(nn.Sequential(nn.GELU()), (x,)), "llvm")(x))
    assert got[0, 0] == np.inf and np.isnan(got[0, 1:3]).all()
    assert np.isclose(got[0, 3], F.gelu(x)[0, 3].item(), atol=1e-6)
