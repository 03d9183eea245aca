"""DKD's terms and logit standardization in the CUDA kernels (csrc/cuda/fused_loss.cu).

On a GPU: backend="cuda" against backend="cpu" (csrc/losses_cpu.cpp is the reference) for
dkd_loss and the standardize=True variants of kd, dist, cmkd, drkd and dkd, fp32 and bf16
students, student and teacher gradients, C in {2, 1000, 5000} and every row layout of the
CUDA kernels (warp lanes, block-resident, chunked), rows at ±1e4 and constant rows, sparse
teachers, and the column and Spearman terms on standardized rows through the operator.
On the CPU: the launcher's refusals and what the Python wrapper passes to the launcher
(through a fake launcher), which need no GPU.
"""

import types

import pytest
import torch
from helpers import install_fake_cuda_launcher, teacher_like

import kdfast
from kdfast import fused
from kdfast.sparse_teacher import SparseTeacher

# Each case: the loss of (student, teacher, target, backend).
CASES = {
    "dkd": lambda s, t, y, b: kdfast.dkd_loss(s, t, y, 1.0, 8.0, 4.0, backend=b),
    "dkd_std": lambda s, t, y, b: kdfast.dkd_loss(s, t, y, 1.0, 2.0, 2.0, standardize=True, backend=b),
    "kd_std": lambda s, t, y, b: kdfast.kd_loss(s, t, 3.0, standardize=True, backend=b),
    "dist_std": lambda s, t, y, b: kdfast.dist_loss(s, t, 1.5, 1.3, 0.7, standardize=True, backend=b),
    "cmkd_std": lambda s, t, y, b: kdfast.cmkd_loss(s, t, y, 3.0, standardize=True, backend=b),
    "drkd_std": lambda s, t, y, b: kdfast.drkd_loss(s, t, y, 3.0, 0.3, standardize=True, backend=b),
}
ROWS = 40


def _inputs(rows, cols, dtype, seed=0, extreme=False):
    generator = torch.Generator().manual_seed(seed)
    student, teacher, target = teacher_like(rows, cols, generator=generator)
    if extreme:
        # Rows at ±1e4 (the target's gap beyond fp32's exp range at τ ≤ 4) and constant rows
        # (a zero std: the standardization's gradient has no std term).
        student[0], teacher[0] = student[0] * 1e3, teacher[0] * 1e3
        student[1] = torch.where(torch.arange(cols) % 2 == 0, 1e4, -1e4)
        teacher[1] = -student[1]
        teacher[2, :] = 1e4
        teacher[2, target[2]] = -1e4
        student[3, :] = 0.5
        teacher[4, :] = -3.0
        student[5, :] = 7.0
        teacher[5, :] = 7.0
    return student.to(dtype), teacher.to(dtype), target


def _loss_and_grads(case, student, teacher, target, backend, device, teacher_grad=True):
    s = student.detach().to(device).requires_grad_()
    if isinstance(teacher, SparseTeacher):
        t, teacher_grad = teacher.to(device), False
    else:
        t = teacher.detach().to(device).requires_grad_(teacher_grad)
    loss = CASES[case](s, t, target.to(device), backend)
    grads = torch.autograd.grad(loss, (s, t) if teacher_grad else (s,))
    return loss.detach().cpu(), [g.cpu() for g in grads]


def _relative(a, b, floor):
    return (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), floor)


def _check(case, student, teacher, target, dtype, teacher_grad=True):
    cpu_loss, cpu_grads = _loss_and_grads(case, student, teacher, target, "cpu", "cpu", teacher_grad)
    loss, grads = _loss_and_grads(case, student, teacher, target, "cuda", "cuda", teacher_grad)
    assert torch.isfinite(cpu_loss) == torch.isfinite(loss), (loss, cpu_loss)
    assert _relative(loss, cpu_loss, 1.0) <= 1e-5, (loss, cpu_loss)
    # fp32: within 1e-5 of the CPU's; bf16: both gradients rounded to bf16 once (an ulp).
    bound = 1e-5 if dtype == torch.float32 else torch.finfo(torch.bfloat16).eps
    for grad, cpu_grad in zip(grads, cpu_grads):
        assert _relative(grad, cpu_grad, 1e-3) <= bound, (case, _relative(grad, cpu_grad, 1e-3))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cols", [2, 1000, 5000])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_matches_cpu(case, cols, dtype):
    student, teacher, target = _inputs(ROWS, cols, dtype)
    _check(case, student, teacher, target, dtype)


@pytest.mark.gpu
@pytest.mark.smoke
@pytest.mark.parametrize("cols", [7, 100, 300, 1000, 2048, 5000, 9000])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_matches_cpu_on_extreme_and_constant_rows(case, cols):
    """Every row layout (8 lanes, 32 lanes × 1 and × 2 runs, a block resident, chunked)
    with rows at ±1e4 and constant rows, both Spearman paths (cmkd at 9000)."""
    student, teacher, target = _inputs(ROWS, cols, torch.float32, seed=cols, extreme=True)
    _check(case, student, teacher, target, torch.float32)


