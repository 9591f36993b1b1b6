"""Issue 23, the survey's low-bit methods: Local Binary CNN (Juefei-Xu et al. 2017), ADMM power-of-two
weights (Leng et al. 2018) and Two-Step Quantization (Wang et al. 2018), each tested on the property its
paper relies on and compiled (the bit-plane kernels) against the torch deploy model. Tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import codegen
import compiler
from compiler.errors import OptionError
from compiler.finetune import TrainConfig, train
from compiler.ops.bitserial import BitConv2d
from passes import Binarize, LocalBinaryConv, TwoStepQuantization, admm_config
from passes.low_bit_survey import AnchorConv2d, admm_magnitudes, admm_nearest, admm_project
from passes.two_step import (TSQConv2d, TSQPlanes, im2col_gram, output_error, round_weights, sparse_values,
                             tsq_solve)


class _Net(nn.Module):
    """stem conv -> ReLU -> conv -> ReLU -> shape-changing conv -> ReLU -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 4, 3)
        self.head = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        x = F.relu(self.conv(F.relu(self.stem(x))))
        return self.head(F.relu(self.down(x)).flatten(1))


def _net():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    return compiler.trace(_Net().eval(), (x[:1],)), x


def _data(x, batches=6):
    torch.manual_seed(1)
    return [(x[i % 2 * 8:(i % 2 + 1) * 8], torch.randint(0, 5, (8,))) for i in range(batches)]


def _compiled_matches(graph, x1) -> None:
    with torch.no_grad():
        ref = graph.module.eval()(x1).numpy()
    out = codegen.build(graph)(x1.numpy())
    assert np.abs(out - ref).max() <= 1e-5 * max(np.abs(ref).max(), 1.0)


