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


@pytest.mark.parametrize("name, most", [("convnext_tiny", 0.29), ("efficientnet_b0", 0.33), ("vit_b_16", 0.30),
                                        ("shufflenet_v2_x1_5", 0.34)])
def test_modern_blocks_prune_instead_of_freezing(name, most):
    """Channels-last LayerNorm + Linear blocks and layer scales (ConvNeXt), stochastic depth
    (EfficientNet), attention heads, class token and position embedding (ViT), channel shuffles
    across blocks (ShuffleNet V2) are followed: at ratio=0.5 at most ``most`` of the parameters
    stay (Torch-Pruning 1.6.1 keeps 0.26 of ConvNeXt's and 0.26-0.32 of EfficientNet's, and fails
    on ViT and ShuffleNet V2)."""
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


def test_shufflenet_v2_stages_prune_whole_tied_channels_exactly():
    """torchvision's ShuffleNet V2 units chained: each shuffle ties a branch's channel to channels
    of earlier blocks (through a permutation), so the stage's spaces form one group of several
    members whose units are the tied classes. Zeroed classes prune away exactly, and the pruned
    model builds and matches torch."""
    from compiler.coupling import CouplingAnalysis
    from passes import ChannelPruning
    from test_channel_pruning import _zero_channels

    tv = import_torchvision()
    unit = tv.models.shufflenetv2.InvertedResidual
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 24, 3, 2, 1), unit(24, 48, 2), unit(48, 48, 1), unit(48, 48, 1),
                                unit(48, 48, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(48, 10)).eval()
    x = torch.randn(2, 3, 32, 32)
    g = compiler.trace(model, (x,))
    analysis = CouplingAnalysis(g)
    stage = next(gr for gr in analysis.groups if len(gr.members) > 1)
    assert stage.prunable and 1 < len(stage.classes) < stage.size
    pruned = ChannelPruning(ratio=0.5)(g)
    assert compiler.summarize(pruned).total_params < 0.5 * compiler.summarize(g).total_params
    _check(pruned, x)
    # every class but the first, zeroed until half the channels are: pruning removes only those
    chosen = [c for cls in stage.classes[1:] for c in cls][: stage.size // 2 + max(len(c) for c in stage.classes)]
    classes = [cls for cls in stage.classes[1:] if set(cls) <= set(chosen)]
    _zero_channels(g, analysis, stage, [c for cls in classes for c in cls])
    g.propagate_shapes()
    others = tuple(m for gr in analysis.groups if gr is not stage and gr.prunable for m, _ in gr.producers)
    exact = ChannelPruning(ratio=0.5, exclude=others)(g)
    assert compiler.summarize(exact).total_params < compiler.summarize(g).total_params
    torch.testing.assert_close(exact.run_example(), g.run_example(), atol=1e-5, rtol=1e-5)


def _small_maxvit() -> torch.nn.Module:
    torch.manual_seed(0)
    maxvit = import_torchvision().models.maxvit
    return maxvit.MaxVit(input_size=(32, 32), stem_channels=16, partition_size=4, block_channels=[32, 64],
                         block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10).eval()


def test_maxvit_attention_becomes_headwise_exactly_and_prunes():
    """MaxViT's RelativePositionalMultiHeadAttention reshapes its heads back to its input width:
    its traced body is replaced by a HeadwiseRelativeAttention (the same function), so heads, the
    stream (through window/grid partitions, swapaxes, channels-last LayerNorm) and the MLP prune."""
    from passes import ChannelPruning
    from passes.headwise_forms import headwise_forms
    from compiler.ops.relative_attention import HeadwiseRelativeAttention

    x = torch.randn(2, 3, 32, 32)
    g = compiler.trace(_small_maxvit(), (x,))
    rewritten = g.copy()
    assert headwise_forms(rewritten) == 4   # a window and a grid attention per block
    assert sum(isinstance(m, HeadwiseRelativeAttention) for m in rewritten.module.modules()) == 4
    torch.testing.assert_close(rewritten.run_example(), g.run_example(), atol=1e-6, rtol=1e-6)
    pruned = ChannelPruning(ratio=0.5)(g)
    assert not any("froze" in why or "not understood" in why for _, why in pruned.reports[-1].skipped)
    assert compiler.summarize(pruned).total_params < 0.35 * compiler.summarize(g).total_params
    heads = [m.num_heads for m in pruned.module.modules() if isinstance(m, HeadwiseRelativeAttention)]
    assert heads and all(h == 2 for h in heads[:2])   # 4 heads of 8 in the first block's attention
    _check(pruned, x)
