"""Loss modules equal their functions; PESF-KD's teacher adapter trains only itself."""

import pytest
import torch
from helpers import logits

import kdfast
from kdfast import nn as kdnn


def test_loss_modules_equal_the_functional_losses():
    s, t = logits(5, 12), logits(5, 12)
    y = torch.randint(0, 12, (5,))
    w = torch.rand(5, dtype=torch.float64)
    pairs = [
        (kdnn.KDLoss(2.0)(s, t), kdfast.kd_loss(s, t, 2.0)),
        (kdnn.DISTLoss(1.5, 0.3, 2.0)(s, t), kdfast.dist_loss(s, t, 1.5, 0.3, 2.0)),
        (kdnn.CMKDLoss(3.0, 0.5, 2.0, 0.1, "fixed")(s, t, y), kdfast.cmkd_loss(s, t, y, 3.0, 0.5, 2.0, 0.1, "fixed")),
        (kdnn.CMKDLoss()(s, t, y, weighting=w), kdfast.cmkd_loss(s, t, y, weighting=w)),
        (kdnn.DRKDLoss(2.0, 0.3)(s, t, y), kdfast.drkd_loss(s, t, y, 2.0, 0.3)),
    ]
    for module_value, function_value in pairs:
        torch.testing.assert_close(module_value, function_value, rtol=0, atol=0)
    assert "temperature=2.0" in repr(kdnn.KDLoss(2.0))


def _adapter_batch(batch=8, features=16, classes=5):
    torch.manual_seed(1)
    teacher_logits = torch.randn(batch, classes)
    teacher_features = torch.randn(batch, features)
    student_logits = torch.randn(batch, classes, requires_grad=True)
    target = torch.randint(0, classes, (batch,))
    return teacher_logits, teacher_features, student_logits, target


def test_adapter_starts_as_the_identity():
    adapter = kdnn.TeacherAdapter(16, 5, hidden_dim=8)
    teacher_logits, teacher_features, _, _ = _adapter_batch()
    assert torch.equal(adapter(teacher_logits, teacher_features), teacher_logits)


def test_adapter_loss_trains_only_the_adapter():
    adapter = kdnn.TeacherAdapter(16, 5, hidden_dim=8, temperature=2.0)
    teacher_logits, teacher_features, student_logits, target = _adapter_batch()
    teacher_logits.requires_grad_()
    teacher_features.requires_grad_()
    adapted = adapter(teacher_logits, teacher_features)
    loss = adapter.adapter_loss(adapted, student_logits, target)
    expected = torch.nn.functional.cross_entropy(adapted, target) + kdfast.kd_loss(
        student_logits.detach(), adapted, 2.0)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert student_logits.grad is None  # stopgrad(p)
    assert teacher_logits.grad is None and teacher_features.grad is None  # frozen teacher
    assert adapter.mlp[-1].weight.grad.abs().sum() > 0


def test_adapter_training_lowers_its_loss():
    adapter = kdnn.TeacherAdapter(16, 5, hidden_dim=32, temperature=2.0)
    teacher_logits, teacher_features, student_logits, target = _adapter_batch(batch=64)
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.5)
    losses = []
    for _ in range(30):
        loss = adapter.adapter_loss(adapter(teacher_logits, teacher_features), student_logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_student_targets_are_detached_and_optionally_rectified():
    teacher_logits, teacher_features, _, target = _adapter_batch()
    plain = kdnn.TeacherAdapter(16, 5)
    adapted = plain(teacher_logits, teacher_features)
    assert not plain.student_targets(adapted).requires_grad
    rectifying = kdnn.TeacherAdapter(16, 5, rectify=True)
    adapted = rectifying(teacher_logits, teacher_features)
    assert torch.equal(rectifying.student_targets(adapted, target).argmax(1), target)
    with pytest.raises(ValueError, match="target is required"):
        rectifying.student_targets(adapted)


def test_adapter_checks_shapes():
    adapter = kdnn.TeacherAdapter(16, 5)
    teacher_logits, teacher_features, student_logits, target = _adapter_batch()
    with pytest.raises(ValueError, match="teacher_features must have 16 columns"):
        adapter(teacher_logits, teacher_features[:, :8])
    with pytest.raises(ValueError, match="teacher_logits must have 5 columns"):
        adapter(teacher_logits[:, :4], teacher_features)
    with pytest.raises(ValueError, match="teacher_features must have 8 rows"):
        adapter(teacher_logits, teacher_features[:4])
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 4\]"):
        adapter.adapter_loss(adapter(teacher_logits, teacher_features), student_logits, target + 5)
