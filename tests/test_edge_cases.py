"""Edge cases of every loss on every backend: ties, constant rows, tiny shapes, huge
logits, dtypes, layouts, grad_output, teacher gradients, non-finite inputs."""

import pytest
import torch
import torch.nn.functional as F
from helpers import logits
from scipy.stats import spearmanr

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
NAMES = list(LOSSES)


def _on(backend_device, *tensors):
    _, device = backend_device
    return [None if x is None else x.to(device) for x in tensors]


def _loss_and_grads(name, s, t, y, backend, grad_output=None, **kw):
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    loss = LOSSES[name](s, t, y, backend=backend, **kw)
    grad_s, grad_t = torch.autograd.grad(loss, (s, t), grad_outputs=grad_output, allow_unused=True)
    return loss, grad_s, grad_t


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(1, 2), (1, 7), (4, 2), (3, 257)])
def test_finite_on_tiny_and_odd_shapes(name, shape, backend_device):
    s, t, y = _on(backend_device, logits(*shape, torch.float32), logits(*shape, torch.float32),
                  torch.randint(0, shape[1], (shape[0],)))
    loss, grad_s, _ = _loss_and_grads(name, s, t, y, backend_device[0])
    assert torch.isfinite(loss) and torch.isfinite(grad_s).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("magnitude", [1e4, -1e4])
def test_huge_logits_give_finite_loss_and_gradients(name, magnitude, backend_device):
    s, t = logits(6, 50, torch.float32), logits(6, 50, torch.float32)
    s[:, 3] = magnitude
    t[:, 7] = -magnitude
    t[0] = magnitude * torch.linspace(-1, 1, 50)  # a row of huge logits of both signs
    s, t, y = _on(backend_device, s, t, torch.randint(0, 50, (6,)))
    loss, grad_s, grad_t = _loss_and_grads(name, s, t, y, backend_device[0])
    assert torch.isfinite(loss)
    assert torch.isfinite(grad_s).all()
    assert grad_t is None or torch.isfinite(grad_t).all()


@pytest.mark.parametrize("name", NAMES)
def test_constant_rows(name, backend_device):
    # A constant student row: softmax is uniform, ρ = 0 exactly, the row standardizes to
    # zeros; nothing becomes NaN, in the loss or in either gradient.
    s, t = logits(4, 9, torch.float32), logits(4, 9, torch.float32)
    s[1] = 2.5
    t[2] = -1.0
    s, t, y = _on(backend_device, s, t, torch.randint(0, 9, (4,)))
    loss, grad_s, grad_t = _loss_and_grads(name, s, t, y, backend_device[0])
    assert torch.isfinite(loss) and torch.isfinite(grad_s).all()
    assert grad_t is None or torch.isfinite(grad_t).all()


