"""Channel pruning over coupling groups: exact when the pruned channels are zero, runs on every
architecture of the foundation set, criteria pick what their papers say, clear errors."""

import numpy as np
import pytest
from tiers import sweep
import torch
import torch.nn.functional as F
from torch import nn

import codegen
import compiler
from squeezer import zoo
from compiler.coupling import CouplingAnalysis
from compiler.coupling_rules import HEADS
from passes import ChannelPruning


def _local(analysis, group, space, channels):
    """``channels`` (the group's numbering) that belong to ``space``, numbered in its own root."""
    off = group.offset(analysis.find(space))
    if off is None:
        return []
    return [c - off for c in channels if off <= c < off + analysis.spaces.size[analysis.find(space)]]


def _zero_channels(graph, analysis, group, channels):
    """Make ``channels`` of ``group`` contribute nothing: zero filters, biases and norm entries."""
    all_channels = channels
    with torch.no_grad():
        for name, space in group.producers:
            channels = _local(analysis, group, space, all_channels)
            if name.endswith(HEADS):   # an attention layer's heads: their share of the output projection
                m = graph.module.get_submodule(name[: -len(HEADS)])
                d = m.out_proj.in_features // m.num_heads
                for h in channels:
                    m.out_proj.weight[:, h * d:(h + 1) * d] = 0
                continue
            m = graph.module.get_submodule(name)
            m = getattr(m, "out_proj", m)   # an attention layer's output channels are its projection's
            m.weight[channels] = 0
            if m.bias is not None:
                m.bias[channels] = 0
        for c in group.consumers:
            if c.role == "tensor":   # a parameter used functionally: zero its entries on c.dim
                t = _attr(graph.module, c.module)
                for pos in _positions_of(analysis, group, c, channels):
                    t.select(c.dim, pos).zero_()
                continue
            m = graph.module.get_submodule(c.module)
            if c.role != "param":
                continue
            for seg in c.layout:  # positions of this group's channels in the consumer
                channels = _local(analysis, group, seg.space, all_channels)
                pos = sum(s.length for s in c.layout[: c.layout.index(seg)])
                idx = [pos + ch - seg.start for ch in channels if seg.start <= ch < seg.start + seg.length]
                for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
                    if t is not None and t.dim() > 0 and t.dtype.is_floating_point and t is not getattr(m, "running_var", None):
                        t[idx] = 0


def _attr(module, name):
    owner, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner), attr)


def _positions_of(analysis, group, consumer, channels):
    """Positions on the consumer's axis of ``channels`` of ``group``."""
    out, pos = [], 0
    for seg in consumer.layout:
        out += [pos + (ch - seg.start) * seg.repeat + r for ch in _local(analysis, group, seg.space, channels)
                if seg.start <= ch < seg.start + seg.length for r in range(seg.repeat)]
        pos += seg.length * seg.repeat
    return out


def _has_layernorm_consumer(graph, group):
    """LayerNorm/GroupNorm statistics include zero channels, so pruning them is not exact there."""
    owners = [c.module.rpartition(".")[0] if c.role == "tensor" else c.module for c in group.consumers]
    return any(isinstance(graph.module.get_submodule(m), (nn.LayerNorm, nn.GroupNorm)) for m in owners)


def _half_channels(group):
    """At least half of the group's channels in whole classes of tied channels, never the first
    class (so something stays): the pass at ratio 0.5 prunes a subset of these."""
    chosen = []
    for cls in group.classes[1:]:
        if len(chosen) >= group.size // 2:
            break
        chosen += cls
    return chosen


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_pruning_zero_channels_is_exact(name):
    e = zoo.get(name)
    x = e.example_inputs(batch=2)
    g = compiler.trace(e.build(), x)
    analysis = CouplingAnalysis(g)
    excluded = []
    for group in analysis.groups:
        if not group.prunable:
            continue
        if _has_layernorm_consumer(g, group):  # LayerNorm statistics change with the feature count
            excluded += [m for m, _ in group.producers]
            continue
        _zero_channels(g, analysis, group, _half_channels(group))
    g.propagate_shapes()
    ref = g.run_example()
    pruned = ChannelPruning(ratio=0.5, exclude=tuple(excluded))(g)
    out = pruned.run_example()
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if any(gr.prunable and not _has_layernorm_consumer(g, gr) and gr.size > 1 for gr in analysis.groups):
        assert compiler.summarize(pruned).total_params < compiler.summarize(g).total_params


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_half_pruning_runs_keeps_outputs_and_reduces_cost(name):
    e = zoo.get(name)
    x = e.example_inputs(batch=2)
    g = compiler.trace(e.build(), x)
    pruned = ChannelPruning(ratio=0.5)(g)
    out = pruned.run_example()
    assert out.shape == g.run_example().shape
    before, after = compiler.summarize(g), compiler.summarize(pruned)
    report = pruned.reports[-1]
    if report.changed:
        assert after.total_params < before.total_params and after.total_macs < before.total_macs
    else:  # nothing provably prunable: every group is listed with its reason
        assert report.skipped and all(reason for _, reason in report.skipped)


