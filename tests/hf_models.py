"""Small Hugging Face models built from configs (random weights, nothing downloaded), shared by the
tests: (model, example input, the concrete_args tracing needs)."""

from __future__ import annotations

import pytest
import torch

HF_MODELS = ("bert", "gpt2", "vit", "llama")
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def transformers():
    """The transformers package (skips the test where it is not installed)."""
    from squeezer.torchvision_compat import import_torchvision

    import_torchvision()   # transformers imports torchvision when it is installed
    return pytest.importorskip("transformers")


def hugging_face(name: str, kv_heads: int = 4):
    tf = transformers()
    torch.manual_seed(0)
    if name == "bert":
        model, x, fixed = tf.BertModel(tf.BertConfig(vocab_size=100, max_position_embeddings=64, **SMALL)), \
            torch.randint(0, 100, (2, 8)), {}
    elif name == "gpt2":
        model, x, fixed = tf.GPT2Model(tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4)), \
            torch.randint(0, 100, (2, 8)), {"use_cache": False}
    elif name == "vit":
        model, x, fixed = tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=8, **SMALL)), torch.randn(2, 3, 32, 32), {}
    elif name == "llama":
        config = tf.LlamaConfig(vocab_size=100, max_position_embeddings=64, num_key_value_heads=kv_heads, **SMALL)
        model, x, fixed = tf.LlamaModel(config), torch.randint(0, 100, (2, 8)), {"use_cache": False}
    else:
        raise ValueError(name)
    return model.eval(), x, fixed
