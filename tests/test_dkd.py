"""DKD and logit standardization: the reference against transcriptions of the papers'
equations and the authors' code, gradients (fp64 gradcheck), the fused CPU operator against
the reference, edge cases, refusals, the trainer's options. (Triton: tests/test_dkd_triton.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast.config import resolve_config
from kdfast.sparse_teacher import SparseTeacher


def logits(batch, classes, seed, scale=3.0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, classes, generator=generator, dtype=torch.float64) * scale).to(dtype)


def dkd_paper(student, teacher, target, alpha, beta, temperature):
    """DKD written from the paper's equations (Zhao et al. 2022, eq. 1–4), one sample at a time."""
    total = 0.0
    for s_row, t_row, y in zip(student.tolist(), teacher.tolist(), target.tolist()):
        def softmax(values):
            top = max(values)
            exps = [math.exp((v - top) / temperature) for v in values]
            return [e / sum(exps) for e in exps]

        p, q = softmax(s_row), softmax(t_row)
        b_p, b_q = [p[y], 1 - p[y]], [q[y], 1 - q[y]]
        tckd = sum(qq * math.log(qq / pp) for qq, pp in zip(b_q, b_p) if qq > 0)
        others = [c for c in range(len(p)) if c != y]
        p_hat = softmax([s_row[c] for c in others])
        q_hat = softmax([t_row[c] for c in others])
        nckd = sum(qq * math.log(qq / pp) for qq, pp in zip(q_hat, p_hat) if qq > 0)
        total += alpha * tckd + beta * nckd
    return temperature**2 * total / len(target)


def dkd_authors(student, teacher, target, alpha, beta, temperature):
    """The authors' formulation (their code's steps, written here): the target's probability
    pushed to ~0 by subtracting 1000 from its logit/τ for NCKD."""
    gt = F.one_hot(target, student.shape[1]).bool()
    p, q = F.softmax(student / temperature, 1), F.softmax(teacher / temperature, 1)

    def split(x):
        return torch.stack([(x * gt).sum(1), (x * ~gt).sum(1)], 1)

    tckd = F.kl_div(torch.log(split(p)), split(q), reduction="sum")
    nckd = F.kl_div(F.log_softmax(student / temperature - 1000.0 * gt, 1), F.softmax(teacher / temperature - 1000.0 * gt, 1),
                    reduction="sum")
    return (alpha * tckd + beta * nckd) * temperature**2 / len(target)


def kd_standardized_authors(student, teacher, temperature):
    """Logit standardization's KD as the authors' code computes it: x.std() (unbiased) + 1e-7."""

    def normalize(x):
        return (x - x.mean(dim=-1, keepdim=True)) / (1e-7 + x.std(dim=-1, keepdim=True))

    log_p = F.log_softmax(normalize(student) / temperature, dim=1)
    q = F.softmax(normalize(teacher) / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="none").sum(1).mean() * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_is_the_papers_equations_and_the_authors_code(temperature):
    student, teacher = logits(7, 11, 0), logits(7, 11, 1)
    target = torch.tensor([0, 3, 10, 5, 5, 2, 7])
    target[0] = teacher[0].argmax()  # one row where the target is the teacher's argmax
    ours = float(kdfast.dkd_loss(student, teacher, target, 1.0, 8.0, temperature, backend="torch"))
    assert ours == pytest.approx(dkd_paper(student, teacher, target, 1.0, 8.0, temperature), rel=1e-12)
    assert ours == pytest.approx(float(dkd_authors(student, teacher, target, 1.0, 8.0, temperature)), rel=1e-9)