def test_attention_is_left_frozen_and_says_why():
    e = zoo.get("attention")
    report = ChannelPruning(ratio=0.5)(compiler.trace(e.build(), e.example_inputs())).reports[-1]
    reasons = " ".join(r for _, r in report.skipped)
    assert "scaled_dot_product_attention" in reasons or "not understood" in reasons


def test_groups_tie_residual_concat_and_shared_modules():
    g = compiler.trace(zoo.get("residual").build(), zoo.get("residual").example_inputs())
    groups = g.channel_groups()
    tied = next(gr for gr in groups if {"stem.0", "block1.conv2"} <= {m for m, _ in gr.producers})
    assert tied.size == 16 and "produced by stem.0" in tied.describe()
    g = compiler.trace(zoo.get("concat").build(), zoo.get("concat").example_inputs())
    post_in = [c for gr in g.channel_groups() for c in gr.consumers if c.module == "post"]
    assert [(s.length) for s in post_in[0].layout] == [8, 16, 8]  # cat offsets
    g = compiler.trace(zoo.get("shared-module").build(), zoo.get("shared-module").example_inputs())
    shared = next(gr for gr in g.channel_groups() if any(m == "shared" for m, _ in gr.producers))
    assert {m for m, _ in shared.producers} == {"stem", "shared"}


def test_flatten_to_linear_removes_hw_columns_per_channel():
    e = zoo.get("lenet5")
    g = compiler.trace(e.build(), e.example_inputs())
    pruned = ChannelPruning(ratio=0.5)(g)
    conv2, fc1 = pruned.module.get_submodule("conv2"), pruned.module.get_submodule("fc1")
    assert conv2.out_channels == 8 and fc1.in_features == 8 * 25


class TwoFilters(nn.Module):
    def __init__(self, rows):
        super().__init__()
        self.a = nn.Linear(4, len(rows), bias=False)
        self.b = nn.Linear(len(rows), 2, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor(rows))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _kept_rows(criterion, rows, seed=0):
    g = compiler.trace(TwoFilters(rows), torch.randn(1, 4))
    pruned = ChannelPruning(ratio=0.5, criterion=criterion, seed=seed)(g)
    return [tuple(round(v, 4) for v in r.tolist()) for r in pruned.module.get_submodule("a").weight]


def test_l1_and_l2_criteria_pick_the_filters_their_norms_say():
    rows = [[3.0, 0, 0, 0], [1.0, 1.0, 1.0, 1.0], [0.1, 0.1, 0, 0], [5.0, 0, 0, 0]]
    # L1: [3, 4, 0.2, 5] -> keep rows 1 and 3.  L2: [3, 2, 0.14, 5] -> keep rows 0 and 3.
    assert _kept_rows("l1", rows) == [tuple(rows[1]), tuple(rows[3])]
    assert _kept_rows("l2", rows) == [tuple(rows[0]), tuple(rows[3])]


def test_random_criterion_is_seeded():
    rows = [[float(i), 0, 0, 0] for i in range(1, 9)]
    assert _kept_rows("random", rows, seed=1) == _kept_rows("random", rows, seed=1)
    assert any(_kept_rows("random", rows, seed=s) != _kept_rows("random", rows, seed=1) for s in range(2, 6))


def test_round_to_and_min_channels():
    g = compiler.trace(TwoFilters([[float(i)] * 4 for i in range(1, 17)]), torch.randn(1, 4))
    assert ChannelPruning(ratio=0.7, round_to=8)(g).module.get_submodule("a").out_features == 8
    assert ChannelPruning(ratio=0.99, min_channels=3)(g).module.get_submodule("a").out_features == 3


