"""Edge cases of every loss: ties, constant rows, tiny shapes, huge logits, dtypes, layouts."""

import pytest
import torch
import torch.nn.functional as F
from helpers import logits

import kdfast


def _gamma(s):
    return 1.0 if s.shape[0] >= 2 else 0.0  # the intra-class term needs two rows


LOSSES = {
    "kd": lambda s, t, y, **kw: kdfast.kd_loss(s, t, **kw),
    "pearson": lambda s, t, y, **kw: kdfast.pearson_loss(s, t, **kw),
    "dist": lambda s, t, y, **kw: kdfast.dist_loss(s, t, gamma=_gamma(s), **kw),
    "spearman": lambda s, t, y, **kw: kdfast.spearman_loss(s, t, **kw),
    "cmkd": lambda s, t, y, **kw: kdfast.cmkd_loss(s, t, y, **kw),
    "drkd": lambda s, t, y, **kw: kdfast.drkd_loss(s, t, y, ce_weight=0.5, **kw),
}


def _loss_and_grads(name, s, t, y):
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    loss = LOSSES[name](s, t, y)
    grad_s, grad_t = torch.autograd.grad(loss, (s, t), allow_unused=True)
    return loss, grad_s, grad_t


NAMES = ["kd", "pearson", "dist", "spearman", "cmkd", "drkd"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(1, 2), (1, 7), (4, 2), (3, 1000)])
def test_finite_on_tiny_and_odd_shapes(name, shape):
    s, t = logits(*shape, torch.float32), logits(*shape, torch.float32)
    y = torch.randint(0, shape[1], (shape[0],))
    loss, grad_s, _ = _loss_and_grads(name, s, t, y)
    assert torch.isfinite(loss) and torch.isfinite(grad_s).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("magnitude", [1e4, -1e4])
def test_huge_logits_give_finite_loss_and_gradients(name, magnitude):
    s, t = logits(6, 50, torch.float32), logits(6, 50, torch.float32)
    s[:, 3] = magnitude
    t[:, 7] = -magnitude
    t[0] = magnitude * torch.linspace(-1, 1, 50)  # a row of huge logits of both signs
    y = torch.randint(0, 50, (6,))
    loss, grad_s, grad_t = _loss_and_grads(name, s, t, y)
    assert torch.isfinite(loss)
    assert torch.isfinite(grad_s).all()
    assert grad_t is None or torch.isfinite(grad_t).all()


@pytest.mark.parametrize("name", NAMES)
def test_constant_rows(name):
    # A constant student row: softmax is uniform, ρ = 0 exactly, the row standardizes to
    # zeros; nothing becomes NaN, in the loss or in either gradient.
    s, t = logits(4, 9, torch.float32), logits(4, 9, torch.float32)
    s[1] = 2.5
    t[2] = -1.0
    y = torch.randint(0, 9, (4,))
    loss, grad_s, grad_t = _loss_and_grads(name, s, t, y)
    assert torch.isfinite(loss) and torch.isfinite(grad_s).all()
    assert grad_t is None or torch.isfinite(grad_t).all()


def test_constant_vector_has_zero_correlation():
    constant = torch.full((3, 8), 0.1)
    other = torch.randn(3, 8)
    assert torch.equal(kdfast.reference.pearson(constant, other), torch.zeros(3))
    assert torch.equal(kdfast.reference.standardize_rows(constant), torch.zeros(3, 8))
    # Spearman of a constant student row against any teacher: ρ_S = 0, so the loss is 1.
    assert kdfast.spearman_loss(constant, other).item() == pytest.approx(1.0)


def test_ties_in_teacher_and_student():
    s = torch.tensor([[1.0, 1.0, 2.0, 3.0, 3.0, 3.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 5.0, 5.0, 1.0, 1.0, 2.0]], dtype=torch.float64)
    for name, loss in LOSSES.items():
        assert torch.isfinite(loss(s, t, torch.tensor([1]))), name
    # Identical logits with ties: perfect correlation in the hard limit.
    assert kdfast.spearman_loss(s, s.clone(), 1e-8).item() == pytest.approx(0.0, abs=1e-9)


