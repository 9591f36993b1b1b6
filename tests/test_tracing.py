"""compiler.trace: exact on every structure of the foundation set, facts recorded, clear errors."""

import math
import operator

import networkx as nx
import pytest
import torch
from torch import nn

import compiler
from squeezer import zoo

from tiers import sweep


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_trace_preserves_outputs_exactly(name):
    entry = zoo.get(name)
    model = entry.build()
    x = entry.example_inputs(batch=2)
    g = compiler.trace(model, x)
    with torch.no_grad():
        assert torch.equal(g.module(*x), model(*x))
    # every tensor-producing node has a recorded shape and dtype
    for node in g.nodes:
        if node.op in ("placeholder", "call_module", "call_function", "call_method") and \
                node.meta.get("type") not in (int, float, bool, torch.Size):
            assert "shape" in node.meta, node.name
    assert tuple(next(iter(g.nodes)).meta["shape"]) == tuple(x[0].shape)


def test_zoo_covers_the_structures_the_issue_names():
    tags = {t for e in zoo.ZOO.values() for t in e.structures}
    text = " ".join(sorted(tags))
    for needle in ["residual", "concat", "depthwise", "group", "excit", "shuffle", "split", "flatten",
                   "shared", "attention", "upsample", "layernorm", "gelu"]:
        assert needle in text, needle


def test_networkx_view_is_the_dataflow():
    g = compiler.trace(zoo.get("residual").build(), zoo.get("residual").example_inputs())
    view = g.to_networkx()
    assert nx.is_directed_acyclic_graph(view)
    assert set(view.nodes) == {n.name for n in g.nodes}
    add = next(n for n in g.nodes if n.op == "call_function" and "add" in str(n.target))
    assert view.in_degree(add.name) == 2
    conv = next(n for n in g.nodes if n.op == "call_module")
    assert view.nodes[conv.name]["module_type"] == "Conv2d"


def test_copy_is_independent():
    g = compiler.trace(zoo.get("lenet5").build(), zoo.get("lenet5").example_inputs())
    c = g.copy()
    with torch.no_grad():
        next(c.module.parameters()).add_(1.0)
    assert not torch.equal(next(c.module.parameters()), next(g.module.parameters()))


def test_shape_propagation_does_not_touch_batchnorm_statistics():
    model = zoo.get("residual").build().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiler.trace(model, zoo.get("residual").example_inputs(batch=4))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Gate()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.block(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x * 2
        return x


def test_untraceable_model_names_module_line_and_remedy():
    with pytest.raises(compiler.TraceError) as info:
        compiler.trace(Branchy(), torch.randn(1, 4))
    msg = str(info.value)
    assert "'block'" in msg and "test_tracing.py" in msg and "x.sum() > 0" in msg
    assert "leaf_modules" in msg and "concrete_args" in msg


@pytest.mark.parametrize("leaf", [Gate, "block"])
def test_leaf_modules_make_it_traceable(leaf):
    model = Branchy()
    x = torch.randn(3, 4)
    g = compiler.trace(model, x, leaf_modules=[leaf])
    assert "block" in g.layers()
    assert torch.equal(g.module(x), model(x))


def test_concrete_args_fix_a_flag():
    class Flagged(nn.Module):
        def forward(self, x, double: bool = False):
            return x * 2 if double else x

    g = compiler.trace(Flagged(), torch.ones(2), concrete_args={"double": True})
    assert torch.equal(g.module(torch.ones(2)), torch.full((2,), 2.0))


def test_bad_inputs_are_named():
    with pytest.raises(compiler.TraceError, match="nn.Module"):
        compiler.trace(lambda x: x, torch.ones(1))
    with pytest.raises(compiler.TraceError, match="not submodules"):
        compiler.trace(Branchy(), torch.ones(1, 4), leaf_modules=["nope"])
    with pytest.raises(compiler.TraceError, match="example input 0"):
        compiler.trace(nn.Linear(2, 2), [3])


def test_graph_owns_its_weights_and_keeps_per_module_modes():
    model = zoo.get("residual").build().train()
    next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).eval()  # a frozen BN
    frozen = [m.training for m in model.modules()]
    g = compiler.trace(model, zoo.get("residual").example_inputs())
    with torch.no_grad():
        for p in g.module.parameters():
            p.add_(1.0)
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), g.module.parameters()))
    assert [m.training for m in model.modules()] == frozen
    assert g.module.training and any(not m.training for m in g.module.modules())
    g.run_example()
    assert any(not m.training for m in g.module.modules()) and g.module.training