class NarrowThenWide(nn.Module):
    """A 32-channel stem before a 128-channel layer: the narrow group at round_to=16 can only keep
    16 or 32 channels."""

    def __init__(self):
        super().__init__()
        self.stem, self.wide, self.head = nn.Conv2d(3, 32, 3), nn.Conv2d(32, 128, 1), nn.Conv2d(128, 10, 1)

    def forward(self, x):
        return self.head(torch.relu(self.wide(torch.relu(self.stem(x)))))


@pytest.mark.parametrize("options, stem, wide", [
    (dict(ratio=0.33), 16, 96),                 # keep 22 of 32: up would keep all 32 (no cut): 16 is nearer
    (dict(ratio=0.25), 32, 96),                 # keep 24: 16 and 32 equally near, up wins the tie
    (dict(ratio=0.1), 32, 112),                 # keep 29 of 32 (32 is nearer), 116 of 128 (112 is)
    (dict(ratio=0.33, min_channels=17), 32, 96),   # 16 is under min_channels
    (dict(ratio=0.33, scope="global", max_layer_ratio=0.4), 16, 96),
])
def test_rounding_never_cancels_a_ratios_cut(options, stem, wide):
    """``round_to`` rounds a kept count up, except where that keeps the whole group although the
    ratio prunes part of it: there the nearer multiple below is kept (and a unit, and min_channels)."""
    torch.manual_seed(0)
    g = compiler.trace(NarrowThenWide().eval(), torch.randn(1, 3, 8, 8))
    pruned = ChannelPruning(round_to=16, **options)(g).module
    assert (pruned.stem.out_channels, pruned.wide.out_channels) == (stem, wide)


def test_target_macs_prunes_a_narrow_group_that_rounding_up_would_keep_whole():
    torch.manual_seed(0)
    g = compiler.trace(NarrowThenWide().eval(), torch.randn(1, 3, 16, 16))
    out = ChannelPruning(target_macs=0.5, round_to=16)(g)
    assert out.module.stem.out_channels == 16 and compiler.summarize(out).total_macs <= 0.5 * compiler.summarize(g).total_macs


def test_a_threshold_only_rounds_up():
    """Every channel scoring above the threshold stays, so rounding may only add channels."""
    g = compiler.trace(TwoFilters([[float(i)] * 4 for i in range(1, 17)]), torch.randn(1, 4))
    assert ChannelPruning(threshold=5.0 * 4, criterion="l1", round_to=8)(g).module.get_submodule("a").out_features == 16


def test_bad_options_and_names():
    for bad in (dict(ratio=1.0), dict(ratio=-0.1), dict(criterion="taylor-ish"), dict(round_to=0),
                dict(exclude="fc1"), dict(scope="world"), dict(overrides=("fc1",)), dict(overrides=("fc1=1.5",)),
                dict(target_macs=1.0), dict(max_layer_ratio=1.0)):
        with pytest.raises(compiler.OptionError):
            ChannelPruning(**bad)
    e = zoo.get("lenet5")
    with pytest.raises(compiler.OptionError, match="'exclude/overrides'='nope.*'"):
        ChannelPruning(exclude=("nope.*",))(compiler.trace(e.build(), e.example_inputs()))
    with pytest.raises(compiler.OptionError, match="fc3 produces the model output"):
        ChannelPruning(overrides=("fc3=0.5",))(compiler.trace(e.build(), e.example_inputs()))
    assert compiler.parse_pass_spec("channel-pruning:ratio=0.25,criterion=l2") == ChannelPruning(ratio=0.25, criterion="l2")


@pytest.mark.parametrize("name", sweep(["residual", "concat", "squeeze-excite"], quick=["squeeze-excite"]))
def test_pruned_model_compiles_and_matches_pytorch(name):
    e = zoo.get(name)
    x = e.example_inputs(batch=2)
    pruned = ChannelPruning(ratio=0.5)(compiler.trace(e.build(), x))
    np.testing.assert_allclose(codegen.build(pruned)(*x), pruned.run_example().numpy(), atol=1e-4)


def test_fpgm_prunes_the_filter_nearest_the_geometric_median():
    rows = [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0.6, 0.6, 0, 0], [3.0, 3.0, 0, 0]]
    g = compiler.trace(TwoFilters(rows), torch.randn(1, 4))
    def kept(criterion):
        w = ChannelPruning(ratio=0.25, criterion=criterion)(g).module.a.weight
        return [tuple(round(v, 4) for v in r.tolist()) for r in w]

    kept_fpgm, kept_l1 = kept("fpgm"), kept("l1")
    assert tuple(rows[2]) not in kept_fpgm and len(kept_fpgm) == 3  # the "median" filter is redundant
    assert tuple(rows[2]) in kept_l1  # while its norm is not the smallest


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