def test_dkd_differs_from_the_authors_trick_where_it_is_inexact():
    """A target logit 1000·τ below the others: the −1000 trick no longer removes it."""
    student, teacher = logits(1, 4, 2), logits(1, 4, 3)
    target = torch.tensor([1])
    student[0, 1] = teacher[0, 1] = 5000.0
    exact = float(kdfast.dkd_loss(student, teacher, target, 0.0, 1.0, 1.0, backend="torch"))
    assert exact == pytest.approx(dkd_paper(student, teacher, target, 0.0, 1.0, 1.0), rel=1e-9)
    gt = F.one_hot(target, 4).bool()
    trick = F.kl_div(F.log_softmax(student - 1000.0 * gt, 1), F.softmax(teacher - 1000.0 * gt, 1), reduction="sum")
    assert exact > 1e-3 and float(trick) < 1e-6  # the trick's target (4000 after −1000) still takes all the mass


def test_standardized_kd_is_the_authors_code():
    student, teacher = logits(6, 10, 4), logits(6, 10, 5)
    ours = kdfast.kd_loss(student, teacher, 2.0, standardize=True, backend="torch")
    torch.testing.assert_close(ours, kd_standardized_authors(student, teacher, 2.0), rtol=1e-12, atol=1e-12)


def test_standardization_is_scale_and_shift_invariant():
    student, teacher = logits(4, 9, 6), logits(4, 9, 7)
    loss = kdfast.kd_loss(student, teacher, 2.0, standardize=True, backend="torch")
    moved = kdfast.kd_loss(3 * student + 5, 0.5 * teacher - 2, 2.0, standardize=True, backend="torch")
    torch.testing.assert_close(loss, moved, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["dkd", "dkd_std", "kd_std", "dist_std", "cmkd_std", "drkd_std"])
def test_reference_gradcheck(name):
    student = logits(3, 5, 8).requires_grad_(True)
    # CMKD's entropy difficulty carries no gradient by definition: a numerical teacher
    # gradient would see it move, so CMKD is checked with respect to the student only.
    teacher = logits(3, 5, 9).requires_grad_(name != "cmkd_std")
    target = torch.tensor([1, 4, 0])
    fn = CASES[name](target)
    assert torch.autograd.gradcheck(lambda s, t: fn(s, t, "torch"), (student, teacher))


CASES = {
    "dkd": lambda y: lambda s, t, b: kdfast.dkd_loss(s, t, y, 1.0, 8.0, 4.0, backend=b),
    "dkd_std": lambda y: lambda s, t, b: kdfast.dkd_loss(s, t, y, 2.0, 0.5, 2.0, standardize=True, backend=b),
    "kd_std": lambda y: lambda s, t, b: kdfast.kd_loss(s, t, 2.0, standardize=True, backend=b),
    "dist_std": lambda y: lambda s, t, b: kdfast.dist_loss(s, t, 2.0, standardize=True, backend=b),
    "cmkd_std": lambda y: lambda s, t, b: kdfast.cmkd_loss(s, t, y, 2.0, ce_weight=0.7, standardize=True,
                                                           backend=b),
    "drkd_std": lambda y: lambda s, t, b: kdfast.drkd_loss(s, t, y, 2.0, ce_weight=0.5, standardize=True, backend=b),
}


def value_and_grads(fn, student, teacher, backend, teacher_grad=False):
    student = student.detach().clone().requires_grad_(True)
    teacher = teacher.detach().clone().requires_grad_(teacher_grad)
    loss = fn(student, teacher, backend)
    grads = torch.autograd.grad(loss, [student, teacher] if teacher_grad else [student])
    return loss.detach(), grads