def test_c2_and_b1():
    s, t = logits(1, 2), logits(1, 2)
    y = torch.tensor([1])
    assert kdfast.pearson_loss(s, t).item() in (pytest.approx(0.0, abs=1e-12), pytest.approx(2.0))
    assert kdfast.dist_loss(s, t, gamma=0.0).item() == pytest.approx(kdfast.pearson_loss(s, t).item())
    for name, loss in LOSSES.items():
        assert torch.isfinite(loss(s, t, y)), name


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(name, dtype):
    # Half inputs are upcast once and computed in fp32: the loss and gradients equal the
    # fp32 computation on the same (rounded) values, and gradients come back in the
    # input's dtype.
    s, t = logits(5, 33, dtype), logits(5, 33, dtype)
    y = torch.randint(0, 33, (5,))
    loss, grad_s, grad_t = _loss_and_grads(name, s, t, y)
    loss32, grad_s32, grad_t32 = _loss_and_grads(name, s.float(), t.float(), y)
    assert loss.dtype == torch.float32 and grad_s.dtype == dtype
    torch.testing.assert_close(loss, loss32, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_s, grad_s32.to(dtype))
    if grad_t is not None:
        torch.testing.assert_close(grad_t, grad_t32.to(dtype))


@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_inputs(name):
    s_base, t_base = logits(40, 6), logits(40, 6)
    s, t = s_base.t(), t_base.t()  # [6, 40] views
    assert not s.is_contiguous() and not t.is_contiguous()
    y = torch.randint(0, 40, (6,))
    expected = _loss_and_grads(name, s.contiguous(), t.contiguous(), y)
    got = _loss_and_grads(name, s, t, y)
    for a, b in zip(got, expected):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_grad_output_scales_the_gradient(name):
    s, t = logits(4, 12), logits(4, 12)
    y = torch.randint(0, 12, (4,))
    s1 = s.clone().requires_grad_()
    (g1,) = torch.autograd.grad(LOSSES[name](s1, t, y), s1)
    s2 = s.clone().requires_grad_()
    (g2,) = torch.autograd.grad(LOSSES[name](s2, t, y), s2, grad_outputs=torch.tensor(-2.5, dtype=s.dtype))
    torch.testing.assert_close(g2, -2.5 * g1)


def test_teacher_gradient_matches_an_independent_formulation():
    # PESF-KD trains a teacher adapter through KL(softmax(t'/τ) ‖ stopgrad(p)).
    s, t = logits(6, 10), logits(6, 10)
    tau = 3.0
    t1 = t.clone().requires_grad_()
    (ours,) = torch.autograd.grad(kdfast.kd_loss(s, t1, tau), t1)
    t2 = t.clone().requires_grad_()
    ref = F.kl_div(F.log_softmax(s / tau, 1), F.log_softmax(t2 / tau, 1), reduction="batchmean",
                   log_target=True) * tau**2
    (theirs,) = torch.autograd.grad(ref, t2)
    torch.testing.assert_close(ours, theirs)
    for name in NAMES:
        _, _, grad_t = _loss_and_grads(name, s, t, torch.randint(0, 10, (6,)))
        if name == "spearman":  # the teacher enters only through hard ranks: no gradient
            assert grad_t is None or not grad_t.any()
        else:
            assert grad_t is not None and torch.isfinite(grad_t).all() and grad_t.any()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_never_crash_and_check_finite_names_them(name, bad):
    s, t = logits(3, 8, torch.float32), logits(3, 8, torch.float32)
    y = torch.randint(0, 8, (3,))
    s_bad = s.clone()
    s_bad[1, 4] = bad
    snapshot = s_bad.clone()
    loss = LOSSES[name](s_bad, t, y)  # may be NaN, must not raise or crash
    assert loss.dim() == 0
    assert torch.equal(s_bad.nan_to_num(), snapshot.nan_to_num())  # inputs untouched
    with pytest.raises(ValueError, match="student contains NaN or Inf"):
        LOSSES[name](s_bad, t, y, check_finite=True)
    t_bad = t.clone()
    t_bad[0, 0] = bad
    with pytest.raises(ValueError, match="teacher contains NaN or Inf"):
        LOSSES[name](s, t_bad, y, check_finite=True)