def test_slimming_keeps_the_channels_with_large_bn_scale():
    model = ConvBN().eval()
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([0.1, 2.0, 0.05, 1.0]))
    g = compiler.trace(model, torch.randn(1, 2, 3, 3))
    pruned = ChannelPruning(ratio=0.5, criterion="slimming")(g)
    assert pruned.module.bn.weight.tolist() == [2.0, 1.0]
    lin = compiler.trace(TwoFilters([[1.0] * 4] * 4), torch.randn(1, 4))
    report = ChannelPruning(ratio=0.5, criterion="slimming")(lin).reports[-1]
    assert any("no BatchNorm scaling factor" in reason for _, reason in report.skipped)


def test_slimming_penalty_drives_gammas_down():
    from compiler.finetune import TrainConfig, train
    from passes.channel_pruning import slimming_penalty

    model = ConvBN()
    assert torch.isclose(slimming_penalty(model, 0.5), 0.5 * model.bn.weight.abs().sum())
    data = [(torch.randn(8, 2, 3, 3), torch.zeros(8, dtype=torch.long)) for _ in range(4)]

    class Pool(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x).mean((2, 3))

    before = model.bn.weight.abs().sum().item()
    train(Pool(model), data, TrainConfig(epochs=20, lr=1e-2, progress=False,
                                         regularizer=lambda m: slimming_penalty(m, 1.0)))
    assert model.bn.weight.abs().sum().item() < before * 0.5


def test_taylor_prunes_channels_without_activation_or_gradient():
    model = TwoFilters([[1.0, 0.5, 0, 0], [0, 0, 0, 0], [0.3, 1.0, 0, 0], [0.5, 0.5, 0.5, 0]])
    with torch.no_grad():
        model.b.weight.copy_(torch.tensor([[1.0, 1.0, 0.0, 1.0], [-1.0, 0.5, 0.0, 2.0]]))
    x = torch.rand(16, 4) + 0.1
    g = compiler.trace(model, x)
    batches = ((x, torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(0))),)
    pruned = ChannelPruning(ratio=0.5, criterion="taylor", calibration=batches)(g)
    # channel 1 has no activation, channel 2 no gradient (b ignores it): both go
    assert [r.tolist() for r in pruned.module.a.weight] == [[1.0, 0.5, 0, 0], [0.5, 0.5, 0.5, 0]]
    assert "calibration" not in ChannelPruning(criterion="taylor", calibration=batches).spec()


def test_overrides_apply_per_layer_pattern():
    e = zoo.get("lenet5")
    g = compiler.trace(e.build(), e.example_inputs())
    pruned = ChannelPruning(ratio=0.5, overrides=("conv*=0.0", "fc2=0.75"))(g)
    m = pruned.module
    assert m.conv1.out_channels == 6 and m.conv2.out_channels == 16  # conv* kept whole
    assert m.fc1.out_features == 60 and m.fc2.out_features == 21     # 0.5 default, 0.75 override


def test_global_scope_prunes_weak_groups_more_with_a_cap():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.b = nn.Linear(8, 8)
            self.c = nn.Linear(8, 2)
            with torch.no_grad():  # group a: one strong channel among weak; group b: uniform
                self.a.weight.copy_(torch.cat([torch.full((1, 4), 10.0), torch.full((7, 4), 0.01)]))
                self.b.weight.fill_(1.0)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    g = compiler.trace(Two(), torch.randn(1, 4))
    pruned = ChannelPruning(ratio=0.5, scope="global", max_layer_ratio=0.75)(g)
    # 8 of 16 channels go; a's weak ones first (normalized score << 1), capped at 75 % = 6
    assert pruned.module.a.out_features == 2 and pruned.module.b.out_features == 6


def test_mac_target_is_met():
    e = zoo.get("residual")
    g = compiler.trace(e.build(), e.example_inputs())
    before = compiler.summarize(g).total_macs
    pruned = ChannelPruning(target_macs=0.5)(g)
    after = compiler.summarize(pruned).total_macs
    assert after <= 0.5 * before and after >= 0.3 * before  # met, without overshooting wildly
    with pytest.raises(compiler.PassError, match="out of reach"):
        ChannelPruning(target_macs=0.5, exclude=("block*",))(g)


