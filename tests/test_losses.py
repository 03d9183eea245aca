"""Every loss against an independent formulation (torch.nn.functional, scipy, DIST's code)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import dist_paper, logits, rectify_loop, teacher_like
from scipy.stats import entropy, pearsonr, spearmanr

import kdfast

SHAPES = [(1, 2), (4, 2), (8, 7), (5, 100), (3, 1001)]
TAUS = [0.5, 1.0, 4.0]


def _kl_div(student, teacher, tau):
    log_p = F.log_softmax(student / tau, dim=1)
    log_q = F.log_softmax(teacher / tau, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * tau**2


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tau", TAUS)
def test_kd_loss_is_kl_div(shape, tau):
    s, t = logits(*shape), logits(*shape)
    torch.testing.assert_close(kdfast.kd_loss(s, t, tau), _kl_div(s, t, tau), rtol=1e-12, atol=1e-12)
    assert kdfast.kd_loss(s, s.clone(), tau).abs().item() < 1e-12


@pytest.mark.parametrize("shape", [(4, 2), (8, 7), (5, 100), (3, 1001)])
@pytest.mark.parametrize("tau", TAUS)
def test_pearson_loss_per_row_is_scipy_pearsonr(shape, tau):
    s, t = logits(*shape), logits(*shape)
    p, q = (s / tau).softmax(1).numpy(), (t / tau).softmax(1).numpy()
    rho = np.mean([pearsonr(a, b).statistic for a, b in zip(p, q)])
    expected = tau**2 * (1 - rho)
    assert kdfast.pearson_loss(s, t, tau, dim=1).item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("shape", [(2, 3), (2, 5), (9, 7), (100, 10)])
def test_pearson_loss_per_column_is_scipy_pearsonr(shape):
    s, t = logits(*shape), logits(*shape)
    p, q = s.softmax(1).numpy(), t.softmax(1).numpy()
    rho = np.mean([pearsonr(a, b).statistic for a, b in zip(p.T, q.T)])
    assert kdfast.pearson_loss(s, t, 1.0, dim=0).item() == pytest.approx(1 - rho, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("shape", [(2, 2), (8, 7), (64, 100), (16, 1001)])
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("beta,gamma", [(1.0, 1.0), (2.0, 0.5), (1.0, 0.0), (0.0, 2.0)])
def test_dist_loss_is_the_published_formula(shape, tau, beta, gamma):
    s = logits(*shape, scale=1.0).requires_grad_()
    t = logits(*shape, scale=1.0)
    ours = kdfast.dist_loss(s, t, tau, beta, gamma)
    (grad_ours,) = torch.autograd.grad(ours, s)
    # Where every norm product exceeds 1e-8, kdfast's max(product, 1e-8) is the product
    # itself, so the published formula with its "+ eps" set to 0 must agree to rounding...
    s2 = s.detach().clone().requires_grad_()
    exact = dist_paper(s2, t, beta, gamma, tau, eps=0.0)
    (grad_exact,) = torch.autograd.grad(exact, s2)
    torch.testing.assert_close(ours, exact, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_exact, rtol=1e-8, atol=1e-10)
    # ... and the published code itself differs only by what its "+ 1e-8" changes.
    published = dist_paper(s.detach(), t, beta, gamma, tau)
    assert abs(ours.item() - published.item()) <= 2 * abs(exact.item() - published.item()) + 1e-12


@pytest.mark.parametrize("shape", [(4, 2), (8, 7), (6, 100), (3, 1000)])
def test_spearman_loss_hard_limit_is_scipy_spearmanr(shape):
    s, t = logits(*shape), logits(*shape)
    t[:, : shape[1] // 3] = t[:, :1]  # teacher ties: averaged ranks, as scipy
    rho = np.mean([spearmanr(a, b).statistic for a, b in zip(s.numpy(), t.numpy())])
    ours = kdfast.spearman_loss(s, t, regularization_strength=1e-6 / shape[1])
    assert ours.item() == pytest.approx(1 - rho, abs=1e-9)


def _cmkd_independent(s, t, y, tau, kl_weight, corr_weight, ce_weight, fixed_difficulty=None):
    """CMKD assembled from scipy and torch.nn.functional, with hard Spearman ranks."""
    p, q = (s / tau).softmax(1).numpy(), (t / tau).softmax(1).numpy()
    if fixed_difficulty is None:
        d = np.array([entropy(row) for row in q]) / math.log(s.shape[1])
    else:
        d = np.full(s.shape[0], fixed_difficulty)
    rho = np.array([pearsonr(a, b).statistic for a, b in zip(p, q)])
    rho_s = np.array([spearmanr(a, b).statistic for a, b in zip(s.numpy(), t.numpy())])
    corr = np.mean((1 - d) * (1 - rho) + d * (1 - rho_s))
    loss = kl_weight * _kl_div(s, t, tau).item() + corr_weight * tau**2 * corr
    if y is not None:
        loss += ce_weight * F.cross_entropy(s, y).item()
    return loss


@pytest.mark.parametrize("shape", [(4, 2), (8, 7), (6, 100), (3, 1000)])
@pytest.mark.parametrize("with_target", [True, False])
@pytest.mark.parametrize("weighting", ["entropy", "fixed"])
def test_cmkd_loss_hard_limit_is_the_independent_composite(shape, with_target, weighting):
    s, t = logits(*shape), logits(*shape)
    y = torch.randint(0, shape[1], (shape[0],)) if with_target else None
    ours = kdfast.cmkd_loss(s, t, y, 3.0, 0.7, 1.3, 0.4, weighting, regularization_strength=1e-6 / shape[1])
    fixed = 0.5 if weighting == "fixed" else None
    expected = _cmkd_independent(s, t, y, 3.0, 0.7, 1.3, 0.4, fixed)
    assert ours.item() == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_cmkd_tensor_weighting_interpolates_pearson_and_spearman():
    s, t, y = teacher_like(6, 50)
    strength = 1e-6 / 50
    zero = kdfast.cmkd_loss(s, t, y, 2.0, 0.0, 1.0, 0.0, torch.zeros(6, dtype=torch.float64), strength)
    one = kdfast.cmkd_loss(s, t, y, 2.0, 0.0, 1.0, 0.0, torch.ones(6, dtype=torch.float64), strength)
    assert zero.item() == pytest.approx(kdfast.pearson_loss(s, t, 2.0).item(), rel=1e-12)
    assert one.item() == pytest.approx(4.0 * kdfast.spearman_loss(s, t, strength).item(), rel=1e-12)
    half = kdfast.cmkd_loss(s, t, y, 2.0, 0.0, 1.0, 0.0, torch.full((6,), 0.5, dtype=torch.float64), strength)
    fixed = kdfast.cmkd_loss(s, t, y, 2.0, 0.0, 1.0, 0.0, "fixed", strength)
    assert half.item() == pytest.approx(fixed.item(), rel=1e-12)


def test_cmkd_entropy_difficulty_follows_the_teacher_confidence():
    # A confident teacher row (d ~ 0) leans on Pearson, a flat one (d ~ 1) on Spearman.
    s = logits(2, 10)
    t = torch.zeros(2, 10, dtype=torch.float64)
    t[0, 3] = 50.0  # confident
    t[1] = torch.linspace(0, 1e-3, 10)  # nearly uniform, but strictly ranked
    strength = 1e-6 / 10
    ours = kdfast.cmkd_loss(s, t, None, 1.0, 0.0, 1.0, 0.0, "entropy", strength)
    rho = kdfast.reference.pearson(s.softmax(1), t.softmax(1))
    rho_s = kdfast.reference.spearman_rows(s, t, strength)
    expected = 0.5 * ((1 - rho[0]) + (1 - rho_s[1]))
    assert ours.item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("shape", [(1, 2), (7, 3), (16, 100)])
def test_rectify_matches_a_row_loop(shape):
    t = logits(*shape)
    y = torch.randint(0, shape[1], (shape[0],))
    before = t.clone()
    rectified = kdfast.rectify(t, y)
    assert torch.equal(t, before)  # a new tensor; the input is untouched
    torch.testing.assert_close(rectified, rectify_loop(t, y), rtol=0, atol=0)
    assert torch.equal(rectified.argmax(1), y)
    assert torch.equal(rectified.sort(1).values, t.sort(1).values)


def test_rectify_is_a_differentiable_permutation():
    t = logits(4, 5).requires_grad_()
    y = (t.detach().argmax(1) + torch.tensor([0, 1, 2, 3])) % 5  # row 0 kept, rows 1-3 swapped
    g = torch.randn(4, 5, dtype=torch.float64)
    (grad,) = torch.autograd.grad(kdfast.rectify(t, y), t, g)
    # A swap is its own inverse: the gradient is g with the same two entries swapped.
    expected = g.clone()
    for i, j in enumerate(t.detach().argmax(1).tolist()):
        expected[i, j], expected[i, y[i]] = g[i, y[i]], g[i, j]
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("shape", [(1, 2), (8, 7), (16, 100)])
@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_drkd_loss_is_kl_div_of_the_rectified_teacher(shape, ce_weight):
    s, t = logits(*shape), logits(*shape)
    y = torch.randint(0, shape[1], (shape[0],))
    expected = _kl_div(s, rectify_loop(t, y), 4.0) + ce_weight * F.cross_entropy(s, y)
    torch.testing.assert_close(kdfast.drkd_loss(s, t, y, 4.0, ce_weight), expected, rtol=1e-12, atol=1e-12)


def test_losses_are_float32_for_low_precision_inputs_and_float64_for_float64():
    s, t = logits(4, 10, torch.float32), logits(4, 10, torch.float32)
    y = torch.randint(0, 10, (4,))
    for dtype, expected in [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                            (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        a, b = s.to(dtype), t.to(dtype)
        for loss in (kdfast.kd_loss(a, b), kdfast.pearson_loss(a, b), kdfast.dist_loss(a, b),
                     kdfast.spearman_loss(a, b), kdfast.cmkd_loss(a, b, y), kdfast.drkd_loss(a, b, y)):
            assert loss.dtype == expected and loss.dim() == 0
