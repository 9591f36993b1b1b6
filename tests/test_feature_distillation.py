"""FitNets hints and attention transfer: the properties the papers rely on."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from compiler.errors import OptionError
from compiler.feature_distillation import AttentionTransfer, HintLoss, attention_map
from compiler.finetune import TrainConfig, train
from compiler.tracing import trace
from passes import ChannelPruning
from squeezer.zoo import LeNet5


def _lenet(seed: int = 0):
    torch.manual_seed(seed)
    model = LeNet5().eval()
    return model, trace(model, (torch.randn(1, 1, 28, 28),))


@torch.no_grad()
def _loss_on(feature, student, teacher, x):
    with feature.recording(student, teacher):
        student(x)
        teacher(x)
        return float(feature.loss())


def test_attention_map_is_the_normalized_channel_energy():
    a = torch.randn(2, 5, 4, 4)
    q = (a ** 2).sum(1).flatten(1)
    assert torch.allclose(attention_map(a), q / q.norm(dim=1, keepdim=True), atol=1e-6)
    # independent of the channel count and order: a pruned student's map compares with its teacher's
    assert torch.allclose(attention_map(torch.cat([a, a], 1)[:, torch.randperm(10)]), attention_map(a), atol=1e-6)


def test_attention_transfer_is_zero_on_the_teacher_itself_and_trains_towards_it():
    teacher, graph = _lenet()
    x = torch.randn(16, 1, 28, 28)
    at = AttentionTransfer(("conv1", "conv2"))
    assert _loss_on(at, copy.deepcopy(teacher), teacher, x) == pytest.approx(0.0, abs=1e-9)
    student = ChannelPruning(ratio=0.5)(graph).module
    before = _loss_on(at, student, teacher, x)
    data = TensorDataset(x, torch.randint(0, 10, (16,)))
    train(student, data, TrainConfig(epochs=30, batch_size=16, lr=1e-3, progress=False, alpha=0.0,
                                     feature_loss=AttentionTransfer(("conv1", "conv2"), weight=1e4)), teacher=teacher)
    assert _loss_on(at, student, teacher, x) < 0.75 * before


def test_hint_regressors_map_student_widths_and_training_reduces_the_hint_loss():
    teacher, graph = _lenet()
    student = ChannelPruning(ratio=0.5)(graph).module
    hint = HintLoss.between(student, teacher, ("conv2", "fc1"))
    assert hint.regressors["conv2"].weight.shape == (16, student.conv2.out_channels, 1, 1)
    assert hint.regressors["fc1"].weight.shape == (120, student.fc1.out_features, 1, 1)
    x = torch.randn(32, 1, 28, 28)
    before = _loss_on(hint, student, teacher, x)
    train(student, TensorDataset(x, torch.randint(0, 10, (32,))),
          TrainConfig(epochs=20, batch_size=32, lr=3e-3, progress=False, alpha=0.0, feature_loss=hint), teacher=teacher)
    assert _loss_on(hint, student, teacher, x) < 0.5 * before


def test_hint_with_equal_widths_starts_from_the_identity():
    teacher, _ = _lenet()
    hint = HintLoss.between(copy.deepcopy(teacher), teacher, ("conv2",))
    assert _loss_on(hint, copy.deepcopy(teacher), teacher, torch.randn(4, 1, 28, 28)) == pytest.approx(0.0, abs=1e-9)


def test_feature_distillation_errors_name_the_layer_and_the_missing_teacher():
    teacher, _ = _lenet()
    with pytest.raises(OptionError, match="no layer 'conv9'.*conv1"):
        HintLoss.between(teacher, teacher, ("conv9",))
    with pytest.raises(OptionError, match="at least one layer pair"):
        AttentionTransfer(())
    data = TensorDataset(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    with pytest.raises(OptionError, match="needs a teacher"):
        train(copy.deepcopy(teacher), data, TrainConfig(batch_size=8, progress=False,
                                                       feature_loss=AttentionTransfer(("conv1",))))
    with pytest.raises(OptionError, match="NCHW maps"):
        train(copy.deepcopy(teacher), data, TrainConfig(batch_size=8, progress=False,
                                                       feature_loss=AttentionTransfer(("fc1",))), teacher=teacher)
