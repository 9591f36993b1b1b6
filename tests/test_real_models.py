"""Real torchvision classifiers (random weights, nothing downloaded), small inputs to stay within
CI's time: traced, built for the CPU and compared against torch (≤ 1e-4 × max |ref|), dense and
channel-pruned. The full-size suite with timings is ``python -m benchmarks real-models``."""

import numpy as np
import pytest
import torch

import codegen
import compiler
from squeezer.torchvision_compat import import_torchvision


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(import_torchvision().models, name)(weights=None).eval()


def _check(graph, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref = graph.module(x).numpy()
    got = codegen.build(graph, "llvm")(x)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_torchvision_imports_with_the_cpu_torch_and_its_ops_fail_clearly():
    tv = import_torchvision()
    assert tv.__version__.startswith("0.28")
    with pytest.raises(RuntimeError, match="Couldn't load custom C\\+\\+ ops"):   # torchvision's own check
        tv.ops.nms(torch.rand(3, 4), torch.rand(3), 0.5)
    with pytest.raises(NotImplementedError, match="torchvision::nms"):   # the schema alone: no kernel
        torch.ops.torchvision.nms(torch.rand(3, 4), torch.rand(3), 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("name, size", [("squeezenet1_1", 64), ("mobilenet_v3_small", 64)])
def test_a_real_classifier_builds_and_matches_torch(name, size):
    x = torch.randn(1, 3, size, size)
    _check(compiler.trace(_model(name), (x,)), x)


@pytest.mark.slow
def test_a_channel_pruned_real_classifier_builds_and_matches_its_torch_model():
    from passes import ChannelPruning

    x = torch.randn(1, 3, 64, 64)
    graph = ChannelPruning(target_macs=0.5)(compiler.trace(_model("resnet18"), (x,)))
    _check(graph, x)


@pytest.mark.parametrize("name, most", [("convnext_tiny", 0.29), ("efficientnet_b0", 0.33), ("vit_b_16", 0.30)])
def test_modern_blocks_prune_instead_of_freezing(name, most):
    """Channels-last LayerNorm + Linear blocks and layer scales (ConvNeXt), stochastic depth
    (EfficientNet), attention heads, class token and position embedding (ViT) are followed: at
    ratio=0.5 at most ``most`` of the parameters stay (Torch-Pruning 1.6.1 keeps 0.26 of
    ConvNeXt's and 0.26-0.32 of EfficientNet's, and fails on ViT)."""
    from passes import ChannelPruning

    graph = compiler.trace(_model(name), (torch.randn(1, 3, 224, 224),))
    pruned = ChannelPruning(ratio=0.5)(graph)
    params = [sum(p.numel() for p in g.module.parameters()) for g in (graph, pruned)]
    assert params[1] <= most * params[0]
    assert pruned.run_example().shape == (1, 1000)


@pytest.mark.slow
def test_a_head_pruned_vision_transformer_builds_and_matches_torch():
    from passes import ChannelPruning

    torch.manual_seed(0)
    vit = import_torchvision().models.vision_transformer.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128).eval()
    x = torch.randn(2, 3, 32, 32)
    graph = ChannelPruning(ratio=0.5)(compiler.trace(vit, (x,)))
    assert graph.module.get_submodule("encoder.layers.encoder_layer_0.self_attention").num_heads == 2
    _check(graph, x)
