"""kdfast.combine_teachers: several teachers' logits as one."""

import pytest
import torch

import kdfast


def test_one_teacher_is_itself_bitwise():
    teacher = torch.randn(4, 7)
    for mode in ("logits", "probabilities"):
        assert kdfast.combine_teachers([teacher], mode=mode, temperature=3.0) is teacher


def test_logits_mode_is_the_weighted_mean():
    a, b, c = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(kdfast.combine_teachers([a, b, c]), (a + b + c) / 3)
    torch.testing.assert_close(kdfast.combine_teachers([a, b], weights=[1, 3]), 0.25 * a + 0.75 * b)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_probabilities_mode_softens_back_to_the_mean_distribution(temperature):
    a, b = torch.randn(3, 6, dtype=torch.float64) * 4, torch.randn(3, 6, dtype=torch.float64) * 4
    combined = kdfast.combine_teachers([a, b], weights=[2, 1], mode="probabilities", temperature=temperature)
    expected = (2 * (a / temperature).softmax(1) + (b / temperature).softmax(1)) / 3
    torch.testing.assert_close((combined / temperature).softmax(1), expected, rtol=1e-12, atol=1e-15)
    # A loss on the combination equals the loss on the hand-combined distribution.
    student = torch.randn(3, 6, dtype=torch.float64)
    kl = (expected * (expected.log() - (student / temperature).log_softmax(1))).sum(1).mean() * temperature**2
    torch.testing.assert_close(kdfast.kd_loss(student, combined, temperature, backend="torch"), kl)


def test_weight_zero_teacher_drops_out_and_gradients_flow():
    a = torch.randn(2, 4, requires_grad=True)
    b = torch.randn(2, 4, requires_grad=True)
    combined = kdfast.combine_teachers([a, b], weights=[1, 0], mode="probabilities", temperature=2.0)
    torch.testing.assert_close(combined, a.detach() - 2.0 * torch.logsumexp(a.detach() / 2.0, 1, keepdim=True))
    combined.sum().backward()
    assert a.grad is not None and torch.count_nonzero(b.grad if b.grad is not None else torch.zeros(1)) == 0


def test_bad_input_is_named():
    a = torch.randn(2, 4)
    with pytest.raises(ValueError, match="non-empty list"):
        kdfast.combine_teachers([])
    with pytest.raises(ValueError, match=r"logits_list\[1\] must match logits_list\[0\]"):
        kdfast.combine_teachers([a, torch.randn(2, 5)])
    with pytest.raises(ValueError, match="one entry per teacher"):
        kdfast.combine_teachers([a, a], weights=[1])
    with pytest.raises(ValueError, match=r"weights\[1\] must be"):
        kdfast.combine_teachers([a, a], weights=[1, -1])
    with pytest.raises(ValueError, match="must not all be 0"):
        kdfast.combine_teachers([a, a], weights=[0, 0])
    with pytest.raises(ValueError, match="mode must be"):
        kdfast.combine_teachers([a, a], mode="votes")