class ShapeBranches(nn.Module):
    """Python code on shapes that plain torch.fx cannot trace: a branch on a size, a grid from
    math.sqrt, a buffer sliced by the sequence length (as Hugging Face models do), a loop over
    the dimensions, ``**kwargs`` in the signature."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("positions", torch.arange(64).float()[None, :, None])

    def forward(self, x, mask=None, **kwargs):
        n, t, c = x.shape
        if t % 2:                                   # pad odd lengths
            x = torch.nn.functional.pad(x, (0, 0, 0, 1))
            t = t + 1
        x = x + self.positions[:, :t]
        grid = int(math.sqrt(t))
        y = self.proj(x)[:, : grid * grid].reshape(n, grid, grid, c)
        for d in range(1, y.dim() - 1):
            y = y.flip(d)
        return y if mask is None else y * mask


@pytest.mark.parametrize("tokens", [9, 16])
def test_shape_dependent_python_is_specialized_on_the_example(tokens):
    model = ShapeBranches().eval()
    x = torch.randn(2, tokens, 4)
    g = compiler.trace(model, x)
    torch.testing.assert_close(g.module(x), model(x))
    other = torch.randn(3, tokens + 2, 4)
    with pytest.raises(AssertionError, match=rf"traced for input 'x' of shape \(2, {tokens}, 4\).*test_tracing.py"):
        g.module(other)
    # traced again for the other shape, it is right there
    torch.testing.assert_close(compiler.trace(model, other).module(other), model(other))


def test_a_model_without_shape_dependent_python_stays_general():
    """No specialization, no guard: a graph traced at batch 2 runs at batch 5 (fine-tuning uses
    other batch sizes than the example)."""
    model = zoo.get("lenet5").build()
    g = compiler.trace(model.eval(), torch.randn(2, 1, 28, 28))
    assert not any(n.target is torch._assert for n in g.module.graph.nodes)
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(g.module(x), model(x))


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_hugging_face_models_trace_and_match(name):
    """Built from small configs (nothing downloaded); decoders without a KV cache
    (``concrete_args={"use_cache": False}``: a cache object is not a tensor)."""
    from squeezer.torchvision_compat import import_torchvision

    import_torchvision()   # transformers imports torchvision when it is installed
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "bert":
        model, fixed = tf.BertModel(tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=64)), {}
    elif name == "gpt2":
        model, fixed = tf.GPT2Model(tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4)), {"use_cache": False}
    else:
        model, fixed = tf.LlamaModel(tf.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2,
                                                    intermediate_size=64)), {"use_cache": False}
    model.eval()
    ids = torch.randint(0, 100, (2, 8))
    g = compiler.trace(model, ids, concrete_args=fixed)
    torch.testing.assert_close(g.module(ids)["last_hidden_state"], model(ids).last_hidden_state)


def test_a_specialized_graph_saves_and_keeps_its_guard(tmp_path):
    """``x.shape`` is recorded as ``x.size()``, which a saved graph may name; the guard survives."""
    model = ShapeBranches().eval()
    x = torch.randn(2, 9, 4)
    g = compiler.trace(model, x)
    compiler.save(g, tmp_path / "g.safetensors")
    loaded = compiler.load(tmp_path / "g.safetensors")
    torch.testing.assert_close(loaded.run_example(), g.run_example())
    with pytest.raises(AssertionError, match="traced for input 'x' of shape"):
        loaded.module(torch.randn(2, 10, 4))


def test_tracing_leaves_batchnorm_statistics_alone_in_training_mode():
    """Tracing runs the model once on the example (to know its shapes): a BatchNorm in training
    mode would update its statistics; the traced graph's are the model's."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    g = compiler.trace(model, torch.randn(2, 3, 8, 8) * 5 + 3)
    bn = g.module.get_submodule("1")
    assert bn.num_batches_tracked.item() == 0 and torch.equal(bn.running_mean, torch.zeros(4))


@pytest.mark.parametrize("name", sweep(["convnext_atto", "swin_tiny_patch4_window7_224", "maxvit_nano_rw_256",
                                        "levit_128s", "eva02_tiny_patch14_224", "fastvit_t8", "efficientvit_b0",
                                        "mvitv2_tiny"], quick=("levit_128s",)))
def test_timm_models_trace_and_match(name):
    """timm's models (random weights) trace with their shape-dependent Python resolved for the
    example input, and the graph computes what the model does (the whole library, one model per
    architecture: ``python -m benchmarks trace-coverage``)."""
    from squeezer.torchvision_compat import import_torchvision

    import_torchvision()   # timm imports torchvision
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    g = compiler.trace(model, (x,))
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(g.module(x), ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-4)


class CastsToWeightDtype(nn.Module):
    """Hugging Face's ViT casts its input to ``projection.weight.dtype``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x.to(self.fc.weight.dtype))


def test_a_weight_read_for_its_dtype_stays_out_of_the_graph():
    """The dtype of a parameter is a constant of the model: read while tracing, so the graph does
    not hold the weight, and a pass may replace the layer that owns it."""
    from passes import Sparsify

    g = compiler.trace(CastsToWeightDtype(), torch.randn(2, 8))
    assert not any(n.op == "get_attr" for n in g.module.graph.nodes)
    out = Sparsify(sparsity=0.5)(g)
    assert out.run_example().shape == (2, 4)


class AutocastAndSetitem(nn.Module):
    """timm's EfficientViT (autocast by the input's device type) and MViTv2 (item assignment)."""

    def forward(self, x):
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = x.float() * 2
        y[:, 1:] = y[:, 1:] + torch.ones_like(y[:, 1:])
        return y.to(x.device) - 1


def test_device_type_reads_and_item_assignment_trace():
    x = torch.randn(2, 5)
    g = compiler.trace(AutocastAndSetitem(), x)
    assert any(n.target is operator.setitem for n in g.module.graph.nodes)
    assert any(n.target is getattr and n.args[1:] == ("device",) for n in g.module.graph.nodes)   # still follows the input
    x2 = torch.randn(2, 5)
    torch.testing.assert_close(g.module(x2), AutocastAndSetitem()(x2))


class Concat(nn.Module):
    """A ``forward(self, *xs)`` (a concatenation of any number of inputs)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 3)

    def forward(self, scale, *xs):
        return self.proj(torch.cat(xs, -1)) * scale


def test_star_args_inputs_are_traced_by_position():
    """Example inputs past the named parameters fill ``*xs`` (they were dropped, and the
    generated forward was a SyntaxError); no inputs at all is a clear error."""
    model = Concat().eval()
    args = (torch.tensor(2.0), torch.randn(2, 4), torch.randn(2, 8))
    g = compiler.trace(model, args)
    torch.testing.assert_close(g.module(*args), model(*args))
    with pytest.raises(compiler.TraceError, match="no example inputs"):
        compiler.trace(Concat().eval(), ())
