"""HardDistillationLoss against a hand computation, its teacher handling and its errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import medvit
from medvit.losses import HardDistillationLoss

CLS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
DIST = torch.tensor([[0.0, 1.0, 0.0], [1.0, -2.0, 0.0]])
TEACHER = torch.tensor([[0.1, 0.9, 0.3], [5.0, 1.0, 2.0]])  # top-1 classes 1 and 0
LABELS = torch.tensor([0, 1])


def _ce(logits: list[float], target: int) -> float:
    return math.log(sum(math.exp(z) for z in logits)) - logits[target]


def _by_hand(alpha: float = 0.5) -> float:
    base = (_ce([2.0, 0.0, -1.0], 0) + _ce([0.5, 0.5, 3.0], 1)) / 2
    distill = (_ce([0.0, 1.0, 0.0], 1) + _ce([1.0, -2.0, 0.0], 0)) / 2
    return (1 - alpha) * base + alpha * distill


class _Fixed(nn.Module):
    """A teacher that answers TEACHER and records its mode and whether grad was on."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled()))
        return TEACHER * self.scale + 0 * x.sum()


def test_matches_hand_computation_with_teacher_logits() -> None:
    loss = HardDistillationLoss()((CLS, DIST), LABELS, teacher_logits=TEACHER)
    assert loss.item() == pytest.approx(_by_hand(), abs=1e-6)
    weighted = HardDistillationLoss(alpha=0.25)((CLS, DIST), LABELS, teacher_logits=TEACHER)
    assert weighted.item() == pytest.approx(_by_hand(0.25), abs=1e-6)


def test_teacher_runs_on_inputs_in_eval_without_grad() -> None:
    teacher = _Fixed().train()
    criterion = HardDistillationLoss(teacher).train()  # train() must not reach the teacher
    cls, dist = CLS.clone().requires_grad_(), DIST.clone().requires_grad_()
    loss = criterion((cls, dist), LABELS, inputs=torch.randn(2, 3, 8, 8))
    assert loss.item() == pytest.approx(_by_hand(), abs=1e-6)
    assert teacher.calls == [(False, False)]
    loss.backward()
    assert cls.grad is not None and dist.grad is not None and teacher.scale.grad is None
    # the distillation head's gradient is alpha * (softmax - onehot(teacher top-1)) / B
    expected = 0.5 * (DIST.softmax(1) - nn.functional.one_hot(torch.tensor([1, 0]), 3)) / 2
    torch.testing.assert_close(dist.grad, expected)


def test_soft_labels_for_the_class_head() -> None:
    soft = nn.functional.one_hot(LABELS, 3).float() * 0.9 + 0.1 / 3
    loss = HardDistillationLoss()((CLS, DIST), soft, teacher_logits=TEACHER)
    base = -(soft * CLS.log_softmax(1)).sum(1).mean().item()
    distill = (_ce([0.0, 1.0, 0.0], 1) + _ce([1.0, -2.0, 0.0], 0)) / 2
    assert loss.item() == pytest.approx(0.5 * base + 0.5 * distill, abs=1e-6)


def test_trains_a_distilled_deit() -> None:
    model = medvit.create_model(
        "deit_tiny_distilled_patch16_224", img_size=32, embed_dim=32, depth=1, num_heads=2, num_classes=3
    )
    model.set_distilled_training()
    model.train()
    x = torch.randn(2, 3, 32, 32)
    loss = HardDistillationLoss(_Fixed())(model(x), LABELS, inputs=x)
    loss.backward()
    assert model.head.weight.grad.abs().sum() > 0 and model.head_dist.weight.grad.abs().sum() > 0


def test_errors() -> None:
    with pytest.raises(ValueError, match="set_distilled_training"):
        HardDistillationLoss()(CLS, LABELS, teacher_logits=TEACHER)
    with pytest.raises(ValueError, match="exactly one"):
        HardDistillationLoss(_Fixed())((CLS, DIST), LABELS)
    with pytest.raises(ValueError, match="exactly one"):
        HardDistillationLoss(_Fixed())((CLS, DIST), LABELS, inputs=torch.zeros(2), teacher_logits=TEACHER)
    with pytest.raises(ValueError, match="no teacher"):
        HardDistillationLoss()((CLS, DIST), LABELS, inputs=torch.zeros(2))
    with pytest.raises(ValueError, match="do not match"):
        HardDistillationLoss()((CLS, DIST), LABELS, teacher_logits=TEACHER[:, :2])
    with pytest.raises(ValueError, match="alpha"):
        HardDistillationLoss(alpha=1.5)