@pytest.mark.parametrize("name", ["pearson_columns", "dist"])
def test_constant_columns(name, backend_device):
    # Identical rows make every column constant: each column correlation is exactly 0 (the
    # intra-class term is τ²·1), nothing is NaN.
    row = logits(1, 12, torch.float32)
    s, t = _on(backend_device, row.expand(40, 12).contiguous(), logits(40, 12, torch.float32))
    backend = backend_device[0]
    s.requires_grad_()
    if name == "dist":
        loss = kdfast.dist_loss(s, t, beta=0.0, gamma=1.0, backend=backend)
    else:
        loss = kdfast.pearson_loss(s, t, dim=0, backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    assert torch.isfinite(grad).all()


def test_constant_vector_has_zero_correlation(backend_device):
    constant = torch.full((3, 8), 0.1)
    other = torch.randn(3, 8)
    assert torch.equal(kdfast.reference.pearson(constant, other), torch.zeros(3))
    assert torch.equal(kdfast.reference.standardize_rows(constant), torch.zeros(3, 8))
    # Spearman of a constant student row against any teacher: ρ_S = 0, so the loss is 1.
    constant, other = _on(backend_device, constant, other)
    assert kdfast.spearman_loss(constant, other, backend=backend_device[0]).item() == pytest.approx(1.0)


def test_ties_in_teacher_and_student(backend_device):
    s = torch.tensor([[1.0, 1.0, 2.0, 3.0, 3.0, 3.0]])
    t = torch.tensor([[0.0, 5.0, 5.0, 1.0, 1.0, 2.0]])
    s, t, y = _on(backend_device, s, t, torch.tensor([1]))
    backend = backend_device[0]
    for name, loss in LOSSES.items():
        assert torch.isfinite(loss(s, t, y, backend=backend)), name
    # Identical logits with ties: perfect correlation in the hard limit.
    assert kdfast.spearman_loss(s, s.clone(), 1e-3, backend=backend).item() == pytest.approx(0.0, abs=1e-6)
    # Tied entries get their average rank on both sides: the hard limit is scipy's value.
    expected = 1.0 - spearmanr(s[0].cpu().numpy(), t[0].cpu().numpy()).statistic
    assert kdfast.spearman_loss(s, t, 1e-3, backend=backend).item() == pytest.approx(expected, abs=1e-5)


def test_signed_zeros_tie_in_the_teacher_ranks(backend_device):
    # −0.0 == +0.0: they share their average rank, as in scipy.stats.rankdata.
    s = torch.tensor([[0.3, -1.2, 2.0, 0.7, -0.4]])
    t = torch.tensor([[-0.0, 0.0, 1.0, -2.0, 0.0]])
    expected = 1.0 - spearmanr(s[0].numpy(), t[0].numpy()).statistic
    s, t = _on(backend_device, s, t)
    assert kdfast.spearman_loss(s, t, 1e-3, backend=backend_device[0]).item() == pytest.approx(expected, abs=1e-5)


def test_c2_and_b1(backend_device):
    s, t, y = _on(backend_device, logits(1, 2, torch.float32), logits(1, 2, torch.float32), torch.tensor([1]))
    backend = backend_device[0]
    assert kdfast.pearson_loss(s, t, backend=backend).item() in (pytest.approx(0.0, abs=1e-6), pytest.approx(2.0))
    assert kdfast.dist_loss(s, t, gamma=0.0, backend=backend).item() == pytest.approx(
        kdfast.pearson_loss(s, t, backend=backend).item())
    for name, loss in LOSSES.items():
        assert torch.isfinite(loss(s, t, y, backend=backend)), name


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(name, dtype, backend_device):
    # Half inputs are upcast once and computed in fp32: the loss and gradients equal the
    # fp32 computation on the same (rounded) values, and gradients come back in the
    # input's dtype.
    s, t, y = _on(backend_device, logits(5, 33, dtype), logits(5, 33, dtype), torch.randint(0, 33, (5,)))
    loss, grad_s, grad_t = _loss_and_grads(name, s, t, y, backend_device[0])
    loss32, grad_s32, grad_t32 = _loss_and_grads(name, s.float(), t.float(), y, backend_device[0])
    assert loss.dtype == torch.float32 and grad_s.dtype == dtype
    torch.testing.assert_close(loss, loss32, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_s, grad_s32.to(dtype))
    if grad_t is not None:
        torch.testing.assert_close(grad_t, grad_t32.to(dtype))


@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_inputs(name, backend_device):
    s, t = logits(40, 6, torch.float32).t(), logits(40, 6, torch.float32).t()  # [6, 40] views
    s, t, y = _on(backend_device, s, t, torch.randint(0, 40, (6,)))
    assert not s.is_contiguous() and not t.is_contiguous()
    expected = _loss_and_grads(name, s.contiguous(), t.contiguous(), y, backend_device[0])
    got = _loss_and_grads(name, s, t, y, backend_device[0])
    for a, b in zip(got, expected):
        if b is not None:  # equal up to the summation order of fp32 reductions
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_grad_output_scales_the_gradient(name, backend_device):
    s, t, y = _on(backend_device, logits(4, 12, torch.float32), logits(4, 12, torch.float32),
                  torch.randint(0, 12, (4,)))
    _, g1, t1 = _loss_and_grads(name, s, t, y, backend_device[0])
    _, g2, t2 = _loss_and_grads(name, s, t, y, backend_device[0], grad_output=torch.tensor(-2.5, device=s.device))
    torch.testing.assert_close(g2, -2.5 * g1)
    if t1 is not None:
        torch.testing.assert_close(t2, -2.5 * t1)


def test_backward_twice_with_retained_graph(backend_device):
    # The saved gradient must not be consumed or modified by a first backward.
    s, t = _on(backend_device, logits(4, 12, torch.float32), logits(4, 12, torch.float32))
    s.requires_grad_()
    loss = kdfast.dist_loss(s, t, backend=backend_device[0])
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * first)


def test_backward_scales_the_saved_gradient_in_place(backend_device):
    # Without retain_graph the saved gradient is scaled where it lies: the gradient reaching
    # the student is that very buffer (no second B×C tensor), and its values are right.
    if backend_device[0] == "torch":
        pytest.skip("the reference runs PyTorch's own autograd")
    s, t = _on(backend_device, logits(4, 12, torch.float32), logits(4, 12, torch.float32))
    s.requires_grad_()
    loss = kdfast.kd_loss(s, t, backend=backend_device[0])
    node = loss.grad_fn
    while type(node).__name__ != "_FusedLossBackward":
        (node, _), *_ = [edge for edge in node.next_functions if edge[0] is not None]
    saved = node.saved_tensors[0]
    unscaled = saved.clone()
    seen = []
    s.register_hook(lambda grad: seen.append(grad.data_ptr()))
    (0.25 * loss).backward()
    assert seen == [saved.data_ptr()]
    torch.testing.assert_close(s.grad, 0.25 * unscaled)


