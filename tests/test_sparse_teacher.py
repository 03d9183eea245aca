"""Sparse (cached) teachers in every loss: the fused CPU operator against the torch reference
(values and gradients), k = C equal to the dense teacher, the uniform remainder for k < C,
edge cases and refusals. The Triton and CUDA kernels have their own files
(tests/test_sparse_triton.py, tests/test_sparse_cuda.py) against the CPU operator."""

from __future__ import annotations

import pytest
import torch

import kdfast
from kdfast.sparse_teacher import SparseTeacher

TEMPERATURES = (1.0, 4.0)


def sparse_from(logits: torch.Tensor, k: int, temperatures=TEMPERATURES) -> SparseTeacher:
    """The cache's record of ``logits``: the top k (descending, stable) and the full rows' log-sum-exp."""
    ordered = logits.sort(dim=1, descending=True, stable=True)
    lse = torch.stack([torch.logsumexp(logits.double() / t, dim=1).float() for t in temperatures], 1)
    return SparseTeacher(ordered.indices[:, :k], ordered.values[:, :k].float(), lse, temperatures, logits.shape[1])


def losses(target):
    """Every loss that takes a teacher, as f(student, teacher, backend)."""
    return {
        "kd": lambda s, t, b: kdfast.kd_loss(s, t, 4.0, backend=b),
        "pearson_rows": lambda s, t, b: kdfast.pearson_loss(s, t, 4.0, dim=1, backend=b),
        "pearson_columns": lambda s, t, b: kdfast.pearson_loss(s, t, 4.0, dim=0, backend=b),
        "dist": lambda s, t, b: kdfast.dist_loss(s, t, 4.0, 1.0, 2.0, backend=b),
        "spearman": lambda s, t, b: kdfast.spearman_loss(s, t, backend=b),
        "cmkd": lambda s, t, b: kdfast.cmkd_loss(s, t, target, 4.0, backend=b),
        "cmkd_fixed": lambda s, t, b: kdfast.cmkd_loss(s, t, None, 1.0, weighting="fixed", backend=b),
        "drkd": lambda s, t, b: kdfast.drkd_loss(s, t, target, 4.0, ce_weight=0.5, backend=b),
    }


def value_and_grad(fn, student, teacher, backend):
    student = student.detach().clone().requires_grad_(True)
    loss = fn(student, teacher, backend)
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), grad


@pytest.mark.parametrize("name", list(losses(None)))
@pytest.mark.parametrize("k", [1, 4, 23])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_operator_matches_the_reference(name, k, dtype):
    torch.manual_seed(k)
    batch, classes = 6, 23
    logits = torch.randn(batch, classes) * 3
    student = torch.randn(batch, classes).to(dtype)
    target = torch.randint(0, classes, (batch,))
    fn = losses(target)[name]
    teacher = sparse_from(logits, k)
    loss, grad = value_and_grad(fn, student, teacher, "cpu")
    expected, expected_grad = value_and_grad(fn, student.double(), teacher, "torch")
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(loss.double(), expected, **tolerance)
    torch.testing.assert_close(grad.double(), expected_grad, **tolerance)


@pytest.mark.parametrize("name", list(losses(None)))
def test_cpu_operator_is_bitwise_its_dense_path_on_the_rebuilt_row(name):
    """The rows the operator rebuilds are exactly SparseTeacher.dense's: same loss and gradient bits."""
    torch.manual_seed(1)
    logits = torch.randn(5, 17) * 2
    student = torch.randn(5, 17)
    target = torch.randint(0, 17, (5,))
    fn = losses(target)[name]
    teacher = sparse_from(logits, 5)
    temperature = None if name == "spearman" else (1.0 if name == "cmkd_fixed" else 4.0)
    loss, grad = value_and_grad(fn, student, teacher, "cpu")
    dense_loss, dense_grad = value_and_grad(fn, student, teacher.dense(temperature), "cpu")
    assert torch.equal(loss, dense_loss) and torch.equal(grad, dense_grad)


@pytest.mark.parametrize("name", list(losses(None)))
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_k_equal_c_is_the_dense_teacher(name, backend):
    """With every class stored the loss is the dense loss on the original logits, bit for bit."""
    torch.manual_seed(2)
    logits = torch.randn(4, 9) * 3
    student = torch.randn(4, 9)
    target = torch.randint(0, 9, (4,))
    fn = losses(target)[name]
    loss, grad = value_and_grad(fn, student, sparse_from(logits, 9), backend)
    dense_loss, dense_grad = value_and_grad(fn, student, logits, backend)
    assert torch.equal(loss, dense_loss) and torch.equal(grad, dense_grad)


def test_the_fused_operator_never_builds_the_dense_teacher(monkeypatch):
    """The CPU operator rebuilds rows in its scratch: SparseTeacher.dense is never called."""

    def refuse(*_):
        raise AssertionError("the dense B×C teacher was built")

    logits, student = torch.randn(4, 30), torch.randn(4, 30)
    target = torch.randint(0, 30, (4,))
    teacher = sparse_from(logits, 5)
    monkeypatch.setattr(SparseTeacher, "dense", refuse)
    for name, fn in losses(target).items():
        loss, _ = value_and_grad(fn, student, teacher, "cpu")
        assert torch.isfinite(loss), name


