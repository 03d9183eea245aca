"""The fused backends against the reference, on loss and gradients (student and teacher).

fp32: relative error ≤ 1e-5 against the float64 reference on the same inputs.
fp16/bf16: error no worse than 2× the error of the reference computed at that dtype,
both measured against the float64 reference on the same (rounded) inputs.
Shapes include C = 1 where the loss allows it, 2, 7, 1000, 1001, 32000, and B = 1.
"""

import pytest
import torch
from helpers import teacher_like

import kdfast
from kdfast.kernels.kd_losses import MAX_SPEARMAN_CLASSES

# Each case: (loss of (student, teacher, target, weights, backend), needs B >= 2, needs C >= 2).
CASES = {
    "kd": (lambda s, t, y, w, b: kdfast.kd_loss(s, t, 3.0, backend=b), False, False),
    "pearson_rows": (lambda s, t, y, w, b: kdfast.pearson_loss(s, t, 2.0, dim=1, backend=b), False, True),
    "pearson_columns": (lambda s, t, y, w, b: kdfast.pearson_loss(s, t, 2.0, dim=0, backend=b), True, False),
    "dist": (lambda s, t, y, w, b: kdfast.dist_loss(s, t, 1.5, 1.3, 0.7, backend=b), True, True),
    "dist_inter_only": (lambda s, t, y, w, b: kdfast.dist_loss(s, t, 1.0, 1.0, 0.0, backend=b), False, True),
    "spearman": (lambda s, t, y, w, b: kdfast.spearman_loss(s, t, backend=b), False, True),
    "cmkd": (lambda s, t, y, w, b: kdfast.cmkd_loss(s, t, y, 3.0, backend=b), False, True),
    "cmkd_fixed_no_target": (
        lambda s, t, y, w, b: kdfast.cmkd_loss(s, t, None, 2.0, 0.5, 1.5, 1.0, "fixed", backend=b), False, True),
    "cmkd_per_sample": (
        lambda s, t, y, w, b: kdfast.cmkd_loss(s, t, y, 4.0, 1.0, 2.0, 0.5, w, 0.01, backend=b), False, True),
    "drkd": (lambda s, t, y, w, b: kdfast.drkd_loss(s, t, y, 3.0, 0.3, backend=b), False, False),
}
# (150, 37): several chunks of rows in the column statistics (64 rows each on the CPU,
# the last one partial).
SHAPES = [(1, 1), (1, 2), (3, 7), (150, 37), (16, 1000), (5, 1001), (2, 32000)]


def _applicable(case, shape):
    _, needs_rows, needs_classes = CASES[case]
    return (shape[0] >= 2 or not needs_rows) and (shape[1] >= 2 or not needs_classes)


def _inputs(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student, teacher, target = teacher_like(*shape, generator=generator)
    weights = torch.rand(shape[0], generator=generator, dtype=torch.float64)
    return student, teacher, target, weights


def _loss_and_grads(case, s, t, y, w, backend, device):
    s = s.detach().to(device).requires_grad_()
    t = t.detach().to(device).requires_grad_()
    loss = CASES[case][0](s, t, y.to(device), w.to(device), backend)
    grads = torch.autograd.grad(loss, (s, t), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, (s, t))]
    return [loss.detach().double().cpu()] + [g.double().cpu() for g in grads]


def _relative_errors(got, truth):
    """Loss: |Δ| / max(|L|, 1); gradients: max |Δ| / max(max |g|, 1e-3).

    The floors make the error absolute where the exact value is (nearly) zero, e.g. a
    correlation loss at ρ = 1 (C = 2) or the gradient of an already matched pair, where a
    relative error would only measure float rounding of nothing.
    """
    errors = []
    for index, (a, b) in enumerate(zip(got, truth)):
        floor = 1.0 if index == 0 else 1e-3
        errors.append((a - b).abs().max().item() / max(b.abs().max().item(), floor))
    return errors


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("case", CASES)
def test_float32_matches_the_float64_reference(case, shape, fused_backend_device):
    if not _applicable(case, shape):
        pytest.skip(f"{case} is not defined for shape {shape}")
    backend, device = fused_backend_device
    if backend == "triton" and case.startswith(("spearman", "cmkd")) and shape[1] > MAX_SPEARMAN_CLASSES:
        pytest.skip("beyond the Triton Spearman kernel's width (auto runs these on cuda: tests/test_gpu_path.py)")
    s, t, y, w = _inputs(shape)
    s, t = s.float(), t.float()  # the truth sees the same fp32 values, upcast
    truth = _loss_and_grads(case, s.double(), t.double(), y, w, "torch", "cpu")
    got = _loss_and_grads(case, s, t, y, w, backend, device)
    for name, error in zip(("loss", "grad_student", "grad_teacher"), _relative_errors(got, truth)):
        assert error <= 1e-5, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(1, 2), (3, 7), (16, 1000), (5, 1001)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("case", CASES)
