"""Hugging Face transformers (small configs, random weights): BERT, GPT-2, ViT and Llama take every
pass family — head + FFN pruning, low-rank SVD, unstructured and N:M sparsity, weight clustering,
BitNet b1.58 ternary layers — build with TVM and match torch; distillation recovers a compressed
BERT on a synthetic text task."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import codegen
import compiler
from compiler.finetune import TrainConfig, batches_of, evaluate, train
from compiler.linear_forms import as_linear
from compiler.ops.bitserial import BitConv2d, BitLinear
from compiler.ops.integer import IntLinear
from compiler.ops.lut_linear import LutLinear
from compiler.ops.sparse import SparseLinear
from passes import ChannelPruning
from passes.binarization import Binarize, QuantLinear

from hf_models import HF_MODELS, SMALL, hugging_face, transformers
from tiers import sweep

# spec -> the layer type that replaces the Linear layers (None: pruned in place)
FAMILIES = {
    "channel-pruning:ratio=0.5": None,
    "low-rank:rank_ratio=0.25": nn.Sequential,
    "sparsify:sparsity=0.9": SparseLinear,
    "sparsify:pattern=n:m": SparseLinear,
    "cluster:bits=4": LutLinear,
    "binarize:method=bitnet158,keep_first_last=false": BitLinear,
    "quantize": IntLinear,
}


def _outputs(graph, x):
    with torch.no_grad():
        ref = graph.module(x)
    return {k: ref[k].numpy() for k in sorted(ref)}


@pytest.mark.parametrize("name", sweep(HF_MODELS, quick=("gpt2",)))
def test_every_pass_family_rewrites_builds_and_matches_torch(name):
    """Each family rewrites the model's projections (GPT-2's Conv1D too, as the Linear it is) and
    the compiled model matches the compressed torch model: 1e-4 x max|ref| where the kernels
    compute the same arithmetic. BitNet's and int8's activation codes are steps: a last-bit
    difference upstream can move one code, so their whole-model bound is 1e-2 (each layer alone is
    exact, see test_bitnet_layer_kernel_matches_the_op and test_quantization.py)."""
    model, x, fixed = hugging_face(name)
    g = compiler.trace(model, x, concrete_args=fixed)
    projections = sum(1 for m in g.module.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
    for spec, kind in FAMILIES.items():
        out = compiler.parse_pass_spec(spec)(g)
        if kind is not None:
            rewritten = sum(1 for m in out.module.modules() if type(m) is kind)
            assert rewritten >= projections // 2, f"{spec}: {rewritten} of {projections} layers rewritten"
        else:
            assert compiler.summarize(out).total_macs < 0.8 * compiler.summarize(g).total_macs, spec
        ref = _outputs(out, x)
        got = codegen.build(out, "llvm")(x)
        got = got if isinstance(got, tuple) else (got,)
        bound = 1e-2 if "bitnet" in spec or "quantize" in spec else 1e-4
        for value, (key, want) in zip(got, ref.items()):
            np.testing.assert_allclose(value, want, atol=bound * np.abs(want).max(), err_msg=f"{spec}: {key}")


def _attention_macs(graph) -> int:
    return sum(layer.macs for layer in compiler.summarize(graph).layers
               if any(w in layer.name for w in ("attn", "attention", "matmul")))


@pytest.mark.parametrize("name", sweep(HF_MODELS, quick=("llama",)))
def test_half_the_heads_cut_attention_macs_by_at_least_45_percent(name):
    model, x, fixed = hugging_face(name)
    g = compiler.trace(model, x, concrete_args=fixed)
    names = [n for n, _ in g.module.named_modules()]
    mlp = tuple(f"*{w}*" for w in ("intermediate", "mlp") if any(w in n for n in names))
    pruned = ChannelPruning(ratio=0.5, exclude=mlp)(g)   # the heads (and the residual stream) only
    assert _attention_macs(pruned) <= 0.55 * _attention_macs(g)
    assert pruned.run_example().keys() == g.run_example().keys()


def test_gpt2_conv1d_becomes_the_same_linear():
    tf = transformers()
    conv = tf.pytorch_utils.Conv1D(24, 16)
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(as_linear(conv)(x), conv(x), atol=1e-6, rtol=1e-6)


# ---- BitNet --------------------------------------------------------------------------------------------
def _linear(out_f=16, in_f=48, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    return lin


def test_bitnet158_weights_are_absmean_ternary_and_activations_8bit_absmax_codes():
    """b1.58: W in gamma * {-1, 0, 1} with gamma = mean|W|, W/gamma rounded; activations per token
    x s rounded into [-128, 127], s = 127 / max|x| (the row's largest value hits 127)."""
    lin = _linear()
    q = Binarize(method="bitnet158", stage="train", keep_first_last=False)(
        compiler.trace(nn.Sequential(lin), (torch.randn(4, 48),))).module.get_submodule("0")
    assert isinstance(q, QuantLinear) and q.a_mode == "absmax" and q.a_bits == 8
    w = q.quant_weight().detach()
    gamma = lin.weight.abs().mean()
    torch.testing.assert_close(w, torch.round(lin.weight / gamma).clamp(-1, 1) * gamma)
    assert set(torch.unique(torch.round(w / gamma)).tolist()) == {-1.0, 0.0, 1.0}
    x = torch.randn(4, 48) * torch.tensor([[1.0], [10.0], [0.01], [3.0]])
    xq = q.quant_input(x)
    scale = 127 / x.abs().amax(-1, keepdim=True)
    codes = xq * scale
    torch.testing.assert_close(codes, torch.round(codes), atol=1e-4, rtol=0)
    assert codes.abs().amax(-1).tolist() == pytest.approx([127.0] * 4, abs=1e-3)
    torch.testing.assert_close(xq, torch.floor(x * scale + 0.5) / scale)


def test_bitnet_binary_weights_are_centred_signs_scaled_by_mean_abs():
    lin = _linear(seed=1)
    with torch.no_grad():
        lin.weight += 0.3   # off-centre: sign(W - mean W), not sign(W)
    q = QuantLinear.from_linear(lin, "bitnet", "absmax", 8, 2, abc_bases=1, ttq_threshold=0.05, inq_fraction=1.0)
    w = lin.weight.detach()
    torch.testing.assert_close(q.quant_weight().detach(),
                               torch.where(w >= w.mean(), 1.0, -1.0) * w.abs().mean())


@pytest.mark.parametrize("method", ["bitnet", "bitnet158"])
def test_bitnet_trains_packs_and_compiles_consistently(method):
    """The STE layer trains (gradients reach the latent weights through both quantizers), packs
    into 1 or 2 bit-planes computing the same outputs, and the compiled layer matches."""
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))
    x = torch.randn(6, 10, 64)
    g = compiler.trace(model, (x,))
    trained = Binarize(method=method, stage="train", keep_first_last=False)(g)
    trained.module.train()
    trained.module(x).sum().backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0
               for m in trained.module.modules() if isinstance(m, QuantLinear))
    trained.module.eval()
    packed = Binarize(method=method, keep_first_last=False)(trained)
    layers = [m for m in packed.module.modules() if isinstance(m, BitLinear)]
    assert len(layers) == 2 and all(m.planes == (1 if method == "bitnet" else 2) for m in layers)
    with torch.no_grad():
        ref_train, ref_packed = trained.run_example(), packed.run_example()
    torch.testing.assert_close(ref_packed, ref_train, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(codegen.build(packed)(x), ref_packed.numpy(), atol=1e-4 * float(ref_packed.abs().max()))
    assert compiler.summarize(packed).total_bytes < compiler.summarize(g).total_bytes / 8


def test_bitnet_layer_kernel_matches_the_op():
    """One layer, many tokens: the compiled absmax quantizer + ternary kernel against the op."""
    torch.manual_seed(0)
    layer = BitLinear(torch.rand(2, 64, 200) < 0.3, [1.0, -1.0], 0.0, torch.rand(64), torch.randn(64), "absmax", 8)
    x = torch.randn(300, 200) * torch.rand(300, 1) * 10
    x[0] = 0   # an all-zero row: the floor on max|x| keeps it zero
    with torch.no_grad():
        ref = layer(x).numpy()
    got = codegen.build(compiler.trace(nn.Sequential(layer), (x,)))(x)
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())