def test_thinet_keeps_what_reconstructs_the_next_layer_and_rescales():
    """Channels 2 and 3 duplicate channels 0 and 1 at half strength (and feed the next layer through
    the same weights): ThiNet drops the copies and its least-squares step folds their contribution
    into the kept channels (scale 1.5), so the output is unchanged."""
    torch.manual_seed(0)
    a = nn.Linear(3, 4, bias=False)
    with torch.no_grad():
        base = torch.tensor([[1.0, 0.2, 0.0], [0.0, 1.0, 0.5]])
        a.weight.copy_(torch.cat([base, 0.5 * base]))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = a
            self.b = nn.Linear(4, 3, bias=False)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Net().eval()
    with torch.no_grad():
        model.b.weight[:, 2:] = model.b.weight[:, :2]
    x = torch.rand(64, 3)
    g = compiler.trace(model, x)
    pruned = ChannelPruning(ratio=0.5, criterion="thinet", calibration=((x, None),))(g)
    assert pruned.module.a.out_features == 2
    torch.testing.assert_close(pruned.module(x), model(x), atol=1e-4, rtol=1e-4)
    # L1 would keep the strong pair too, but without rescaling the output changes
    l1 = ChannelPruning(ratio=0.5, criterion="l1")(g)
    assert (l1.module(x) - model(x)).abs().max() > 1e-2


@pytest.mark.parametrize("name", sweep(["residual", "concat", "lenet5", "unet"], quick=["concat"]))
def test_thinet_runs_on_coupled_architectures(name):
    e = zoo.get(name)
    x = e.example_inputs(batch=4)
    g = compiler.trace(e.build(), x)
    pruned = ChannelPruning(ratio=0.5, criterion="thinet", calibration=((x[0], None),))(g)
    assert pruned.run_example().shape == g.run_example().shape
    assert compiler.summarize(pruned).total_macs < compiler.summarize(g).total_macs


@pytest.mark.slow
def test_iterative_prune_with_distillation_reaches_the_mac_target_and_keeps_accuracy():
    from squeezer.data import mnist_subset
    from compiler.finetune import TrainConfig, batches_of, evaluate, train
    from passes import iterative_prune

    (xtr, ytr), (xte, yte) = mnist_subset()
    model = zoo.get("lenet5").build()
    data = batches_of(xtr, ytr, 64, shuffle=True)
    train(model, data, TrainConfig(epochs=2, lr=2e-3, progress=False))
    base_acc = evaluate(model, batches_of(xte, yte, 250))
    g = compiler.trace(model, xte[:1])
    pruned = iterative_prune(g, ChannelPruning(target_macs=0.5), steps=2, batches=data,
                             config=TrainConfig(epochs=1, lr=1e-3, progress=False))
    assert compiler.summarize(pruned).total_macs <= 0.5 * compiler.summarize(g).total_macs
    assert evaluate(pruned.module, batches_of(xte, yte, 250)) >= base_acc - 0.02
    with pytest.raises(ValueError, match="steps"):
        iterative_prune(g, ChannelPruning(), steps=0, batches=data)


class ChunkNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.left = nn.Conv2d(8, 8, 3, padding=1)
        self.right = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        a, b = torch.relu(self.stem(x)).chunk(2, dim=1)
        return self.head(torch.cat([self.left(a), self.right(b)], dim=1))


@pytest.mark.parametrize("name", ["split", "chunk"])
def test_split_and_chunk_sizes_follow_the_pruned_channels(name):
    if name == "split":
        e = zoo.get("split")
        model, x = e.build(), e.example_inputs(batch=2)
        stem, consumers = "stem.0", ["conv_a", "conv_b"]
    else:
        model, x = ChunkNet().eval(), (torch.randn(2, 3, 8, 8),)
        stem, consumers = "stem", ["left", "right"]
    g = compiler.trace(model, x)
    pruned = ChannelPruning(ratio=0.5)(g)
    split = next(n for n in pruned.module.graph.nodes if n.target is torch.split)
    sizes = split.args[1]
    assert sum(sizes) == pruned.module.get_submodule(stem).out_channels < g.module.get_submodule(stem).out_channels
    assert sizes == [pruned.module.get_submodule(c).in_channels for c in consumers] and min(sizes) >= 1
    assert pruned.run_example().shape == g.run_example().shape


@pytest.mark.parametrize("family", ["vgg", "densenet", "mobilenetv3", "squeezenet", "resnext", "convnext",
                                    "efficientnet", "wide-resnet", "mobilenetv2", "shufflenetv2",
                                    "shufflenetv1-groupnorm", "regnet", "mnasnet", "inception", "vit", "swin"])
