"""Recurrent layers (compiler/ops/recurrent.py): nn.LSTM/GRU/RNN traced as Linear gates equal torch's
layers in every configuration, every weight pass family rewrites their gates, and the compiled
module matches the compressed torch model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import codegen
import compiler
from compiler.ops.recurrent import UnrolledRecurrent

CONFIGS = [
    ("LSTM", dict(num_layers=2, batch_first=True)),
    ("LSTM", dict(bidirectional=True, proj_size=5)),
    ("GRU", dict(num_layers=2, bidirectional=True, batch_first=True)),
    ("GRU", dict(bias=False)),
    ("RNN", dict(nonlinearity="relu", num_layers=2)),
    ("RNN", dict(bidirectional=True, batch_first=True)),
]


@pytest.mark.parametrize("kind,kwargs", CONFIGS)
def test_unrolled_layers_equal_torch_with_and_without_initial_state(kind, kwargs):
    torch.manual_seed(0)
    rnn = getattr(nn, kind)(6, 8, **kwargs).eval()
    ours = UnrolledRecurrent(rnn)
    x = torch.randn(3, 5, 6) if kwargs.get("batch_first") else torch.randn(5, 3, 6)
    layers = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
    h0 = torch.randn(layers, 3, kwargs.get("proj_size") or 8)
    hx = (h0, torch.randn(layers, 3, 8)) if kind == "LSTM" else h0
    for args in ((x,), (x, hx), (x[:, 0] if kwargs.get("batch_first") else x[:, 0],)):   # last: unbatched
        if len(args) == 1 and args[0].dim() == 2 and kwargs.get("batch_first"):
            args = (x[0],)
        want, got = rnn(*args), ours(*args)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


class Classifier(nn.Module):
    """A sequence classifier: LSTM over the rows, the last step to a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(12, 32, num_layers=2, batch_first=True)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y[:, -1])


def test_tracing_exposes_the_gate_linears_and_keeps_a_leaf_whole():
    model, x = Classifier().eval(), torch.randn(2, 7, 12)
    graph = compiler.trace(model, (x,))
    linears = [n for n, m in graph.layers().items() if isinstance(m, nn.Linear)]
    assert {"rnn.cells.0.ih", "rnn.cells.0.hh", "rnn.cells.1.ih", "rnn.cells.1.hh", "fc"} <= set(linears)
    torch.testing.assert_close(graph(x), model(x), rtol=1e-5, atol=1e-6)
    whole = compiler.trace(model, (x,), leaf_modules=(nn.LSTM,))
    assert isinstance(whole.module.get_submodule("rnn"), nn.LSTM)


SPECS = ["sparsify:sparsity=0.7", "cluster:bits=4", "quantize", "low-rank:method=svd,rank_ratio=0.5",
         "binarize:method=xnor,keep_first_last=false"]


@pytest.mark.parametrize("spec", SPECS)
def test_every_weight_pass_rewrites_the_gates_and_the_build_matches(spec):
    torch.manual_seed(0)
    model, x = Classifier().eval(), torch.randn(2, 3, 12)
    graph = compiler.trace(model, (x,))
    out = compiler.parse_pass_spec(spec)(graph)
    gates = {n: type(m).__name__ for n, m in out.module.named_modules() if n.startswith("rnn.cells.0.")}
    assert any(kind != "Linear" for kind in gates.values()), gates
    ref = out(x).detach().numpy()
    got = codegen.build(out, "llvm")(x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(ref).max()))


def test_alternating_multibit_codes_and_scales_are_each_optimal_and_beat_refined_sketching():
    """Xu et al. (ICLR 2018): given the scales every weight takes the nearest of the 2^M values,
    given the codes the scales are the least-squares fit; so the error ends at or below refined."""
    from passes.sketching import least_squares_scales, nearest_codes, sketch

    w = torch.randn(24, 40, dtype=torch.float64)
    for planes in (2, 3):
        b, a = sketch(w, planes, "alternating", alternations=3)
        values = torch.stack([(torch.tensor(c, dtype=w.dtype)[:, None] * a).sum(0)
                              for c in itertools.product((-1.0, 1.0), repeat=planes)])            # (2^M, out)
        best = (w[None] - values[:, :, None]).abs().min(0).values
        torch.testing.assert_close((w - (a[:, :, None] * nearest_codes(w, a)).sum(0)).abs(), best)
        torch.testing.assert_close(least_squares_scales(w, b), a)
        error = lambda bb, aa: float((w - (aa[:, :, None] * bb).sum(0)).norm())  # noqa: E731
        assert error(b, a) <= error(*sketch(w, planes, "refined")) + 1e-9


def test_alternating_two_bit_lstm_compiles_and_matches():
    torch.manual_seed(0)
    model, x = Classifier().eval(), torch.randn(2, 3, 12)
    spec = "network-sketching:method=alternating,planes=2,keep_first_last=false,exclude=[fc]"
    out = compiler.parse_pass_spec(spec)(compiler.trace(model, (x,)))
    assert type(out.module.get_submodule("rnn.cells.1.hh")).__name__ == "SketchPlanes"
    ref = out(x).detach().numpy()
    np.testing.assert_allclose(codegen.build(out, "llvm")(x), ref, rtol=1e-4, atol=1e-5)
