"""Attention heads pruned whole (Michel et al., 2019): nn.MultiheadAttention rewritten into
HeadwiseAttention (exact), heads and the residual stream pruned independently, on hand-written
and torchvision models."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import codegen
import compiler
from compiler.coupling import CouplingAnalysis
from compiler.coupling_rules import HEADS
from compiler.ops.attention import HeadwiseAttention
from compiler.ops.window_attention import HeadwiseWindowAttention
from passes import ChannelPruning

from hf_models import hugging_face


def _inputs(batch_first, kdim, vdim, n=3, tq=5, tk=7):
    def make(t, d):
        return torch.randn(n, t, d) if batch_first else torch.randn(t, n, d)
    return make(tq, 16), make(tk, kdim or 16), make(tk, vdim or 16)


@pytest.mark.parametrize("batch_first, kv, need_weights, mask",
                         itertools.product([True, False], [None, (12, 20)], [True, False],
                                           ["none", "bool", "per-head", "padding"]))
def test_headwise_form_computes_what_multihead_attention_does(batch_first, kv, need_weights, mask):
    torch.manual_seed(0)
    kdim, vdim = kv or (None, None)
    m = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=vdim).eval()
    q, k, v = _inputs(batch_first, kdim, vdim)
    kw = {"none": {}, "bool": {"attn_mask": torch.rand(5, 7) > 0.7},
          "per-head": {"attn_mask": torch.randn(3 * 4, 5, 7)},
          "padding": {"key_padding_mask": torch.tensor([[False] * 6 + [True]] * 3)}}[mask]
    ref = m(q, k, v, need_weights=need_weights, **kw)
    got = HeadwiseAttention.from_torch(m).eval()(q, k, v, need_weights=need_weights, **kw)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)


def test_add_bias_kv_has_no_headwise_form_and_stays_frozen():
    with pytest.raises(ValueError, match="add_bias_kv"):
        HeadwiseAttention.from_torch(nn.MultiheadAttention(16, 4, add_bias_kv=True))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)
            self.attn = nn.MultiheadAttention(16, 4, add_bias_kv=True, batch_first=True)

        def forward(self, x):
            y = self.fc(x)
            return self.attn(y, y, y)[0]

    g = compiler.trace(Block().eval(), torch.randn(2, 5, 16))
    fc = next(gr for gr in CouplingAnalysis(g).groups if any(m == "fc" for m, _ in gr.producers))
    assert not fc.prunable and any("MultiheadAttention" in why for why in fc.frozen)


class Encoder(nn.Module):
    """Pre-norm encoder block with a per-head mask: the residual stream, the heads and the MLP
    hidden width are three groups."""

    def __init__(self, dim=32, heads=8):
        super().__init__()
        self.embed = nn.Linear(12, dim)
        self.ln1, self.attn = nn.LayerNorm(dim), nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        x = x + self.fc2(torch.relu(self.fc1(self.ln2(x))))
        return self.head(x.mean(1))


def _attention_macs(graph):
    return next(layer.macs for layer in compiler.summarize(graph).layers if layer.name == "attn")


def test_half_the_heads_pruned_exactly_cut_attention_macs_by_half():
    """Heads whose output columns are zero contribute nothing: pruning them is exact. Only the
    heads group is pruned here (the others excluded), so the attention MACs fall with the heads."""
    torch.manual_seed(0)
    g = compiler.trace(Encoder().eval(), torch.randn(2, 6, 12))
    analysis = CouplingAnalysis(g)
    heads = next(gr for gr in analysis.groups if any(m.endswith(HEADS) for m, _ in gr.producers))
    assert heads.prunable and heads.size == 8
    with torch.no_grad():   # heads 1, 3, 5, 7 (4 wide) read nothing and write nothing
        for h in (1, 3, 5, 7):
            g.module.attn.out_proj.weight[:, 4 * h:4 * h + 4] = 0
            g.module.attn.in_proj_weight[64 + 4 * h:64 + 4 * h + 4] = 0
    g.propagate_shapes()
    ref = g.run_example()
    pruned = ChannelPruning(ratio=0.5, exclude=("embed", "fc1"))(g)
    attn = pruned.module.attn
    assert isinstance(attn, HeadwiseAttention) and attn.num_heads == 4 and attn.head_index.tolist() == [0, 2, 4, 6]
    torch.testing.assert_close(pruned.run_example(), ref, atol=1e-5, rtol=1e-5)
    assert _attention_macs(pruned) <= 0.55 * _attention_macs(g)


def test_residual_stream_heads_and_mlp_prune_together_and_build():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 12)
    g = compiler.trace(Encoder().eval(), x)
    pruned = ChannelPruning(ratio=0.5)(g)
    attn = pruned.module.attn
    assert attn.num_heads == 4 and attn.q_proj.in_features == 16 and attn.out_proj.out_features == 16
    assert pruned.module.fc1.out_features == 32 and pruned.run_example().shape == (2, 3)
    with torch.no_grad():
        ref = pruned.module(x).numpy()
    got = codegen.build(pruned, "llvm")(x)
    np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())
    again = ChannelPruning(ratio=0.5)(pruned)   # a HeadwiseAttention prunes again
    assert again.module.attn.num_heads == 2 and again.run_example().shape == (2, 3)


@pytest.mark.parametrize("criterion", ["l1", "fpgm", "random", "taylor", "thinet", "slimming"])
def test_every_criterion_runs_on_attention(criterion):
    """Heads are scored by their weights' norms, Michel et al.'s importance (taylor) or at random;
    thinet and slimming have nothing to say about heads and leave them whole."""
    torch.manual_seed(0)
    g = compiler.trace(Encoder().eval(), torch.randn(4, 6, 12))
    batches = tuple((torch.randn(4, 6, 12), torch.randint(0, 3, (4,))) for _ in range(2))
    pruned = ChannelPruning(ratio=0.5, criterion=criterion,
                            calibration=batches if criterion in ("taylor", "thinet") else ())(g)
    assert pruned.run_example().shape == (4, 3)
    heads = getattr(pruned.module.attn, "num_heads")
    assert heads == (8 if criterion in ("thinet", "slimming") else 4)


@pytest.mark.parametrize("hand_written", [False, True])
def test_michel_head_importance_prunes_the_heads_that_do_not_matter(hand_written):
    """Heads whose output the model ignores (zero output columns) have zero importance, whatever
    their weights' norms (made large here, so l1 would keep them): taylor prunes exactly those."""
    torch.manual_seed(0)
    if hand_written:
        model, x, fixed = hugging_face("bert")
        g = compiler.trace(model.eval(), x, concrete_args=fixed)
        attn, out, dead = g.module.get_submodule("encoder.layer.0.attention.self"), \
            g.module.get_submodule("encoder.layer.0.attention.output.dense"), (1, 2)
        batches = tuple((torch.randint(0, 100, (2, 8)), None) for _ in range(2))
        with torch.no_grad():
            for h in dead:
                attn.value.weight[8 * h:8 * h + 8] *= 50
                out.weight[:, 8 * h:8 * h + 8] = 0
        kept = lambda p: p.module.get_submodule("encoder.layer.0.attention.self.value").weight  # noqa: E731
    else:
        g = compiler.trace(Encoder().eval(), torch.randn(4, 6, 12))
        g.module.attn = HeadwiseAttention.from_torch(g.module.attn)
        dead = (2, 5, 6, 7)
        batches = tuple((torch.randn(4, 6, 12), None) for _ in range(2))
        with torch.no_grad():
            for h in dead:
                g.module.attn.v_proj.weight[4 * h:4 * h + 4] *= 50
                g.module.attn.out_proj.weight[:, 4 * h:4 * h + 4] = 0
        kept = lambda p: p.module.attn.v_proj.weight  # noqa: E731
    g.propagate_shapes()
    large = kept(g).abs().max() / 2   # only the enlarged rows reach this
    others = tuple(m for gr in CouplingAnalysis(g).groups for m, _ in gr.producers
                   if not (m.endswith(HEADS) or gr.head_width))
    pruned = ChannelPruning(ratio=0.5, criterion="taylor", calibration=batches, exclude=others)(g)
    assert kept(pruned).abs().max() < large   # the enlarged (dead) heads are gone
    by_norm = ChannelPruning(ratio=0.5, criterion="l1", exclude=others)(g)
    assert kept(by_norm).abs().max() > large   # while their weights' norms would have kept them