def test_classification_families_prune_and_stay_exact_on_zero_channels(family):
    from classification_families import FAMILIES

    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    x = torch.randn(2, 3, 32, 32)
    g = compiler.trace(model, x)
    pruned = ChannelPruning(ratio=0.5)(g)
    assert pruned.run_example().shape == g.run_example().shape
    report = pruned.reports[-1]
    assert report.changed or report.skipped
    if report.changed:
        assert compiler.summarize(pruned).total_macs < compiler.summarize(g).total_macs
    # exactness: zero half of every prunable group's channels (no LayerNorm consumers), prune them
    analysis = CouplingAnalysis(g)
    excluded = []
    for group in analysis.groups:
        if group.prunable and not _has_layernorm_consumer(g, group):
            _zero_channels(g, analysis, group, _half_channels(group))
        elif group.prunable:
            excluded += [m for m, _ in group.producers]
    g.propagate_shapes()
    ref = g.run_example()
    out = ChannelPruning(ratio=0.5, exclude=tuple(excluded))(g).run_example()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


class ShuffleAfterGroupedConv(nn.Module):
    """ShuffleNet V1's grouped 1x1 -> channel shuffle, read by a dense conv (a permuted layout)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.g1 = nn.Conv2d(12, 12, 1, groups=3)
        self.bn = nn.BatchNorm2d(12)
        self.post = nn.Conv2d(12, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        from classification_families import channel_shuffle

        y = channel_shuffle(torch.relu(self.bn(self.g1(torch.relu(self.stem(x))))), 3)
        return self.head(torch.relu(self.post(y)).mean((2, 3)))


def _exact_after_zeroing(model, x, **options):
    g = compiler.trace(model.eval(), x)
    analysis = CouplingAnalysis(g, whole_groups=ChannelPruning(ratio=0.5, **options).whole_groups)
    for group in analysis.groups:
        if group.prunable:
            _zero_channels(g, analysis, group, _half_channels(group))
    g.propagate_shapes()
    pruned = ChannelPruning(ratio=0.5, **options)(g)
    torch.testing.assert_close(pruned.run_example(), g.run_example(), atol=1e-5, rtol=1e-5)
    return g, pruned


def test_channel_shuffle_prunes_tied_channels_and_permutes_the_consumer():
    torch.manual_seed(0)
    g, pruned = _exact_after_zeroing(ShuffleAfterGroupedConv(), torch.randn(2, 3, 8, 8))
    group = next(gr for gr in g.channel_groups() if any(m == "g1" for m, _ in gr.producers))
    assert group.prunable and sorted(len(c) for c in group.classes) == [3] * 4   # channel l of each group tied
    assert group.classes[0] == [0, 4, 8] and "unit(s) of tied channels" in group.describe()
    post_in = next(c for c in group.consumers if c.module == "post")
    assert [(s.start, s.length) for s in post_in.layout[:4]] == [(0, 1), (4, 1), (8, 1), (1, 1)]  # shuffled
    g1 = pruned.module.get_submodule("g1")
    assert g1.groups == 3 and g1.out_channels == 6 and pruned.module.get_submodule("post").in_channels == 6
    # a criterion that scores channels unevenly still yields balanced, consistent groups
    out = ChannelPruning(ratio=0.5, criterion="random", seed=3)(g)
    assert out.run_example().shape == g.run_example().shape and out.module.get_submodule("g1").out_channels % 3 == 0


def test_grouped_conv_keeps_equal_groups_with_matching_inputs():
    from classification_families import RegNetYBlock, ResNeXtBlock

    torch.manual_seed(0)
    _, pruned = _exact_after_zeroing(ResNeXtBlock(), torch.randn(2, 3, 16, 16))
    b = pruned.module.get_submodule("b.0")
    assert (b.groups, b.in_channels, b.out_channels) == (8, 16, 16)
    assert tuple(b.weight.shape) == (16, 2, 3, 3)
    _, pruned = _exact_after_zeroing(RegNetYBlock(), torch.randn(2, 3, 32, 32))
    b = pruned.module.get_submodule("b.0")
    assert b.groups == 6 and b.in_channels == b.out_channels == 24


def test_narrow_groups_are_pruned_whole_so_round_to_holds():
    """A group narrower than two multiples of round_to cannot narrow and keep whole vectors
    (RegNet's 16-channel groups at round_to=16 kept 11 channels each): under grouped_convs=auto
    such a conv keeps or removes whole groups, inputs and outputs together; pruning groups that
    contribute nothing is exact, and the compiled model matches."""
    from classification_families import RegNetYBlock, ResNeXtBlock

    torch.manual_seed(0)
    _, pruned = _exact_after_zeroing(ResNeXtBlock(), torch.randn(2, 3, 16, 16), round_to=4)
    b = pruned.module.get_submodule("b.0")
    assert (b.groups, b.in_channels, b.out_channels, tuple(b.weight.shape)) == (4, 16, 16, (16, 4, 3, 3))
    x = torch.randn(2, 3, 32, 32)
    _, pruned = _exact_after_zeroing(RegNetYBlock(), x, round_to=8)
    b = pruned.module.get_submodule("b.0")
    assert (b.groups, b.in_channels, b.out_channels, tuple(b.weight.shape)) == (3, 24, 24, (24, 8, 3, 3))
    assert pruned.module.get_submodule("a.0").out_channels == 24 and pruned.module.get_submodule("c.0").in_channels == 24
    narrowed = ChannelPruning(ratio=0.5, round_to=8, grouped_convs="channels")(compiler.trace(RegNetYBlock().eval(), x))
    assert narrowed.module.get_submodule("b.0").groups == 6   # the same local channels of every group
    for criterion in ("l2", "random", "fpgm"):
        out = ChannelPruning(target_macs=0.5, round_to=8, criterion=criterion)(compiler.trace(RegNetYBlock().eval(), x))
        b = out.module.get_submodule("b.0")
        assert b.in_channels // b.groups == 8 and b.in_channels % 8 == 0
        np.testing.assert_allclose(codegen.build(out)(x), out.run_example().numpy(), atol=1e-4)


def test_groups_narrowed_in_place_keep_whole_multiples_of_round_to():
    """A grouped conv narrowed in every group (16-wide groups at round_to=8, wide enough to narrow)
    keeps round_to channels a group, not round_to in all: RegNet's groups kept 11 or 12 channels
    (vectors of 1 or 6 lanes), and the pruned regnet_x_400mf ran as slow as the dense one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1, groups=4), nn.ReLU(),
                          nn.Conv2d(64, 8, 1)).eval()
    x = torch.randn(1, 3, 12, 12)
    g = compiler.trace(model, (x,))
    for ratio in (0.3, 0.5, 0.7):
        for mode in ("channels", "auto"):
            out = ChannelPruning(ratio=ratio, round_to=8, grouped_convs=mode)(g)
            conv = out.module.get_submodule("2")
            assert conv.groups == 4 and conv.in_channels // 4 in (8, 16), (ratio, mode, conv)
    assert out.module.get_submodule("2").in_channels == 32   # 0.7: half of each group
    np.testing.assert_allclose(codegen.build(out)(x), out.run_example().numpy(), atol=1e-4)