def test_bitnet_skips_convs_and_refuses_bad_activation_bits():
    g = compiler.trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 36, 10), nn.Linear(10, 4)),
                       (torch.randn(2, 3, 8, 8),))
    result = Binarize(method="bitnet158", keep_first_last=False).apply(g)
    out, report = result.graph, result.report
    assert isinstance(out.module.get_submodule("0"), nn.Conv2d)
    assert any("Linear layers only" in why for _, why in report.skipped)
    with pytest.raises(compiler.OptionError, match="a_bits"):
        Binarize(method="bitnet158", a_bits=1)
    with pytest.raises(ValueError, match="Linear layers only"):
        BitConv2d(torch.rand(1, 4, 3, 3, 3) < 0.5, [2.0], -1.0, torch.ones(4), None, a_mode="absmax", a_bits=8)


# ---- recovery fine-tuning with distillation on a text task ------------------------------------------------
def _counting_task(n: int, seed: int, vocab: int = 8, length: int = 16):
    """Label: does token 3 occur more often than token 4 (after the [CLS] position 0)?"""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (n, length), generator=gen)
    x[:, 0] = 0
    return x, ((x[:, 1:] == 3).sum(1) > (x[:, 1:] == 4).sum(1)).long()


@pytest.mark.slow
def test_distillation_recovers_a_bitnet_bert_on_a_text_task():
    """A 2-layer BERT classifier learns the task; BitNet b1.58 (every projection ternary, 8-bit
    activations) loses accuracy; Hinton distillation from the float teacher through the STE
    layers brings it back, and the packed, compiled model keeps it."""
    tf = transformers()
    torch.manual_seed(0)
    train_set, test_set = batches_of(*_counting_task(2048, 0), 64, shuffle=True), batches_of(*_counting_task(1024, 1), 64)
    config = tf.BertConfig(vocab_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    teacher = compiler.trace(tf.BertForSequenceClassification(config).eval(), train_set[0][0])
    train(teacher.module, train_set, TrainConfig(epochs=8, lr=2e-3, progress=False))
    float_acc = evaluate(teacher.module, test_set)
    assert float_acc >= 0.97
    student = Binarize(method="bitnet158", stage="train", keep_first_last=False)(teacher)
    before = evaluate(student.module, test_set)
    train(student.module, train_set, TrainConfig(epochs=3, lr=1e-3, progress=False), teacher=copy.deepcopy(teacher.module))
    after = evaluate(student.module, test_set)
    assert after >= max(before + 0.05, float_acc - 0.03), (float_acc, before, after)
    deployed = Binarize(method="bitnet158", keep_first_last=False)(student)
    assert evaluate(deployed.module, test_set) >= after - 0.01
    x = test_set[0][0]
    ref = deployed.module(x)["logits"].detach().numpy()
    np.testing.assert_allclose(codegen.build(deployed)(x), ref, atol=1e-2 * np.abs(ref).max())


# ---- the residual stream: embeddings, RMSNorm, patch flattening ---------------------------------------------
class _Tokens(nn.Module):
    """Token + position embeddings into a residual stream, a channels-last patch path, a head."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(50, 16), nn.Embedding(8, 16)
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.fc, self.head = nn.Linear(16, 16), nn.Linear(16, 5)

    def forward(self, ids, image):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))                 # (B, T, C)
        x = x + self.patch(image).flatten(2).transpose(1, 2)                      # (B, C, T) -> (B, T, C)
        return self.head(torch.relu(self.fc(x)) + x).mean(1)


def test_embedding_columns_and_flattened_patches_prune_exactly_where_channels_are_dead():
    torch.manual_seed(0)
    model = _Tokens().eval()
    dead = [1, 4, 6, 9, 10, 13, 14, 15]
    with torch.no_grad():   # dead residual channels: nothing writes them, nothing reads them
        for m in (model.tok, model.pos):
            m.weight[:, dead] = 0
        model.patch.weight[dead] = 0
        model.patch.bias[dead] = 0
        model.fc.weight[dead] = 0
        model.fc.bias[dead] = 0
        model.fc.weight[:, dead] = 0
        model.head.weight[:, dead] = 0
    ids, image = torch.randint(0, 50, (2, 8)), torch.randn(2, 3, 8, 16)
    g = compiler.trace(model, (ids, image))
    pruned = ChannelPruning(ratio=0.5)(g)
    assert pruned.module.tok.embedding_dim == 8 and pruned.module.pos.weight.shape == (8, 8)
    assert pruned.module.patch.out_channels == 8 and pruned.module.fc.weight.shape == (8, 8)
    torch.testing.assert_close(pruned.module(ids, image), model(ids, image), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_language_model_prunes_its_residual_stream_keeps_the_tied_head_and_builds(name):
    """The token embedding starts the residual stream; RMSNorm's mean of x² over the channels is a
    statistic (computed over the kept channels, as LayerNorm's are); GPT-2's final
    ``view(input_shape + (x.size(-1),))`` sizes the same channels; the language-model head shares
    the embedding's weight, and still does after pruning."""
    tf = transformers()
    torch.manual_seed(0)
    if name == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=100, max_position_embeddings=64, num_key_value_heads=4,
                                                   tie_word_embeddings=True, **SMALL))
        embed_name = "model.embed_tokens"
    else:
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4))
        embed_name = "transformer.wte"
    model, ids = model.eval(), torch.randint(0, 100, (2, 8))
    g = compiler.trace(model, ids, concrete_args={"use_cache": False})
    pruned = ChannelPruning(ratio=0.5)(g)
    embed, head = pruned.module.get_submodule(embed_name), pruned.module.get_submodule("lm_head")
    assert embed.weight.shape == (100, 16) and head.weight is embed.weight
    assert compiler.summarize(pruned).total_params < 0.45 * compiler.summarize(g).total_params
    with torch.no_grad():
        ref = pruned.module(ids)["logits"].numpy()
    np.testing.assert_allclose(codegen.build(pruned)(ids), ref, atol=1e-4 * np.abs(ref).max())


