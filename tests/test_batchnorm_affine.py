"""An inference BatchNorm that no conv absorbs compiles to one multiply-add per element
(codegen/batchnorm_affine.py): no subtract or division left in its kernel, and the model still
matches torch within the 1e-4 relative contract (the rewrite itself is ~1e-7)."""

import numpy as np
import pytest
import torch
from torch import nn

import codegen
import compiler
from codegen.frontend import import_graph
from codegen.options import BuildOptions
from codegen.relax_pipeline import kernel_calls, scheduled_module


def _randomized(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            if mod.affine:
                mod.weight.data.uniform_(0.5, 1.5)
                mod.bias.data.uniform_(-1.0, 1.0)
    return model.eval()


class ConcatNormRelu(nn.Module):
    """densenet's layer input: BN and ReLU over a concatenation, then a 1x1 conv."""

    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 16, 1), nn.Conv2d(8, 16, 3, padding=1)
        self.norm, self.conv = nn.BatchNorm2d(32, affine=affine), nn.Conv2d(32, 16, 1)

    def forward(self, x):
        return self.conv(torch.relu(self.norm(torch.cat([self.a(x), self.b(x)], 1))))


class ReluThenNorm1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm = nn.Linear(12, 24), nn.BatchNorm1d(24)

    def forward(self, x):
        return self.norm(torch.relu(self.fc(x)))


@pytest.mark.parametrize("model, shape", [
    (ConcatNormRelu(), (1, 8, 20, 20)),
    (ConcatNormRelu(affine=False), (2, 8, 12, 12)),
    (ReluThenNorm1d(), (5, 12)),
])
def test_unfolded_batchnorm_is_a_multiply_add_and_matches_torch(model, shape):
    model = _randomized(model)
    x = torch.randn(*shape)
    graph = compiler.trace(model, (x,))
    calls = kernel_calls(scheduled_module(import_graph(graph)[0], BuildOptions.create("llvm")))
    assert not [name for name in calls if "divide" in name or "subtract" in name], calls
    assert [name for name in calls if "multiply" in name], calls
    with torch.no_grad():
        ref = model(x).numpy()
    got = np.asarray(codegen.build(graph, "llvm")(x))
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