# ---- Local Binary CNN ----------------------------------------------------------------------------------
def test_lbc_anchors_are_fixed_sparse_ternary_and_only_the_1x1_learns():
    g, x = _net()
    g1 = LocalBinaryConv(stage="train", sparsity=0.3, anchors=12, layers=("conv", "down"))(g)
    block = g1.module.conv
    anchor = block.anchor
    assert isinstance(anchor, AnchorConv2d) and block.combine.kernel_size == (1, 1)
    w = anchor.weight
    assert w.shape == (12, 8, 3, 3)
    assert set(w.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert int((w != 0).sum()) == math.floor(0.3 * w.numel())           # the sparsity level: non-zero fraction
    assert 0.35 < float((w > 0).sum() / (w != 0).sum()) < 0.65          # fair ±1
    assert all(p is not anchor.weight for p in g1.module.parameters())  # a buffer: no optimizer sees it
    order = [n.target for n in g1.module.graph.nodes if n.op in ("call_module", "call_function")]
    i = order.index("conv.anchor")
    assert order[i + 1] is F.relu and order[i + 2] == "conv.combine"
    before = {n: t.clone() for n, t in g1.module.state_dict().items()}
    train(g1.module, _data(x), TrainConfig(epochs=1, lr=1e-2, progress=False))
    after = g1.module.state_dict()
    assert torch.equal(after["conv.anchor.weight"], before["conv.anchor.weight"])
    assert torch.equal(after["down.anchor.weight"], before["down.anchor.weight"])
    assert not torch.equal(after["conv.combine.weight"], before["conv.combine.weight"])


def test_lbc_deploys_anchors_as_ternary_bit_planes_and_compiles():
    g, x = _net()
    g1 = LocalBinaryConv(stage="train", sparsity=0.5, layers=("conv", "down"))(g)
    g2 = LocalBinaryConv()(g1)                                           # pack the trained blocks
    packed = g2.module.conv.anchor
    assert isinstance(packed, BitConv2d) and packed.planes == 2
    assert torch.equal(packed.dense_weight().float(), g1.module.conv.anchor.weight)
    with torch.no_grad():
        assert torch.allclose(g2.module(x), g1.module.eval()(x), atol=1e-5)
    _compiled_matches(g2, x[:1])
    g3 = LocalBinaryConv(sparsity=0.5, seed=0, layers=("conv", "down"))(g)   # one-shot deploy: same anchors
    assert torch.equal(g3.module.down.anchor.dense_weight(), g2.module.down.anchor.dense_weight())


# ---- ADMM ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("w_bits", [1, 2, 3])
def test_admm_projection_is_a_fixed_point_of_alpha_and_codes(w_bits):
    torch.manual_seed(3)
    v = torch.randn(500, dtype=torch.float64) * 0.1
    alpha, q = admm_project(v, w_bits)
    mags = admm_magnitudes(w_bits)
    allowed = torch.tensor(sorted({s * m for m in mags for s in (-1, 1)}), dtype=torch.float64)
    assert set(q.abs().unique().tolist()) <= set(mags)
    assert alpha == pytest.approx(float(v @ q) / float(q @ q), rel=1e-12)        # least squares for the codes
    dist = (v[:, None] / alpha - allowed[None]).abs()
    assert torch.all((v / alpha - q).abs() <= dist.min(1).values + 1e-12)      # nearest allowed values
    assert torch.equal(admm_nearest(v / alpha, mags), q)
    if w_bits == 3:
        assert mags == [0.0, 1.0, 2.0, 4.0]


def test_admm_residual_falls_and_the_deployed_layer_is_alpha_times_codes():
    g, x = _net()
    g1 = Binarize(method="admm", stage="train", w_bits=3)(g)
    layers = [g1.module.conv, g1.module.down]
    first = [m.admm_residuals[0] for m in layers]
    train(g1.module, _data(x, 60), admm_config(epochs=1, lr=1e-3, rho=50.0, every=15, progress=False))
    for m, r0 in zip(layers, first):
        r = m.admm_residuals                                                  # ||W - G||, one per G-step
        assert len(r) == 5 and max(r[1:]) < 0.5 * r0 and r[-1] < 0.25 * r0, r
    g2 = Binarize(method="admm", w_bits=3)(g1)
    for name in ("conv", "down"):
        alpha, q = admm_project(getattr(g1.module, name).weight, 3)
        dense = getattr(g2.module, name).dense_weight()
        expected = float(np.float32(alpha)) * q.reshape(dense.shape)
        assert torch.equal(dense, expected)                                   # exactly alpha * codes
        assert set(q.abs().unique().tolist()) <= {0.0, 1.0, 2.0, 4.0}
    _compiled_matches(g2, x[:1])


# ---- Two-Step Quantization -----------------------------------------------------------------------------
def test_tsq_sparse_quantizer_zeroes_small_activations_and_keeps_uniform_levels_above():
    eps, delta = 0.3, 0.25
    x = torch.linspace(-1, 2, 3001)
    a = sparse_values(x, eps, delta, 2)
    assert torch.all(a[x < eps - 1e-6] == 0)
    levels = torch.tensor([eps + (i - 0.5) * delta for i in (1, 2, 3)])
    assert torch.allclose(a[x >= eps + 1e-6].unique(), levels)
    inside = (x > eps + 1e-4) & (x < eps + 3 * delta - 1e-4)
    assert torch.all((a - x)[inside].abs() <= delta / 2 + 1e-6)            # nearest level inside the range


def test_tsq_step1_quantizes_inputs_only_and_step2_beats_rounding_on_each_layer():
    g, x = _net()
    calib = (x,)
    g1 = TwoStepQuantization(step="codes", calibration=calib)(g)
    conv = g1.module.conv
    assert isinstance(conv, TSQConv2d) and conv.tsq_step == 1 and conv.quant_weight() is conv.weight
    with torch.no_grad():
        seen = {}
        conv.register_forward_hook(lambda m, i, o: seen.update(x=m.quant_input(i[0])))
        g1.module(x)
    nonzero = seen["x"][seen["x"] > 0]
    assert float(nonzero.min()) >= conv.tsq_eps and len(nonzero.unique()) <= 3
    train(g1.module, _data(x), TrainConfig(epochs=1, lr=1e-3, progress=False))   # step 1 training
    g2 = TwoStepQuantization(step="weights", calibration=calib)(g1)
    for name in ("conv", "down"):
        m1, m2 = getattr(g1.module, name), getattr(g2.module, name)
        with torch.no_grad():
            inputs = {}
            h = m1.register_forward_hook(lambda m, i, o: inputs.update(x=m.quant_input(i[0])))
            g1.module.eval()(x)
            h.remove()
        gram = im2col_gram(m1, inputs["x"])
        w = m1.weight.detach().reshape(m1.weight.shape[0], -1)
        a0, q0 = round_weights(w, 2)
        alpha, q = tsq_solve(w, gram, 2)
        rounded, solved = output_error(w, a0[:, None] * q0, gram), output_error(w, alpha[:, None] * q, gram)
        assert torch.all(solved <= rounded + 1e-9) and float(solved.sum()) < 0.9 * float(rounded.sum())
        assert torch.equal(m2.codes().reshape(q.shape), q.float())           # the layer starts from the solution
        assert set(q.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert "(rounding) ->" in str(g2.reports[-1])


def test_tsq_deploys_to_bit_serial_layers_and_compiles():
    g, x = _net()
    g2 = TwoStepQuantization(step="weights", calibration=(x,))(g)
    train(g2.module, _data(x), TrainConfig(epochs=1, lr=1e-3, progress=False))   # step 2 fine-tune
    g3 = TwoStepQuantization(calibration=(x,))(g2)
    assert isinstance(g3.module.conv, TSQPlanes) and g3.module.conv[0].a_mode == "unsigned"
    with torch.no_grad():
        assert torch.allclose(g3.module(x), g2.module.eval()(x), atol=1e-4)
    _compiled_matches(g3, x[:1])


# ---- options and listing -------------------------------------------------------------------------------
@pytest.mark.parametrize("make, option", [
    (lambda: LocalBinaryConv(sparsity=0.0), "sparsity"),
    (lambda: LocalBinaryConv(activation="tanh"), "activation"),
    (lambda: LocalBinaryConv(anchors=-1), "anchors"),
    (lambda: TwoStepQuantization(step="both"), "step"),
    (lambda: TwoStepQuantization(w_bits=1), "w_bits"),
    (lambda: TwoStepQuantization(sparsity=1.0), "sparsity"),
    (lambda: admm_config(rho=0), "rho"),
    (lambda: admm_config(every=0), "every"),
])
def test_bad_options_name_the_option(make, option):
    with pytest.raises(OptionError, match=option):
        make()


def test_methods_are_listed_parse_from_specs_and_refuse_bad_runs(capsys):
    from compiler.registry import parse_pass_spec
    from squeezer.cli import main

    assert parse_pass_spec("local-binary:sparsity=0.1,anchors=32").anchors == 32
    assert parse_pass_spec("two-step-quantization:step=codes,a_bits=3").a_bits == 3
    assert parse_pass_spec("binarize:method=admm,w_bits=3").method == "admm"
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "local-binary" in out and "two-step-quantization" in out and "admm" in out
    g, x = _net()
    with pytest.raises(OptionError, match="w_bits"):
        Binarize(method="admm", w_bits=5)(g)
    with pytest.raises(OptionError, match="activations"):
        Binarize(method="admm", activations="sign")(g)
    g1 = TwoStepQuantization(step="codes", calibration=(x,))(g)
    with pytest.raises(OptionError, match="step=weights"):
        g1.module.conv.pack()