def test_half_precision_no_worse_than_the_reference_at_that_dtype(case, shape, dtype, fused_backend_device):
    if not _applicable(case, shape):
        pytest.skip(f"{case} is not defined for shape {shape}")
    backend, device = fused_backend_device
    s, t, y, w = _inputs(shape)
    s, t = s.to(dtype), t.to(dtype)  # both sides see the same rounded inputs
    truth = _loss_and_grads(case, s.double(), t.double(), y, w, "torch", "cpu")
    reference = _loss_and_grads(case, s, t, y, w, "torch", device)
    got = _loss_and_grads(case, s, t, y, w, backend, device)
    # A floor of a quarter ulp of the dtype at the largest value: the rounding of the
    # gradient to the input's dtype, which no implementation can avoid.
    floor = torch.finfo(dtype).eps / 4
    for name, ours, theirs in zip(("loss", "grad_student", "grad_teacher"), _relative_errors(got, truth),
                                  _relative_errors(reference, truth)):
        assert ours <= 2 * theirs + floor, f"{name}: error {ours:.2e} vs reference at {dtype} {theirs:.2e}"


def test_mixed_student_and_teacher_dtypes(fused_backend_device):
    backend, device = fused_backend_device
    s, t, y, w = _inputs((8, 100))
    truth = _loss_and_grads("cmkd", s.bfloat16().double(), t.float().double(), y, w, "torch", "cpu")
    got = _loss_and_grads("cmkd", s.bfloat16(), t.float(), y, w, backend, device)
    errors = _relative_errors(got, truth)
    assert errors[0] <= 1e-5 and errors[2] <= 1e-5  # loss and the fp32 teacher's gradient
    assert errors[1] <= torch.finfo(torch.bfloat16).eps  # the bf16 student's gradient


def test_results_do_not_depend_on_the_number_of_threads():
    s, t, y, w = _inputs((200, 300))
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_loss_and_grads("dist", s.float(), t.float(), y, w, "cpu", "cpu"))
            results.append(_loss_and_grads("cmkd", s.float(), t.float(), y, w, "cpu", "cpu"))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(results[:2], results[2:]):
        for x, z in zip(a, b):
            assert torch.equal(x, z)


def test_float64_inputs_go_to_the_reference_or_say_why():
    s, t, _, _ = _inputs((4, 10))
    torch.testing.assert_close(kdfast.kd_loss(s, t), kdfast.kd_loss(s, t, backend="torch"))
    with pytest.raises(kdfast.BackendUnavailableError, match="not float64"):
        kdfast.kd_loss(s, t, backend="cpu")


def test_backward_only_scales_the_saved_gradient(monkeypatch):
    # The kernel runs once, in forward; backward must not call it again.
    s, t, _, _ = _inputs((4, 10))
    s = s.float().requires_grad_()
    calls = []
    op = torch.ops.kdfast.fused_kd_loss

    def counting(*args):
        calls.append(1)
        return op(*args)

    monkeypatch.setattr(torch.ops.kdfast, "fused_kd_loss", counting)
    loss = kdfast.dist_loss(s, t.float(), backend="cpu")
    (3.0 * loss).backward()
    assert len(calls) == 1
    s2 = s.detach().clone().requires_grad_()
    kdfast.dist_loss(s2, t.float(), backend="torch").backward()
    torch.testing.assert_close(s.grad, 3.0 * s2.grad)


def test_inference_computes_no_gradient():
    s, t, y, _ = _inputs((4, 10))
    with torch.no_grad():
        loss = kdfast.cmkd_loss(s.float().requires_grad_(), t.float(), y, backend="cpu")
    assert loss.grad_fn is None and torch.isfinite(loss)