def test_teacher_gradient_matches_an_independent_formulation(backend_device):
    # PESF-KD trains a teacher adapter through KL(softmax(t'/τ) ‖ stopgrad(p)).
    s, t = logits(6, 10, torch.float32), logits(6, 10, torch.float32)
    tau = 3.0
    t2 = t.clone().requires_grad_()
    ref = F.kl_div(F.log_softmax(s / tau, 1), F.log_softmax(t2 / tau, 1), reduction="batchmean",
                   log_target=True) * tau**2
    (theirs,) = torch.autograd.grad(ref, t2)
    s, t, y = _on(backend_device, s, t, torch.randint(0, 10, (6,)))
    t1 = t.clone().requires_grad_()
    (ours,) = torch.autograd.grad(kdfast.kd_loss(s, t1, tau, backend=backend_device[0]), t1)
    torch.testing.assert_close(ours.cpu(), theirs)
    for name in NAMES:
        _, _, grad_t = _loss_and_grads(name, s, t, y, backend_device[0])
        if name == "spearman":  # the teacher enters only through hard ranks: no gradient
            assert grad_t is None or not grad_t.any()
        else:
            assert grad_t is not None and torch.isfinite(grad_t).all() and grad_t.any()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_never_crash_and_check_finite_names_them(name, bad, backend_device):
    s, t = logits(3, 8, torch.float32), logits(3, 8, torch.float32)
    s_bad = s.clone()
    s_bad[1, 4] = bad
    t_bad = t.clone()
    t_bad[0, 0] = bad
    s, t, s_bad, t_bad, y = _on(backend_device, s, t, s_bad, t_bad, torch.randint(0, 8, (3,)))
    backend = backend_device[0]
    snapshot = s_bad.clone()
    loss = LOSSES[name](s_bad, t, y, backend=backend)  # may be NaN, must not raise or crash
    assert loss.dim() == 0
    assert torch.equal(s_bad.nan_to_num(), snapshot.nan_to_num())  # inputs untouched
    with pytest.raises(ValueError, match="student contains NaN or Inf"):
        LOSSES[name](s_bad, t, y, backend=backend, check_finite=True)
    with pytest.raises(ValueError, match="teacher contains NaN or Inf"):
        LOSSES[name](s, t_bad, y, backend=backend, check_finite=True)


# Large temperatures (issue 12, case 12). The KD term is τ²·KL and KL shrinks like 1/τ², so
# fp32 loses bits to cancellation as τ grows: losses accept τ ∈ (0, MAX_TEMPERATURE = 100]
# and, within it, every backend stays within fp32 tolerance of the fp64 computation.
TEMPERATURE_LOSSES = [name for name in NAMES if name != "spearman"]  # Spearman has no temperature


@pytest.mark.parametrize("name", TEMPERATURE_LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0, 100.0])
def test_every_accepted_temperature_matches_fp64(name, temperature, backend_device):
    s, t = logits(8, 300, torch.float32), logits(8, 300, torch.float32)
    y = torch.randint(0, 300, (8,))
    loss64, grad_s64, grad_t64 = _loss_and_grads(name, s.double(), t.double(), y, "torch", temperature=temperature)
    s, t, y = _on(backend_device, s, t, y)
    loss, grad_s, grad_t = _loss_and_grads(name, s, t, y, backend_device[0], temperature=temperature)
    torch.testing.assert_close(loss.double().cpu(), loss64, rtol=2e-4, atol=1e-6)
    scale = grad_s64.abs().max().item()
    torch.testing.assert_close(grad_s.double().cpu(), grad_s64, rtol=0, atol=2e-4 * scale)
    if grad_t is not None:
        torch.testing.assert_close(grad_t.double().cpu(), grad_t64, rtol=0, atol=2e-4 * grad_t64.abs().max().item())


@pytest.mark.parametrize("name", ["kd", "cmkd", "drkd"])
@pytest.mark.parametrize("temperature", [20.0, 100.0])
def test_nearly_equal_distributions_never_give_a_negative_loss(name, temperature, backend_device):
    # The true KL of these rows is ~1e-9; fp32 rounding at τ = 100 used to make it −2.5e-4.
    t = logits(16, 1000, torch.float32)
    s = t + logits(16, 1000, torch.float32, scale=1e-4)
    y = t.argmax(1)
    kw = {"temperature": temperature}
    if name == "cmkd":
        kw.update(corr_weight=0.0, ce_weight=0.0)
    truth = LOSSES[name](s.double(), t.double(), y, backend="torch", **kw).item()
    s, t, y = _on(backend_device, s, t, y)
    loss = LOSSES[name](s, t, y, backend=backend_device[0], **kw).item()
    assert 0.0 <= loss and loss == pytest.approx(truth, abs=1e-3)


@pytest.mark.parametrize("name", TEMPERATURE_LOSSES)
@pytest.mark.parametrize("temperature", [100.5, 1e4, 1e10, 1e30])
def test_temperatures_beyond_the_range_are_refused_naming_it(name, temperature, backend_device):
    s, t, y = _on(backend_device, logits(4, 10, torch.float32), logits(4, 10, torch.float32), torch.arange(4))
    with pytest.raises(ValueError, match=r"temperature must be in \(0, 100\]"):
        LOSSES[name](s, t, y, backend=backend_device[0], temperature=temperature)
