"""Fine-tuning helpers: Hinton distillation loss properties, determinism, and that training learns."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compiler.finetune import TrainConfig, batches_of, distillation_loss, evaluate, train


def test_distillation_loss_is_zero_for_identical_logits_and_scales_with_t_squared():
    z = torch.randn(8, 10)
    assert distillation_loss(z, z, None, temperature=3.0).abs() < 1e-6
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    kl = F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="batchmean")
    assert torch.allclose(distillation_loss(s, t, None, temperature=2.0), kl * 4, atol=1e-6)
    y = torch.randint(0, 10, (8,))
    mixed = distillation_loss(s, t, y, temperature=2.0, alpha=0.25)
    assert torch.allclose(mixed, 0.25 * kl * 4 + 0.75 * F.cross_entropy(s, y), atol=1e-6)


def test_distillation_rejects_bad_options():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(z, z, None, temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(z, z, None, alpha=1.5)


def _task():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return batches_of(x, y, 32, shuffle=True)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def test_training_is_deterministic_and_learns():
    data = _task()
    a, b = _net(), _net()
    cfg = TrainConfig(epochs=5, lr=1e-2, progress=False)
    ha, hb = train(a, data, cfg), train(b, data, cfg)
    assert ha.losses == hb.losses
    assert evaluate(a, data) > 0.9


def test_training_leaves_global_rng_and_determinism_alone():
    net, data = _net(), _task()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    flag = torch.are_deterministic_algorithms_enabled()
    train(net, data, TrainConfig(epochs=1, progress=False))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.are_deterministic_algorithms_enabled() == flag


def test_distilled_student_matches_its_teacher():
    data = _task()
    teacher = _net()
    train(teacher, data, TrainConfig(epochs=5, lr=1e-2, progress=False))
    student = _net()
    train(student, data, TrainConfig(epochs=8, lr=1e-2, alpha=1.0, progress=False), teacher=teacher)
    with torch.no_grad():
        agree = sum(int((student(x).argmax(-1) == teacher(x).argmax(-1)).sum()) for x, _ in data)
    assert agree / 256 > 0.9