def _small_swin(v2: bool):
    from squeezer.torchvision_compat import import_torchvision

    swin = import_torchvision().models.swin_transformer
    torch.manual_seed(0)
    extra = {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2} if v2 else {}
    model = swin.SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4],
                                 window_size=[4, 4], num_classes=10, **extra).eval()
    return model, torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("v2", [False, True])
def test_swin_window_attention_becomes_headwise_exactly(v2):
    from passes.headwise_forms import headwise_forms

    model, x = _small_swin(v2)
    g = compiler.trace(model, x)
    ref = g.run_example()
    assert headwise_forms(g) == 4
    assert sum(isinstance(m, HeadwiseWindowAttention) for m in g.module.modules()) == 4
    torch.testing.assert_close(g.run_example(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("v2", [False, True])
def test_swin_prunes_heads_stream_and_mlp_exactly_where_channels_are_dead(v2):
    """Heads that write nothing (zero output columns) are pruned exactly; at ratio 0.5 the whole
    model keeps at most 0.35 of its parameters (the 10-class head keeps its outputs)."""
    from passes.headwise_forms import headwise_forms

    model, x = _small_swin(v2)
    g = compiler.trace(model, x)
    headwise_forms(g)
    layer = g.module.get_submodule("features.1.1.attn")
    with torch.no_grad():
        layer.proj.weight[:, 12:] = 0   # head 1 of 2 (12 wide) writes nothing
    g.propagate_shapes()
    ref = g.run_example()
    others = [m for gr in CouplingAnalysis(g).groups for m, _ in gr.producers if m != "features.1.1.attn" + HEADS]
    only_heads = ChannelPruning(ratio=0.5, exclude=tuple(others))(g)
    assert only_heads.module.get_submodule("features.1.1.attn").num_heads == 1
    torch.testing.assert_close(only_heads.run_example(), ref, atol=1e-5, rtol=1e-5)
    pruned = ChannelPruning(ratio=0.5)(g)
    params = [sum(p.numel() for p in m.module.parameters()) for m in (g, pruned)]
    assert params[1] <= 0.35 * params[0] and pruned.run_example().shape == (2, 10)


@pytest.mark.slow
def test_a_pruned_swin_builds_and_matches_torch():
    model, x = _small_swin(False)
    pruned = ChannelPruning(ratio=0.5)(compiler.trace(model, x))
    with torch.no_grad():
        ref = pruned.module(x).numpy()
    got = codegen.build(pruned, "llvm")(x)
    np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("name", ["bert", "vit", "llama"])
def test_hand_written_attention_prunes_whole_heads_exactly(name):
    """Hugging Face's BERT, ViT and Llama (rotary embeddings): q, k, v Linear layers, a view into
    heads, SDPA, a view back. Heads whose value rows and output columns are zero are pruned
    exactly, whole, and the attention's MACs halve with them."""
    model, x, fixed = hugging_face(name)
    g = compiler.trace(model.eval(), x, concrete_args=fixed)
    analysis = CouplingAnalysis(g)
    groups = [gr for gr in analysis.groups if any(m.rsplit(".", 1)[-1] in ("query", "q_proj") for m, _ in gr.producers)]
    assert len(groups) == 2 and all(gr.prunable and len(gr.classes) == 4 for gr in groups)
    assert groups[0].classes[1] == list(range(8, 16))   # a head's 8 channels are one unit
    with torch.no_grad():
        for gr in groups:
            value = g.module.get_submodule(next(m for m, _ in gr.producers if m.rsplit(".", 1)[-1] in ("value", "v_proj")))
            out = g.module.get_submodule(next(c.module for c in gr.consumers if c.role == "in"))
            for h in (1, 3):
                value.weight[8 * h:8 * h + 8] = 0
                if value.bias is not None:
                    value.bias[8 * h:8 * h + 8] = 0
                out.weight[:, 8 * h:8 * h + 8] = 0
    g.propagate_shapes()
    ref = g.run_example()["last_hidden_state"]
    others = tuple(m for gr in analysis.groups if gr not in groups for m, _ in gr.producers)
    pruned = ChannelPruning(ratio=0.5, exclude=others)(g)
    assert all(pruned.module.get_submodule(m).out_features == 16 for gr in groups for m, _ in gr.producers)
    torch.testing.assert_close(pruned.run_example()["last_hidden_state"], ref, atol=1e-5, rtol=1e-5)
    attention = [sum(layer.macs for layer in compiler.summarize(m).layers if "attention" in layer.name or "attn" in layer.name)
                 for m in (g, pruned)]
    assert attention[1] <= 0.55 * attention[0]


def test_gpt2_fused_qkv_conv1d_prunes_whole_heads_exactly():
    """GPT-2: one Conv1D (a Linear stored (in, out)) makes q, k and v, split by columns; a head is
    its q, k and v columns of that one layer and its rows of the output Conv1D."""
    model, ids, fixed = hugging_face("gpt2")
    g = compiler.trace(model, ids, concrete_args=fixed)
    analysis = CouplingAnalysis(g)
    heads = [gr for gr in analysis.groups if any(m.endswith("attn.c_attn") for m, _ in gr.producers)]
    assert len(heads) == 2 and all(gr.prunable and gr.size == 96 and len(gr.classes) == 4 for gr in heads)
    with torch.no_grad():
        for layer in range(2):
            attn = g.module.get_submodule(f"h.{layer}.attn")
            for h in (1, 3):
                attn.c_attn.weight[:, 64 + 8 * h:64 + 8 * h + 8] = 0   # v's columns
                attn.c_attn.bias[64 + 8 * h:64 + 8 * h + 8] = 0
                attn.c_proj.weight[8 * h:8 * h + 8] = 0
    g.propagate_shapes()
    ref = g.run_example()["last_hidden_state"]
    others = tuple(m for gr in analysis.groups if gr not in heads for m, _ in gr.producers)
    pruned = ChannelPruning(ratio=0.5, exclude=others)(g)
    attn = pruned.module.get_submodule("h.0.attn")
    assert tuple(attn.c_attn.weight.shape) == (32, 48) and attn.c_attn.nf == 48 and tuple(attn.c_proj.weight.shape) == (16, 32)
    torch.testing.assert_close(pruned.run_example()["last_hidden_state"], ref, atol=1e-5, rtol=1e-5)
    mlp = ChannelPruning(ratio=0.5)(g).module.get_submodule("h.0.mlp.c_fc")
    assert mlp.nf == 64 and ChannelPruning(ratio=0.5)(g).run_example()["last_hidden_state"].shape == (2, 8, 32)


@pytest.mark.parametrize("name", ["bert", "vit", "llama"])
def test_a_head_pruned_hugging_face_model_builds_and_matches_torch(name):
    """Outputs returned as a dict build as a tuple of its tensors by sorted key, named by key (one
    tensor: that tensor). Llama needed cumsum of a bool mask lowered in int64, as torch sums it."""
    model, x, fixed = hugging_face(name)
    pruned = ChannelPruning(ratio=0.5)(compiler.trace(model.eval(), x, concrete_args=fixed))
    compiled = codegen.build(pruned, "llvm")
    with torch.no_grad():
        ref = pruned.module(x)
    got = compiled(x)
    got = got if isinstance(got, tuple) else (got,)
    assert [spec["name"] for spec in compiled.outputs] == sorted(ref)
    for value, key in zip(got, sorted(ref)):
        np.testing.assert_allclose(value, ref[key].numpy(), atol=1e-4 * float(ref[key].abs().max()))


class LiteralGQA(nn.Module):
    """Grouped-query attention written with literal sizes: 4 query heads share 2 kv heads."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 16)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 4).transpose(1, 2)
        k = self.k(x).view(b, t, 2, 4).transpose(1, 2)[:, :, None, :, :].expand(b, 2, 2, t, 4).reshape(b, 4, t, 4)
        v = self.v(x).view(b, t, 2, 4).transpose(1, 2)[:, :, None, :, :].expand(b, 2, 2, t, 4).reshape(b, 4, t, 4)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, 16))


class TupleShapeHeads(nn.Module):
    """Older Hugging Face code: ``t.view(t.size()[:-1] + (heads, d))``, the literal inside a tuple."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        def split(t):
            return t.view(t.size()[:-1] + (4, 4)).permute(0, 2, 1, 3)
        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        a = a.permute(0, 2, 1, 3).contiguous()
        return self.o(a.view(a.size()[:-2] + (16,)))


def test_literal_kv_head_counts_follow_the_kept_groups_exactly():
    """expand's and the merging view's literal kv-head counts are rewritten with the kept groups."""
    torch.manual_seed(0)
    model = LiteralGQA().eval()
    with torch.no_grad():   # kv group 1: query heads 2, 3 write nothing, kv head 1 reads nothing
        model.v.weight[4:8] = 0
        model.v.bias[4:8] = 0
        model.o.weight[:, 8:16] = 0
    x = torch.randn(2, 5, 16)
    g = compiler.trace(model, x)
    pruned = ChannelPruning(ratio=0.5)(g)
    assert (pruned.module.q.out_features, pruned.module.k.out_features) == (8, 4)
    torch.testing.assert_close(pruned.module(x), model(x), atol=1e-5, rtol=1e-5)


def test_a_literal_head_count_inside_a_shape_tuple_freezes_instead_of_breaking():
    torch.manual_seed(0)
    g = compiler.trace(TupleShapeHeads().eval(), torch.randn(2, 5, 16))
    result = ChannelPruning(ratio=0.5).apply(g)
    assert any("inside a shape tuple" in why for _, why in result.report.skipped)
    assert result.graph.run_example().shape == (2, 5, 16)


def _small_model(kind: str):
    if kind != "maxvit":
        return _small_swin(kind == "swin_v2")
    from squeezer.torchvision_compat import import_torchvision

    torch.manual_seed(0)
    model = import_torchvision().models.maxvit.MaxVit(input_size=(32, 32), stem_channels=8, partition_size=4,
                                                       block_channels=[16], block_layers=[1], head_dim=8,
                                                       stochastic_depth_prob=0.0, num_classes=10)
    return model.eval(), torch.randn(1, 3, 32, 32)


@pytest.mark.parametrize("kind", ["swin", "swin_v2", "maxvit"])
def test_summary_counts_every_mac_of_windowed_attention(kind):
    """Swin calls its attention as one fx-wrapped function and MaxViT takes QK^T and AV with einsum:
    summarize counted neither (Swin-T read 2.96 GMACs of 4.49), so a pruned model's MAC ratio
    was taken against too small a dense model. Now the traced model counts what torch's
    FlopCounterMode counts (2 flops a MAC), and so does the headwise form channel pruning rewrites
    it into, less Swin V2's position-bias MLP, which that form computes once, not per call."""
    from torch.utils.flop_counter import FlopCounterMode

    from passes.headwise_forms import headwise_forms

    model, x = _small_model(kind)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    g = compiler.trace(model, x)
    layers = compiler.summarize(g).layers
    assert sum(layer.macs for layer in layers) == counter.get_total_flops() // 2
    position_mlp = sum(layer.macs for layer in layers if ".cpb_mlp." in layer.name)
    assert (position_mlp > 0) == (kind == "swin_v2")
    assert headwise_forms(g) > 0
    assert compiler.summarize(g).total_macs == counter.get_total_flops() // 2 - position_mlp


@pytest.mark.parametrize("embed, heads, ratio, kept", [(128, 4, 0.5, 2), (96, 8, 0.5, 4), (96, 8, 0.3, 8)])
def test_round_to_counts_a_heads_channels(embed, heads, ratio, kept):
    """``round_to`` rounds what the heads' channels add up to, not the head count: 4 heads of 32 at
    round_to=16 keep 2 (rounding the count itself up to 16 had kept every head of ViT-B, Swin-T and
    MaxViT-T); heads of 12 go 4 at a time (48 channels), so 8 of them at ratio 0.3 stay 8."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(embed, heads, batch_first=True)
            self.head = nn.Linear(embed, 10)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0])

    torch.manual_seed(0)
    g = compiler.trace(Block().eval(), torch.randn(2, 5, embed))
    pruned = ChannelPruning(ratio=ratio, round_to=16)(g)
    attn = pruned.module.get_submodule("attn")
    assert attn.num_heads == kept and attn.num_heads * attn.head_dim % 16 == 0
    assert pruned.run_example().shape == (2, 5, 10)
