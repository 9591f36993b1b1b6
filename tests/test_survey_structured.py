"""Issue 23, the survey's remaining methods: Structured Sparsity Learning (Wen et al. 2016), Soft
Filter Pruning (He et al. 2018) and TernGrad (Wen et al. 2017), each tested on the property its
paper relies on. Small models on synthetic learnable data keep the file to seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.utils.data import TensorDataset

import compiler
from compiler.errors import OptionError, PassError
from compiler.finetune import TrainConfig, train
from compiler.grad_compression import clip_gradient, ternarize
from passes import ChannelPruning, GroupLasso, SoftFilterPruning, StructuredSparsity

ROOT = Path(__file__).resolve().parent.parent


def _lenet_task(n: int = 256):
    """LeNet-5 (conv → ReLU → pool ×2, three Linear) and a task it can learn (labels from a fixed
    random linear map of the inputs)."""
    from squeezer.zoo import LeNet5

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, 1, 28, 28, generator=gen)
    y = (x.reshape(n, -1) @ torch.randn(784, 10, generator=gen)).argmax(1)
    torch.manual_seed(0)
    model = LeNet5().eval()
    return compiler.trace(model, (x[:1],)), x, y


def _out(graph, x):
    with torch.no_grad():
        return graph.module.eval()(x)


# ---- SSL ----------------------------------------------------------------------------------------------
def _filter_rms(lasso: GroupLasso, model) -> torch.Tensor:
    return torch.cat([g.detach().pow(2).mean(1).sqrt() for kind, _, _, g in lasso.groups(model) if kind == "filter"])


def test_group_lasso_zeroes_whole_filters_and_their_removal_is_exact():
    graph, x, y = _lenet_task()
    plain, lasso_graph = graph.copy(), graph.copy()
    lasso = GroupLasso(lasso_graph, lambda_filter=2e-2, lambda_channel=2e-3)
    config = TrainConfig(epochs=4, lr=2e-3, batch_size=32, progress=False)
    train(plain.module, TensorDataset(x, y), config)
    train(lasso_graph.module, TensorDataset(x, y), TrainConfig(**{**config.__dict__, "regularizer": lasso}))
    near_zero = (_filter_rms(lasso, lasso_graph.module) <= 1e-2).sum()
    assert int((_filter_rms(lasso, plain.module) <= 1e-2).sum()) == 0   # plain training keeps every filter
    assert near_zero >= 20   # whole groups driven to (near) zero: the lasso's doing
    counts = lasso.zero_small_groups(lasso_graph.module, 1e-2)
    assert counts["filter"] == near_zero
    before = _out(lasso_graph, x[:64])
    pruned = ChannelPruning(criterion="zeroed", threshold=0.0)(lasso_graph)
    assert compiler.summarize(pruned).total_params < compiler.summarize(lasso_graph).total_params
    torch.testing.assert_close(_out(pruned, x[:64]), before, rtol=0, atol=1e-5)   # the groups were zero


def test_structured_sparsity_pass_from_a_spec():
    graph, x, y = _lenet_task()
    spec = compiler.parse_pass_spec("structured-sparsity:epochs=2,lambda_filter=0.02,lr=0.002")
    assert isinstance(spec, StructuredSparsity) and spec.spec() == "structured-sparsity:epochs=2,lr=0.002,lambda_filter=0.02"
    with pytest.raises(PassError, match="trains on data"):
        spec(graph)
    result = StructuredSparsity(epochs=4, batch_size=32, lambda_filter=0.02, lr=2e-3, train_data=(x, y)).apply(graph)
    assert result.changed and result.report.stats["removal_max_abs_change"] <= 1e-5
    assert compiler.summarize(result.graph).total_params < compiler.summarize(graph).total_params


@pytest.mark.parametrize("spec, option", [("structured-sparsity:lambda_filter=-1", "lambda_filter"),
                                          ("soft-filter-pruning:rate=1.0", "rate"),
                                          ("soft-filter-pruning:interval=0", "interval"),
                                          ("channel-pruning:threshold=-0.5", "threshold"),
                                          ("channel-pruning:threshold=0,target_macs=0.5", "threshold")])
def test_bad_options_name_the_option(spec, option):
    with pytest.raises(OptionError, match=f"'{option}'"):
        compiler.parse_pass_spec(spec)
    with pytest.raises(OptionError, match="grad_compression"):
        TrainConfig(grad_compression="onebit").validate()


# ---- Soft Filter Pruning ----------------------------------------------------------------------------------
def test_soft_pruned_filters_keep_learning_and_come_back():
    """The paper's defining property: a zeroed filter stays in the model, gets gradient updates and
    is non-zero again at the next epoch's end (a hard-pruned one is gone for good)."""
    graph, x, y = _lenet_task()
    pruner = SoftFilterPruning(rate=0.5).callback(graph, steps_per_epoch=8)
    zeroed = pruner.zero_weakest(graph.module)
    conv1 = pruner.groups[0]
    assert conv1.filters[0].module == "conv1" and len(zeroed[0]) == 3
    assert float(conv1.filter_norms(graph.module)[zeroed[0]].max()) == 0.0
    alive = zeroed[0][graph.module.conv1.bias.detach()[zeroed[0]] > 0]   # a ReLU passes their gradient
    assert len(alive)
    graph.module.train()
    torch.nn.functional.cross_entropy(graph.module(x[:32]), y[:32]).backward()
    assert float(graph.module.conv1.weight.grad[alive].abs().sum()) > 0   # gradients reach zeroed filters
    graph.module.zero_grad()
    train(graph.module, TensorDataset(x, y), TrainConfig(epochs=1, batch_size=32, progress=False))   # one epoch
    assert float(conv1.filter_norms(graph.module)[alive].min()) > 0   # non-zero again: they may be kept