def test_grouped_convs_option_is_checked():
    with pytest.raises(Exception, match="grouped_convs"):
        ChannelPruning(grouped_convs="halves")


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x)))).mean((2, 3))


def test_groupnorm_groups_stay_equal():
    g = compiler.trace(GroupNormNet().eval(), torch.randn(2, 3, 8, 8))
    group = next(gr for gr in g.channel_groups() if any(m == "conv" for m, _ in gr.producers))
    assert group.classes[0] == [0, 4, 8, 12]
    pruned = ChannelPruning(ratio=0.5)(g)
    norm = pruned.module.get_submodule("norm")
    assert (norm.num_groups, norm.num_channels, norm.weight.shape[0]) == (4, 8, 8)
    assert pruned.run_example().shape == (2, 4)
    # the pruned GroupNorm normalizes the kept channels over the same groups as a reference would
    keep = [c for c in range(16) if c in {int(i) for i in _kept(g, pruned)}]
    conv = g.module.get_submodule("conv")
    ref_conv = nn.Conv2d(3, 8, 3, padding=1)
    ref_conv.weight.data, ref_conv.bias.data = conv.weight[keep].detach(), conv.bias[keep].detach()
    x = g.example_inputs[0]
    ref = F.group_norm(ref_conv(x), 4, g.module.norm.weight[keep], g.module.norm.bias[keep])
    got = pruned.module.norm(pruned.module.conv(x))
    torch.testing.assert_close(got, ref)


def _kept(g, pruned):
    """Which original filters of ``conv`` survive (matched by their weights)."""
    old, new = g.module.get_submodule("conv").weight, pruned.module.get_submodule("conv").weight
    return [next(i for i in range(old.shape[0]) if torch.equal(old[i], row)) for row in new]