def test_ties_at_the_kth_value_and_a_value_equal_to_the_fill():
    """Equal logits across the top-k boundary, and a stored value equal to the fill logit."""
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, -2.0, 0.5], [2.0, 2.0, 2.0, 1.0, 0.0, -1.0]])
    student = torch.randn(2, 6)
    target = torch.tensor([4, 0])
    teacher = sparse_from(logits, 2)
    values = teacher.values.clone()
    values[:, 1] = teacher.fill(4.0)  # the second stored logit ties with the other classes at τ = 4
    equal_fill = SparseTeacher(teacher.indices, values, teacher.log_sum_exp, TEMPERATURES, 6)
    for sparse in (teacher, equal_fill):
        for name, fn in losses(target).items():
            if name in ("pearson_columns", "dist"):
                continue  # the column term of two rows is degenerate but covered above
            loss, grad = value_and_grad(fn, student, sparse, "cpu")
            expected, expected_grad = value_and_grad(fn, student.double(), sparse, "torch")
            torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5, msg=name)
            torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-5, msg=name)


def test_spearman_ranks_the_top_k_exactly_and_ties_the_rest():
    """The rank-only fill ties the other classes just below the k-th logit."""
    logits = torch.tensor([[0.3, 2.0, -1.0, 5.0, 0.1]])
    teacher = sparse_from(logits, 2)
    dense = teacher.dense(None)
    from kdfast.softrank import average_ranks

    assert average_ranks(dense).tolist() == [[2.0, 4.0, 2.0, 5.0, 2.0]]
    assert float(dense[0, 0]) < 2.0 and float(dense[0, 0]) == float(torch.nextafter(torch.tensor(2.0),
                                                                                    torch.tensor(-10.0)))


@pytest.mark.parametrize("shape", [(1, 2), (1, 5), (3, 2)])
def test_smallest_shapes(shape):
    batch, classes = shape
    torch.manual_seed(3)
    logits, student = torch.randn(batch, classes), torch.randn(batch, classes)
    target = torch.randint(0, classes, (batch,))
    for k in (1, classes):
        teacher = sparse_from(logits, k)
        for name, fn in losses(target).items():
            if name in ("pearson_columns", "dist") and batch < 2:
                continue
            loss, grad = value_and_grad(fn, student, teacher, "cpu")
            expected, expected_grad = value_and_grad(fn, student.double(), teacher, "torch")
            torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5, msg=f"{name} k={k}")
            torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-5, msg=f"{name} k={k}")


def test_modules_take_a_sparse_teacher():
    logits, student = torch.randn(4, 12), torch.randn(4, 12)
    teacher = sparse_from(logits, 3)
    assert torch.equal(kdfast.nn.KDLoss(4.0, backend="cpu")(student, teacher),
                       kdfast.kd_loss(student, teacher.dense(4.0), 4.0, backend="cpu"))


def test_bad_sparse_teachers_are_refused_by_name():
    logits, student = torch.randn(4, 12), torch.randn(4, 12)
    teacher = sparse_from(logits, 3)
    with pytest.raises(ValueError, match=r"teacher \(a SparseTeacher\) must describe the student's 3 rows and 12"):
        kdfast.kd_loss(student[:3], teacher)
    with pytest.raises(ValueError, match=r"must describe the student's 4 rows and 11 classes, got 4 rows and 12"):
        kdfast.kd_loss(student[:, :11], teacher)
    with pytest.raises(ValueError, match="temperature 2 has no stored log-sum-exp"):
        kdfast.kd_loss(student, teacher, 2.0)
    # every temperature is exact when k = C
    full = sparse_from(logits, 12)
    assert torch.equal(kdfast.kd_loss(student, full, 2.0, backend="cpu"), kdfast.kd_loss(student, logits, 2.0,
                                                                                         backend="cpu"))
    grad_values = teacher.values.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="cannot take a gradient"):
        kdfast.kd_loss(student, SparseTeacher(teacher.indices, grad_values, teacher.log_sum_exp, TEMPERATURES, 12))
    bad = teacher.values.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="teacher values contains NaN"):
        kdfast.kd_loss(student, SparseTeacher(teacher.indices, bad, teacher.log_sum_exp, TEMPERATURES, 12),
                       check_finite=True)
    with pytest.raises(TypeError, match="teacher must be a torch.Tensor, got SparseTeacher"):
        kdfast.rectify(teacher, torch.zeros(4, dtype=torch.long))


def test_the_cpu_operator_refuses_bad_sparse_arguments():
    student = torch.randn(2, 6)
    values, indices, fill = torch.randn(2, 3), torch.tensor([[0, 2, 5], [1, 3, 6]], dtype=torch.int32), torch.zeros(2)
    op = torch.ops.kdfast.fused_kd_loss
    arguments = (None, None, 4.0, 16.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0, 0.0, False, True)
    with pytest.raises(RuntimeError, match=r"teacher_indices must be in \[0, C=6\)"):
        op(student, values, *arguments, False, indices, fill)
    with pytest.raises(RuntimeError, match="a sparse teacher has no gradient"):
        op(student, values, *arguments, True, indices.clamp_max(5), fill)
    with pytest.raises(RuntimeError, match="int32 teacher_indices"):
        op(student, values, *arguments, False, indices.long(), fill)
    with pytest.raises(RuntimeError, match="teacher_fill \\[B\\]"):
        op(student, values, *arguments, False, indices.clamp_max(5), fill[:1])
    with pytest.raises(RuntimeError, match="needs teacher_fill"):
        op(student, values, *arguments, False, indices.clamp_max(5), None)
