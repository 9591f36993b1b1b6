"""Graphs TVM 0.27's torch importer got wrong or could not build (codegen/lowering/aten.py,
codegen/relax_fixes.py), each compared against torch."""

import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

import codegen
import compiler


class Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


CASES = {
    # importer dropped ELU's scale and input_scale: SELU came out 1.0507x too small
    "selu": (F.selu, (3, 8)),
    "elu-alpha": (lambda x: F.elu(x, alpha=0.3), (3, 8)),
    "celu": (lambda x: F.celu(x, alpha=2.0), (3, 8)),
    # ConvertLayout threw std::bad_alloc on squeeze/expand_dims with a negative axis
    "squeeze-negative-axis": (lambda x: x[:, :1].squeeze(-3) * 2, (2, 4, 5, 5)),
    "unsqueeze-negative-axis": (lambda x: F.relu(x.unsqueeze(-1)).sum(-1), (2, 4, 5, 5)),
    "max-pool1d": (lambda x: F.max_pool1d(x.flatten(2), 3), (2, 4, 5, 5)),
    # importer had no amax/amin
    "amax-amin": (lambda x: x.amax(dim=(2, 3)) - x.amin(dim=(2, 3)) + x.amax(dim=1).mean((1, 2))[:, None], (2, 4, 5, 5)),
    # cumsum of a bool mask stayed bool (LLVM refused the additions); torch sums it in int64
    "cumsum-bool": (lambda x: x * (x > 0).cumsum(-1).float(), (2, 9)),
    "cumsum-float": (lambda x: x.cumsum(1), (2, 9)),
    # negative indices reached `take` as they were and read out of bounds: silently wrong results
    "select-negative": (lambda x: x[:, -1] * 2 + x[-1, -2], (3, 7, 8)),
    "index-negative-list": (lambda x: x[:, [-1, 0, -7]] * 2, (3, 7, 8)),
    "index-negative-tensor": (lambda x: x[torch.tensor([-1, 0]), :, torch.tensor([-8, 3])] * 2, (3, 7, 8)),
    "take-negative": (lambda x: torch.take(x, torch.tensor([-1, -168, 5])) * 2, (3, 7, 8)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_importer_case_matches_torch(name):
    fn, shape = CASES[name]
    torch.manual_seed(0)
    x = torch.randn(*shape)
    module = Fn(fn).eval()
    got = codegen.build(compiler.trace(module, (x,)), "llvm")(x)
    ref = module(x).numpy()
    assert np.abs(np.asarray(got) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_multihead_attention_builds_and_matches():
    """nn.MultiheadAttention (torch.export emits a negative-axis squeeze): any model with MHA failed to build."""
    torch.manual_seed(0)

    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    module = SelfAttention().eval()
    x = torch.randn(2, 7, 32)
    got = codegen.build(compiler.trace(module, (x,)), "llvm")(x)
    ref = module(x).detach().numpy()
    assert np.abs(np.asarray(got) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_two_sparse_layers_with_the_same_bytes_but_other_shapes_keep_their_own_weights():
    """Found by the fuzzer's long profile: the lowering cached weight constants by their bytes
    alone, so an all-pruned 2×2 layer and an all-pruned 4×1 layer (16 zero bytes each) shared one
    constant and the build failed (or, with equal reduction lengths, would have used the wrong one)."""
    from passes import Sparsify

    class TwoBranches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(2, 2, bias=False), nn.Linear(4, 1, bias=False)

        def forward(self, x, y):
            return self.a(x), self.b(y)

    model = TwoBranches().eval()
    x, y = torch.randn(3, 2), torch.randn(3, 4)
    with torch.no_grad():
        model.a.weight.zero_(), model.b.weight.zero_()
    g = Sparsify(sparsity=0.9)(compiler.trace(model, (x, y)))
    for kernels in ("dense", "auto"):
        got = codegen.build(g, "llvm", sparse_kernels=kernels)(x, y)
        for r, o in zip(g.module(x, y), got):
            assert np.abs(r.detach().numpy() - np.asarray(o)).max() <= 1e-6


class ConvClipBlocks(nn.Module):
    """MobileNet's activations: clip (ReLU6, Hardswish, Hardsigmoid, one-sided clamp) after convs."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(4))

    def forward(self, x):
        a, b, c, d = self.convs
        x = F.relu6(a(x))
        x = F.hardswish(b(x))
        x = x * F.hardsigmoid(c(x))
        return d(x).clamp(min=-0.25)


def _kernels(module: nn.Module, x: torch.Tensor) -> list[str]:
    from codegen.frontend import import_graph
    from codegen.options import BuildOptions
    from codegen.relax_pipeline import kernel_calls, scheduled_module

    options = BuildOptions.create("llvm")
    return sorted(kernel_calls(scheduled_module(import_graph(compiler.trace(module, (x,)), options)[0], options)))


def test_clip_stays_in_the_conv_layout_and_fuses_into_the_conv():
    """ConvertLayout had no rule for clip: every ReLU6/Hardswish went back to NCHW and forth again
    (two transposes per activation) and could not fuse into the conv's epilogue."""
    torch.manual_seed(0)
    module = ConvClipBlocks().eval()
    x = torch.randn(2, 8, 9, 9)
    names = _kernels(module, x)
    inner = [n for n in names if "transpose" in n]
    assert len(inner) <= 2, f"layout transposes beyond the input/output ones: {inner}"
    assert not any(n.startswith(("fused_maximum", "maximum", "clip", "fused_clip")) for n in names), names
    x[0, 0, 1, 1], x[1, 3, 4, 4], x[0, 5, 0, 0] = float("nan"), float("inf"), float("-inf")
    got = np.asarray(codegen.build(compiler.trace(module, (torch.randn(2, 8, 9, 9),)), "llvm")(x))
    ref = module(x).detach().numpy()
    assert np.array_equal(np.isnan(got), np.isnan(ref)), "NaN positions differ"
    fin = np.isfinite(ref)
    assert np.abs(got[fin] - ref[fin]).max() <= 1e-4 * max(1.0, np.abs(ref[fin]).max())


class LastStep(nn.Module):
    """A recurrent layer read at its last time step (``y[:, -1]``), as sequence classifiers do."""

    def __init__(self, kind: str, **kwargs) -> None:
        super().__init__()
        self.rnn = getattr(nn, kind)(6, 12, batch_first=True, **kwargs)
        self.fc = nn.Linear(12 * (2 if kwargs.get("bidirectional") else 1), 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y[:, -1])


@pytest.mark.parametrize("kind,kwargs", [("LSTM", dict(num_layers=2)), ("GRU", dict(bidirectional=True)),
                                         ("RNN", dict(nonlinearity="relu"))])
def test_recurrent_layers_build_and_match(kind, kwargs):
    torch.manual_seed(0)
    model, x = LastStep(kind, **kwargs).eval(), torch.randn(2, 5, 6)
    got = codegen.build(compiler.trace(model, (x,)), "llvm")(x)
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_an_output_shape_the_importer_gets_wrong_is_a_build_error(monkeypatch):
    """Without our lowering, TVM's importer took two non-adjacent index tensors as an outer product:
    the module would have returned (2, 7, 2) where torch returns (2, 7)."""
    from codegen.lowering import aten

    monkeypatch.delitem(aten.ATEN_LOWERINGS, "index.Tensor")
    module = Fn(lambda x: x[torch.tensor([1, 0]), :, torch.tensor([2, 3])] * 2)
    with pytest.raises(compiler.errors.BuildError, match=r"returns shapes \[\(2, 7, 2\)\] where the model returns"):
        codegen.build(compiler.trace(module, (torch.randn(3, 7, 8),)), "llvm")