def relative_error(a, b):
    """Largest difference relative to the largest expected value; gradients that vanish (C = 2
    standardizes every row to ±1/√2, where only rounding is left) are compared at an absolute
    1e-2 scale."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-2))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("shape", [(6, 13), (1, 2), (3, 2), (5, 1000)])
def test_cpu_operator_matches_the_reference(name, shape):
    batch, classes = shape
    if name == "dist_std" and classes == 2:
        # Standardized two-class rows are ±1/√2: the intra-class columns are constant or
        # two-valued, where the correlation's 1/1e-8 floor amplifies rounding.
        pytest.skip("the intra-class term is degenerate on standardized two-class rows")
    student, teacher = logits(batch, classes, 10), logits(batch, classes, 11)
    target = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(12))
    target[0] = int(teacher[0].argmax())  # target = argmax in one row, ≠ in (most) others
    fn = CASES[name](target)
    loss, grads = value_and_grads(fn, student.float(), teacher.float(), "cpu", teacher_grad=True)
    expected, expected_grads = value_and_grads(fn, student, teacher, "torch", teacher_grad=True)
    assert relative_error(loss, expected) <= 1e-5
    for grad, expected_grad in zip(grads, expected_grads):
        assert relative_error(grad, expected_grad) <= 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_cpu_bfloat16_error_is_at_most_twice_the_reference_at_bfloat16(name):
    student, teacher = logits(8, 100, 13), logits(8, 100, 14)
    target = torch.randint(0, 100, (8,), generator=torch.Generator().manual_seed(15))
    fn = CASES[name](target)
    truth, truth_grads = value_and_grads(fn, student, teacher, "torch")
    low_s, low_t = student.bfloat16(), teacher.bfloat16()
    fused, fused_grads = value_and_grads(fn, low_s, low_t, "cpu")
    ref, ref_grads = value_and_grads(fn, low_s, low_t, "torch")
    # Both see the same rounded inputs; the comparison is of their arithmetic.
    assert relative_error(fused_grads[0], truth_grads[0]) <= 2 * relative_error(ref_grads[0], truth_grads[0]) + 1e-6
    assert relative_error(fused, truth) <= 2 * relative_error(ref, truth) + 1e-6


@pytest.mark.parametrize("gap", [0.0, 20.0, 39.0, 41.0, 60.0, 120.0])
def test_cpu_non_target_softmax_on_both_sides_of_its_shortcut(gap):
    """The CPU kernel renormalizes the row's softmax for the non-target classes when their
    maximum is within 40 (in logits/τ) of the target's, and takes their own exps beyond:
    both agree with the fp64 reference as the target's lead grows through the switch."""
    generator = torch.Generator().manual_seed(int(gap))
    tau = 2.0
    student = torch.randn(6, 50, dtype=torch.float64, generator=generator)
    teacher = torch.randn(6, 50, dtype=torch.float64, generator=generator)
    target = torch.randint(0, 50, (6,), generator=generator)
    rows = torch.arange(6)
    for x in (student, teacher):  # the target leads the other classes by `gap` in units of τ
        x[rows, target] = x.max(dim=1).values + gap * tau
    student[::2, :] = student[::2, :] * 0.5  # and half the rows with a student gap of only gap/2
    expected = reference_and_gradients(student, teacher, target, tau)
    got = reference_and_gradients(student.float(), teacher.float(), target, tau, backend="cpu")
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours.double(), theirs, rtol=2e-5, atol=1e-6)


def reference_and_gradients(student, teacher, target, tau, backend="torch"):
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    loss = kdfast.dkd_loss(s, t, target, 1.0, 8.0, tau, backend=backend)
    return (loss, *torch.autograd.grad(loss, (s, t)))


