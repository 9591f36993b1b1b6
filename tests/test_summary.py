"""summarize: parameters, MACs by the textbook formulas, bytes as stored."""

import json

import torch
from torch import nn

import compiler
from squeezer import zoo
from compiler.ops import LutLinear


def test_lenet_macs_and_params_by_formula():
    e = zoo.get("lenet5")
    s = compiler.summarize(compiler.trace(e.build(), e.example_inputs()))
    by = {layer.name: layer for layer in s.layers}
    conv1 = next(v for k, v in by.items() if v.kind == "Conv2d")
    assert conv1.macs == 6 * 28 * 28 * 1 * 5 * 5
    assert s.total_params == sum(p.numel() for p in e.build().parameters())
    assert s.total_bytes == 4 * s.total_params
    assert s.total_macs == 6 * 28 * 28 * 25 + 16 * 10 * 10 * 6 * 25 + 400 * 120 + 120 * 84 + 84 * 10
    data = json.loads(s.to_json())
    assert data["total"]["macs"] == s.total_macs
    assert "total" in s.table()


def test_shared_module_is_counted_once_in_params_twice_in_macs():
    conv = nn.Conv2d(4, 4, 3, padding=1)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(self.conv(x))

    s = compiler.summarize(compiler.trace(Twice(), torch.randn(1, 4, 8, 8)))
    assert [layer.kind for layer in s.layers] == ["Conv2d", "Conv2d"]
    assert s.total_params == 4 * 4 * 9 + 4 and s.layers[1].params == 0 and s.layers[1].stored_bytes == 0
    assert s.layers[0].macs == s.layers[1].macs == 4 * 8 * 8 * 4 * 9


def test_partially_tied_weights_are_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.b.weight = self.a.weight  # tied weight, separate biases

        def forward(self, x):
            return self.b(self.a(x))

    model = Tied()
    s = compiler.summarize(compiler.trace(model, torch.randn(2, 8)))
    assert s.total_params == sum(p.numel() for p in model.parameters()) == 64 + 16


def test_transposed_conv_macs():
    m = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2))  # a leaf inside a model
    x = torch.randn(1, 4, 5, 5)
    (layer,) = compiler.summarize(compiler.trace(m, x)).layers
    assert layer.macs == 4 * 5 * 5 * 6 * 9


def test_compressed_storage_counts_at_its_packed_size():
    lin = nn.Linear(64, 32)
    model = nn.Sequential(LutLinear.from_linear(lin, 4))
    s = compiler.summarize(compiler.trace(model, torch.randn(1, 64)))
    (layer,) = s.layers
    assert layer.params == 64 * 32 + 32  # the dense layer it stands for
    assert layer.stored_bytes == 32 * 32 + 16 * 4 + 32 * 4  # 4-bit indices + codebook + bias
    assert layer.macs == 64 * 32


def test_attention_macs_include_sdpa():
    e = zoo.get("attention")
    s = compiler.summarize(compiler.trace(e.build(), e.example_inputs()))
    assert any(layer.kind == "scaled_dot_product_attention" and layer.macs > 0 for layer in s.layers)


def test_matmul_operator_and_multihead_attention_macs():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            y, _ = self.mha(x, x, x)
            return y @ x.transpose(1, 2)

    x = torch.randn(2, 5, 16)
    s = compiler.summarize(compiler.trace(M(), x))
    by_kind = {layer.kind: layer.macs for layer in s.layers}
    assert by_kind["MultiheadAttention"] == 3 * 10 * 256 + 2 * 10 * 5 * 16 + 10 * 256
    assert by_kind["matmul"] == 2 * 5 * 5 * 16


def test_a_new_op_is_one_row_of_the_op_table(monkeypatch):
    """The op table is what summarize counts with: a row with a MAC rule is enough for a new module
    (and its subclasses), and a function row for a new function."""
    from compiler import op_table

    class Scale(nn.Module):
        squeezer_leaf = True   # one call_module node, as a library layer is

        def forward(self, x):
            return x * 2

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = Scale()

        def forward(self, x):
            return torch.cdist(x, x) + self.scale(x)

    g = compiler.trace(Net(), (torch.randn(4, 4),))
    assert compiler.summarize(g).total_macs == 0
    monkeypatch.setitem(op_table.MODULES, Scale, op_table.OpRule(macs=lambda m, args, out: op_table.numel(out)))
    monkeypatch.setitem(op_table.FUNCTIONS, torch.cdist, op_table.OpRule(macs=lambda ins, out: 64))
    by = {layer.name: layer.macs for layer in compiler.summarize(g).layers}
    assert by["scale"] == 16 and by["cdist"] == 64


def test_einsum_addmm_and_method_matmuls_count_as_torch_counts_them():
    """MACs that depend on more than the inputs' shapes (an einsum's equation, which operand of
    addmm is the bias) and matmuls called as methods agree with torch's FlopCounterMode (which
    has no rule for addbmm: that one by its formula)."""
    from torch.utils.flop_counter import FlopCounterMode

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias, self.w = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(5, 6))

        def forward(self, x, y):
            a = torch.einsum("b i d, b j d -> b i j", x, y)
            c = torch.einsum("...id,...jd", x, y)   # implicit output, broadcast dims
            e = torch.addmm(self.bias, x[0], self.w) + self.bias.addmm(x[1], self.w)
            f = x.matmul(y.transpose(1, 2)) + torch.baddbmm(a, x, y.transpose(1, 2))
            return a.sum() + c.sum() + e.sum() + f.sum() + torch.einsum("ii", x[0, :, :3])

    x, y = torch.randn(2, 3, 5), torch.randn(2, 4, 5)
    with FlopCounterMode(display=False) as counter:
        M()(x, y)
    s = compiler.summarize(compiler.trace(M(), (x, y)))
    assert s.total_macs == counter.get_total_flops() // 2 == 4 * (2 * 3 * 4 * 5) + 2 * (3 * 6 * 5)

    class Summed(nn.Module):
        def forward(self, bias, x, w):
            return torch.addbmm(bias, x, w)

    s = compiler.summarize(compiler.trace(Summed(), (torch.randn(6), x, torch.randn(2, 5, 6))))
    assert s.total_macs == 2 * 3 * 5 * 6


def test_an_einsum_of_three_operands_contracts_left_to_right():
    class M(nn.Module):
        def forward(self, x, y, z):
            return torch.einsum("bid,bjd,bjk->bik", x, y, z)

    s = compiler.summarize(compiler.trace(M(), (torch.randn(2, 3, 5), torch.randn(2, 4, 5), torch.randn(2, 4, 6))))
    assert s.total_macs == 2 * 3 * 4 * 5 + 2 * 3 * 4 * 6   # (x, y) over d, then (xy, z) over j

    class Broadcast(nn.Module):   # the output's "..." keeps x's two broadcast dims through both steps
        def forward(self, x, y, z):
            return torch.einsum("...i,jk,kl->...ijl", x, y, z)

    s = compiler.summarize(compiler.trace(Broadcast(), (torch.randn(2, 3, 4), torch.randn(5, 6), torch.randn(6, 7))))
    assert s.total_macs == 2 * 3 * 4 * 5 * 6 + 2 * 3 * 4 * 5 * 6 * 7