class LiteralViews(nn.Module):
    """Classic LeNet code: ``x.view(-1, 16 * 4 * 4)`` with the size written out."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 5)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(F.max_pool2d(torch.relu(self.conv(x)), 6).view(-1, 16 * 4 * 4))


def test_literal_view_sizes_follow_the_pruned_channels():
    torch.manual_seed(0)
    _, pruned = _exact_after_zeroing(LiteralViews(), torch.randn(2, 1, 28, 28))
    view = next(n for n in pruned.module.graph.nodes if n.target == "view")
    assert CouplingAnalysis.view_dims(view) == [-1, 8 * 16] and pruned.module.fc.in_features == 128


def test_mac_target_through_split_uses_each_trial_sizes():
    e = zoo.get("split")
    g = compiler.trace(e.build(), e.example_inputs(batch=2))
    pruned = ChannelPruning(target_macs=0.4)(g)
    assert compiler.summarize(pruned).total_macs <= 0.6 * compiler.summarize(g).total_macs
    assert pruned.run_example().shape == g.run_example().shape


@pytest.mark.parametrize("family", sweep(["regnet", "shufflenet-v1-shuffle"], quick=["shufflenet-v1-shuffle"]))
def test_pruned_grouped_and_shuffled_models_compile_and_match_pytorch(family):
    from classification_families import RegNetYBlock

    torch.manual_seed(0)
    model = RegNetYBlock() if family == "regnet" else ShuffleAfterGroupedConv()
    x = (torch.randn(2, 3, 16, 16),)
    pruned = ChannelPruning(ratio=0.5)(compiler.trace(model.eval(), x))
    np.testing.assert_allclose(codegen.build(pruned)(*x), pruned.run_example().numpy(), atol=1e-4)


class IndexedGroupsView(nn.Module):
    """A (groups, channels) view indexed per group, and a mean over the channel axis."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.c4, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(64, 4)

    def forward(self, x):
        z = self.c1(x).view(x.shape[0], 2, 4, 8, 8)
        a = self.c2(z[:, 0]) + self.c3(z[:, 1])
        return a.mean((2, 3)), self.fc(self.c4(x).mean(1).flatten(1))


def test_unfollowed_uses_of_views_and_channel_reductions_freeze_instead_of_breaking():
    g = compiler.trace(IndexedGroupsView(), (torch.randn(2, 3, 8, 8),))
    pruned = ChannelPruning(ratio=0.5)(g)
    for a, b in zip(pruned.run_example(), g.run_example()):
        assert a.shape == b.shape
    frozen = {m for m, _ in pruned.reports[-1].skipped}
    assert "c1" in frozen and "c4" in frozen


def test_a_new_op_is_one_row_of_the_op_table(monkeypatch):
    """An op the coupling analysis does not know freezes what it touches; one row saying channels
    pass through it (as a ReLU) makes the layers around it prunable."""
    from compiler import op_table

    class Square(nn.Module):
        squeezer_leaf = True   # one call_module node, as a library layer is

        def forward(self, x):
            return x * x

    model = nn.Sequential(nn.Conv2d(3, 8, 3), Square(), nn.Conv2d(8, 4, 3)).eval()
    g = compiler.trace(model, (torch.randn(1, 3, 8, 8),))
    first = next(gr for gr in g.channel_groups() if any(m == "0" for m, _ in gr.producers))
    assert not first.prunable and "Square is not understood" in first.describe()
    monkeypatch.setitem(op_table.MODULES, Square, op_table.OpRule(op_table.Channels.ELEMENTWISE))
    first = next(gr for gr in g.channel_groups() if any(m == "0" for m, _ in gr.producers))
    assert first.prunable and any(c.module == "2" for c in first.consumers)
    assert ChannelPruning(ratio=0.5)(g).module.get_submodule("0").out_channels == 4


class ViewsLikeAnother(nn.Module):
    """``y.view(z.size())``: y's channel count is z's, so neither can be pruned alone."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.c(self.a(x).view(self.b(x).size()) * 2)


def test_a_view_sized_by_another_tensors_shape_freezes_both():
    g = compiler.trace(ViewsLikeAnother().eval(), torch.randn(2, 8))
    pruned = ChannelPruning(ratio=0.5)(g)
    assert pruned.module.a.out_features == 8
    torch.testing.assert_close(pruned.run_example(), g.run_example())