def _sparse(logits, k, temperatures=(2.0, 4.0)):
    ordered = logits.float().sort(dim=1, descending=True, stable=True)
    lse = torch.stack([torch.logsumexp(logits.double() / t, dim=1).float() for t in temperatures], 1)
    return SparseTeacher(ordered.indices[:, :k], ordered.values[:, :k], lse, temperatures, logits.shape[1])


@pytest.mark.gpu
@pytest.mark.parametrize("cols", [2, 1000, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_matches_cpu_with_a_sparse_teacher(cols, dtype):
    student, logits, target = _inputs(ROWS, cols, dtype)
    for k in sorted({1, min(10, cols), cols}):
        _check("dkd", student, _sparse(logits, k), target, dtype)
    _check("dkd_std", student, _sparse(logits, cols), target, dtype)  # standardize needs whole rows
    _check("kd_std", student, _sparse(logits, cols), target, dtype)


# The operator's arguments from temperature to rectify, then tckd, nckd, standardize.
OP_CONFIGS = {
    "columns_std": ((2.0, 4.0, 0.0, 1.0, 0.0, 2.0, 1.0, 0, 0.5, False), (0.0, 0.0, True)),
    "columns_dkd_std": ((2.0, 4.0, 0.5, 1.0, 0.0, 2.0, 1.0, 0, 0.5, False), (4.0, 8.0, True)),
    "spearman_dkd_std": ((3.0, 9.0, 1.0, 9.0, 9.0, 0.0, 0.01, 1, 0.0, False), (9.0, 18.0, True)),
    "rectify_dkd": ((3.0, 9.0, 0.3, 0.0, 0.0, 0.0, 1.0, 0, 0.0, True), (9.0, 9.0, False)),
    "rectify_dkd_std": ((3.0, 9.0, 0.3, 0.0, 0.0, 0.0, 1.0, 0, 0.0, True), (9.0, 9.0, True)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("cols", [2, 100, 1000, 5000, 9000])
@pytest.mark.parametrize("name", list(OP_CONFIGS))
def test_cuda_operator_matches_cpu(name, cols):
    """Through the operator: the column statistics and the Spearman steps on standardized
    rows, DKD with them and with the rectification; dense teachers with gradients, and a
    sparse teacher of k < C (the operator standardizes the row it describes)."""
    head, tail = OP_CONFIGS[name]
    student, teacher, target = _inputs(ROWS, cols, torch.float32, seed=7, extreme=True)
    op = torch.ops.kdfast.fused_kd_loss
    cpu = op(student, teacher, target, None, *head, True, True, None, None, *tail)
    gpu = op(student.cuda(), teacher.cuda(), target.cuda(), None, *head, True, True, None, None, *tail)
    assert _relative(gpu[0].cpu(), cpu[0], 1.0) <= 1e-5, (gpu[0], cpu[0])
    assert _relative(gpu[1].cpu(), cpu[1], 1e-3) <= 1e-5
    assert _relative(gpu[2].cpu(), cpu[2], 1e-3) <= 1e-5
    k = max(1, cols // 10)
    ordered = teacher.sort(dim=1, descending=True, stable=True)
    indices = ordered.indices[:, :k].sort(dim=1).values
    values = teacher.gather(1, indices).contiguous()
    indices = indices.to(torch.int32).contiguous()
    fill = teacher.min(dim=1).values.contiguous()
    cpu = op(student, values, target, None, *head, True, False, indices, fill, *tail)
    gpu = op(student.cuda(), values.cuda(), target.cuda(), None, *head, True, False, indices.cuda(), fill.cuda(),
             *tail)
    assert _relative(gpu[0].cpu(), cpu[0], 1.0) <= 1e-5, (gpu[0], cpu[0])
    assert _relative(gpu[1].cpu(), cpu[1], 1e-3) <= 1e-5


@pytest.mark.gpu
def test_cuda_flags_off_are_unchanged_and_repeatable():
    """The new fields at their defaults leave every loss as it was (bitwise against the
    operator called without them), and a DKD + standardize run repeats bit for bit."""
    student, teacher, target = _inputs(ROWS, 1000, torch.float32)
    s, t, y = student.cuda(), teacher.cuda(), target.cuda()
    op = torch.ops.kdfast.fused_kd_loss
    head = (3.0, 9.0, 1.0, 9.0, 9.0, 0.0, 0.01, 1, 0.0, False)
    a = op(s, t, y, None, *head, True, True)
    b = op(s, t, y, None, *head, True, True, None, None, 0.0, 0.0, False)
    assert all(torch.equal(x, z) for x, z in zip(a, b))
    c = op(s, t, y, None, *head, True, True, None, None, 2.0, 3.0, True)
    d = op(s, t, y, None, *head, True, True, None, None, 2.0, 3.0, True)
    assert all(torch.equal(x, z) for x, z in zip(c, d))


# ------------------------------------------------------------------ without a GPU

def _cuda_module():
    if fused._C_cuda is None:
        pytest.skip("kdfast._C_cuda is not built here (no nvcc)")
    return fused._C_cuda


def test_the_loss_config_binds_the_dkd_and_standardization_fields():
    module = _cuda_module()
    config = module.LossConfig()
    assert (config.tckd_coef, config.nckd_coef, config.standardize) == (0.0, 0.0, False)  # the C++ defaults
    config.tckd_coef, config.nckd_coef, config.standardize = 1.5, 8.0, True
    assert (config.tckd_coef, config.nckd_coef, config.standardize) == (1.5, 8.0, True)


def test_the_launcher_refuses_dkd_without_a_target_or_two_classes_before_any_device_call():
    module = _cuda_module()
    config = module.LossConfig()
    config.inv_temperature, config.student_grad = 1.0, True
    config.tckd_coef, config.nckd_coef = 1.0, 8.0

    def launch(cols, target=0):  # made-up device addresses: it must refuse before it touches them
        module.fused_loss(0x10000, 0, 0x20000, 0, target, 0, 4, cols, config, 0x30000, 0x40000, 0, 0x50000, 0, 0)

    with pytest.raises(RuntimeError, match="DKD terms need a target"):
        launch(100)
    with pytest.raises(RuntimeError, match="at least 2 classes, got 1"):
        launch(1, target=0x60000)
    config.tckd_coef = config.nckd_coef = 0.0
    config.standardize = True
    with pytest.raises(RuntimeError, match="at least 2 classes, got 1"):
        launch(1)


class _FakeLauncher:
    """Stands in for kdfast._C_cuda on a CPU machine: records the configs the wrapper passes."""

    def __init__(self):
        self.LossConfig = fused._C_cuda.LossConfig if fused._C_cuda is not None else types.SimpleNamespace
        self.calls = []

    def fused_loss_workspace_bytes(self, rows, cols, config, device):
        self.calls.append(("workspace", config.tckd_coef, config.nckd_coef, config.standardize))
        return 0

    def fused_loss(self, student, student_type, teacher, teacher_type, target, difficulty, rows, cols, config, loss,
                   grad_student, grad_teacher, workspace, device, stream, teacher_indices=0, teacher_fill=0,
                   teacher_k=0):
        self.calls.append(("launch", config.tckd_coef, config.nckd_coef, config.standardize, config.kl_coef,
                           config.ce_coef, target != 0))


@pytest.fixture
def fake_launcher(monkeypatch):
    return install_fake_cuda_launcher(monkeypatch, _FakeLauncher())


def _wrapper(student, teacher, target, tckd, nckd, standardize):
    return fused._fused_kd_loss_cuda(student, teacher, target, None, 2.0, 4.0, 0.5, 0.0, 0.0, 0.0, 1.0, 0, 0.0, False,
                                     True, False, None, None, tckd, nckd, standardize)


def test_the_wrapper_passes_dkd_and_standardization_to_the_launcher(fake_launcher):
    """No NotImplementedError any more: the coefficients and the flag reach the LossConfig
    that both sizes the workspace and launches."""
    student, teacher, target = torch.randn(3, 10), torch.randn(3, 10), torch.tensor([1, 2, 3])
    _wrapper(student, teacher, target, 1.5, 8.0, True)
    assert fake_launcher.calls == [("workspace", 1.5, 8.0, True), ("launch", 1.5, 8.0, True, 4.0, 0.5, True)]
    fake_launcher.calls.clear()
    _wrapper(student, teacher, target, 0.0, 0.0, False)
    assert fake_launcher.calls == [("workspace", 0.0, 0.0, False), ("launch", 0.0, 0.0, False, 4.0, 0.5, True)]


def test_the_wrapper_refuses_dkd_without_a_target_or_two_classes(fake_launcher):
    with pytest.raises(ValueError, match="DKD terms need a target"):
        fused._fused_kd_loss_cuda(torch.randn(3, 10), torch.randn(3, 10), None, None, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                                  1.0, 0, 0.0, False, True, False, None, None, 1.0, 8.0, False)
    for tckd, nckd, standardize in ((1.0, 0.0, False), (0.0, 0.0, True)):
        with pytest.raises(ValueError, match="at least 2 classes, got 1"):
            _wrapper(torch.randn(3, 1), torch.randn(3, 1), torch.zeros(3, dtype=torch.long), tckd, nckd, standardize)
    assert fake_launcher.calls == []