def test_edge_rows():
    """Ties, ±1e4 logits and a constant row (standardized to zeros, finite gradient)."""
    student = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1e4, -1e4, 0.0, 3.0], [0.5, 0.5, -2.0, 7.0]])
    teacher = torch.tensor([[2.0, 2.0, -1.0, 0.0], [-1e4, 1e4, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    target = torch.tensor([0, 1, 3])
    for name, make in CASES.items():
        fn = make(target)
        loss, grads = value_and_grads(fn, student, teacher, "cpu", teacher_grad=True)
        expected, expected_grads = value_and_grads(fn, student.double(), teacher.double(), "torch", teacher_grad=True)
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads), name
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5, msg=name)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sparse_teacher_with_dkd_and_standardization():
    student, teacher = logits(4, 12, 16, dtype=torch.float32), logits(4, 12, 17, dtype=torch.float32)
    target = torch.tensor([0, 5, 11, 3])
    ordered = teacher.sort(1, descending=True)
    full = SparseTeacher(ordered.indices, ordered.values, torch.zeros(4, 1), (4.0,), 12)
    for backend in ("cpu", "torch"):
        assert torch.equal(kdfast.dkd_loss(student, full, target, backend=backend, standardize=True),
                           kdfast.dkd_loss(student, teacher, target, backend=backend, standardize=True))
    top = teacher.topk(3, dim=1)
    lse = torch.logsumexp(teacher / 4.0, dim=1, keepdim=True)
    partial = SparseTeacher(top.indices, top.values, lse, (4.0,), 12)
    torch.testing.assert_close(kdfast.dkd_loss(student, partial, target, backend="cpu"),
                               kdfast.dkd_loss(student, partial.dense(4.0), target, backend="cpu"))
    with pytest.raises(ValueError, match="standardize=True needs the teacher's whole rows"):
        kdfast.kd_loss(student, partial, standardize=True)


def test_bad_input_is_named():
    student, teacher = torch.randn(3, 5), torch.randn(3, 5)
    target = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="alpha must be"):
        kdfast.dkd_loss(student, teacher, target, alpha=-1.0)
    with pytest.raises(ValueError, match="beta must be"):
        kdfast.dkd_loss(student, teacher, target, beta=-0.5)
    with pytest.raises(ValueError, match="target is required by dkd_loss"):
        kdfast.dkd_loss(student, teacher, None)
    with pytest.raises(ValueError, match="dkd_loss needs at least 2 classes"):
        kdfast.dkd_loss(student[:, :1], teacher[:, :1], torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="standardize=True needs at least 2 classes"):
        kdfast.kd_loss(student[:, :1], teacher[:, :1], standardize=True)
    with pytest.raises(TypeError, match="standardize must be True or False"):
        kdfast.kd_loss(student, teacher, standardize="yes")
    bad = teacher.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="teacher contains NaN"):
        kdfast.dkd_loss(student, bad, target, check_finite=True)
    with pytest.raises(RuntimeError, match="need a target"):
        torch.ops.kdfast.fused_kd_loss(student, teacher, None, None, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0, 0.0, False,
                                       True, False, None, None, 1.0, 8.0, False)


def test_torch_compile_fullgraph():
    student, teacher = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
    target = torch.tensor([1, 2, 3, 4])

    def step(s, t, y):
        return (kdfast.dkd_loss(s, t, y, backend="cpu") + kdfast.kd_loss(s, t, standardize=True, backend="cpu"))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(student, teacher, target)
    loss.backward()
    expected = step(student.detach().requires_grad_(True), teacher, target)
    torch.testing.assert_close(loss, expected)


def test_trainer_runs_dkd_with_its_ramp_and_standardization(tmp_path):
    from kdfast.train import MethodLoss

    config = resolve_config(method="dkd", teacher="mlp-32", teacher_checkpoint="unused.pt", dkd_warmup_epochs=4,
                            logit_standardization=True, dkd_alpha=1.0, dkd_beta=2.0, output=str(tmp_path))
    loss_fn = MethodLoss(config, 10, 100)
    student, teacher = torch.randn(8, 10), torch.randn(8, 10)
    labels = torch.randint(0, 10, (8,))
    full = kdfast.dkd_loss(student, teacher, labels, 1.0, 2.0, 4.0, standardize=True)
    for epoch, share in ((0, 0.25), (1, 0.5), (3, 1.0), (9, 1.0)):
        terms = loss_fn(student, teacher, None, None, labels, None, epoch, None)
        torch.testing.assert_close(terms["dkd"], share * full)
    with pytest.raises(ValueError, match="logit_standardization applies to the methods"):
        resolve_config(method="pesf", teacher="mlp-32", teacher_checkpoint="t.pt", logit_standardization=True)