def test_soft_filter_pruning_removes_exactly_the_zeroed_filters():
    graph, x, y = _lenet_task()
    pruner = SoftFilterPruning(rate=0.5, epochs=2).callback(graph, steps_per_epoch=8)
    train(graph.module, TensorDataset(x, y), TrainConfig(epochs=2, batch_size=32, step_callback=pruner, progress=False))
    assert len(pruner.zeroed) == 2   # once per epoch
    for params, chans in zip(pruner.groups, pruner.zeroed[-1]):
        params.zero_channels(graph.module, chans)
    before = _out(graph, x[:64])
    pruned = ChannelPruning(criterion="zeroed", threshold=0.0)(graph)
    widths = [pruned.module.conv1.out_channels, pruned.module.conv2.out_channels, pruned.module.fc1.out_features]
    assert widths == [3, 8, 60]
    torch.testing.assert_close(_out(pruned, x[:64]), before, rtol=0, atol=1e-5)
    result = SoftFilterPruning(rate=0.5, epochs=2, train_data=(x, y)).apply(graph)   # the pass does the same
    assert result.report.stats["removal_max_abs_change"] <= 1e-5 and result.report.stats["zeroings"] == 2


# ---- TernGrad -------------------------------------------------------------------------------------------
def test_terngrad_is_ternary_and_unbiased():
    g = torch.randn(2000, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 1, 2000)
    gen = torch.Generator().manual_seed(1)
    s = g.abs().max()
    draws = torch.stack([ternarize(g, generator=gen) for _ in range(3000)])
    assert set(torch.unique(draws).tolist()) <= {-float(s), 0.0, float(s)}
    err = (draws.mean(0) - g).abs()
    # each entry's mean of 3000 draws: std = sqrt(|g|(s - |g|) / 3000) <= s / (2·sqrt(3000)) ≈ 0.009 s
    assert float(err.max()) < 0.05 * float(s) and float(err.mean()) < 0.01 * float(s)
    clipped = ternarize(g, clip=2.5, generator=gen)
    bound = float(2.5 * g.std(unbiased=False))
    levels = torch.unique(clipped.abs())
    assert levels[0] == 0 and len(levels) == 2 and float(levels[1]) == pytest.approx(bound, rel=1e-5)
    assert float(clip_gradient(g, 2.5).abs().max()) == pytest.approx(bound)


def test_terngrad_trains_two_gloo_ranks_through_the_comm_hook(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "distributed_cases.py"), str(tmp_path), "terngrad"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    states = []
    for rank in (0, 1):
        with safe_open(str(tmp_path / f"terngrad-rank{rank}.safetensors"), framework="pt") as f:
            states.append({k: f.get_tensor(k) for k in f.keys()})
            losses = eval(f.metadata()["losses"])  # noqa: S307 - our own list
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])   # one averaged gradient on both ranks
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4   # converges with ternary gradients
    import distributed_cases as cases

    plain, data = cases.terngrad_task()   # the uncompressed run ends elsewhere: the hook did act
    train(plain, data, cases.config(epochs=8, lr=1e-2))
    assert max(float((plain.state_dict()[k] - states[0][k]).abs().max()) for k in states[0]) > 1e-3