def test_grouped_query_attention_prunes_whole_kv_groups_exactly():
    """Llama with 4 query heads sharing 2 kv heads (repeat_kv: a new axis, expand, a view): query
    head h reads kv head h // 2, so a kv head and its two query heads are one unit across the
    q, k and v projections. A group whose value rows and output columns are zero prunes exactly,
    and the model still builds and matches torch."""
    from compiler.coupling import CouplingAnalysis

    model, x, fixed = hugging_face("llama", kv_heads=2)
    g = compiler.trace(model, x, concrete_args=fixed)
    analysis = CouplingAnalysis(g)
    groups = [gr for gr in analysis.groups if any(m.endswith("q_proj") for m, _ in gr.producers)]
    assert len(groups) == 2 and all(gr.prunable and gr.size == 32 + 16 + 16 and len(gr.classes) == 2 for gr in groups)
    with torch.no_grad():   # kv group 1: query heads 2 and 3 (output columns 16..31), kv head 1 (value rows 8..15)
        for layer in range(2):
            attn = g.module.get_submodule(f"layers.{layer}.self_attn")
            attn.v_proj.weight[8:16] = 0
            attn.o_proj.weight[:, 16:32] = 0
    g.propagate_shapes()
    ref = g.run_example()["last_hidden_state"]
    others = tuple(m for gr in analysis.groups if gr not in groups for m, _ in gr.producers)
    pruned = ChannelPruning(ratio=0.5, exclude=others)(g)
    attn = pruned.module.get_submodule("layers.0.self_attn")
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (16, 8, 8)
    torch.testing.assert_close(pruned.run_example()["last_hidden_state"], ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        want = pruned.module(x)["last_hidden_state"].numpy()
    np.testing.assert_allclose(codegen.build(pruned)(x), want, atol=1e-4 * np.abs(want).max())


def _vision(name: str):
    tf = transformers()
    if name == "swin":
        return tf.SwinForImageClassification(tf.SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1],
                                                           num_heads=[2, 4], window_size=4)), 64
    if name == "beit":
        return tf.BeitForImageClassification(tf.BeitConfig(image_size=32, patch_size=8, use_relative_position_bias=True,
                                                           **SMALL)), 32
    if name == "mobilevit":
        return tf.MobileViTForImageClassification(tf.MobileViTConfig(image_size=64)), 64
    return tf.SegformerForSemanticSegmentation(tf.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2],
        decoder_hidden_size=32, strides=[4, 2], patch_sizes=[7, 3])), 64


@pytest.mark.parametrize("name", sweep(["swin", "beit", "mobilevit", "segformer"], quick=("segformer",)))
def test_hugging_face_vision_models_trace_and_match(name):
    torch.manual_seed(0)
    model, size = _vision(name)
    x = torch.randn(1, 3, size, size)
    g = compiler.trace(model.eval(), (x,))
    with torch.no_grad():
        ref, out = model(x)["logits"], g.module(x)["logits"]
    torch.testing.assert_close(out, ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-4)
