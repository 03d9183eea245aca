"""The CUDA kernels with a sparse (cached) teacher (kdfast.sparse_teacher.SparseTeacher).

On a GPU: backend="cuda" against backend="cpu" with the same SparseTeacher (the CPU
operator is the reference: it rebuilds each row, bitwise equal to its dense path), for
every loss, k in {1, 10, C}, fp32 and bf16 students, every row layout of the CUDA kernels
(warp lanes, block-resident, chunked), both Spearman paths (in-block sorts up to C = 8192,
CUB's segmented sort beyond) and ties; and against the CUDA kernels on the dense row the
teacher describes (SparseTeacher.dense), which the sparse path must reproduce bit for bit.
On the CPU: the launcher's refusals and the Python wrapper's arguments (through a fake
launcher), which need no GPU.
"""

import ctypes
import types

import pytest
import torch
from helpers import install_fake_cuda_launcher, teacher_like

import kdfast
from kdfast import fused
from kdfast.sparse_teacher import SparseTeacher

TEMPERATURES = (1.5, 2.0, 3.0)
# Each case: the loss of (student, teacher, target, backend), and its temperature (None: the
# rank-only Spearman loss, whose tail ties below the stored logits).
CASES = {
    "kd": (lambda s, t, y, b: kdfast.kd_loss(s, t, 3.0, backend=b), 3.0),
    "pearson_rows": (lambda s, t, y, b: kdfast.pearson_loss(s, t, 2.0, dim=1, backend=b), 2.0),
    "pearson_columns": (lambda s, t, y, b: kdfast.pearson_loss(s, t, 2.0, dim=0, backend=b), 2.0),
    "dist": (lambda s, t, y, b: kdfast.dist_loss(s, t, 1.5, 1.3, 0.7, backend=b), 1.5),
    "spearman": (lambda s, t, y, b: kdfast.spearman_loss(s, t, backend=b), None),
    "cmkd": (lambda s, t, y, b: kdfast.cmkd_loss(s, t, y, 3.0, backend=b), 3.0),
    "drkd": (lambda s, t, y, b: kdfast.drkd_loss(s, t, y, 3.0, 0.3, backend=b), 3.0),
}
ROWS = 40  # several chunks of the column statistics (16 rows each at B = 40)


def _sparse(logits: torch.Tensor, k: int) -> SparseTeacher:
    """The top k of each row of float32 logits (ties: the lower class first), with the full
    rows' log-sum-exp at TEMPERATURES."""
    ordered = logits.sort(dim=1, descending=True, stable=True)
    lse = torch.stack([torch.logsumexp(logits.double() / t, dim=1).float() for t in TEMPERATURES], 1)
    return SparseTeacher(ordered.indices[:, :k], ordered.values[:, :k], lse, TEMPERATURES, logits.shape[1])


def _inputs(rows, cols, dtype, ties=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student, teacher, target = teacher_like(rows, cols, generator=generator)
    if ties:
        # Ties everywhere: among the stored logits, between rows' maxima (the rectification's
        # first maximum), and among the student's logits (the Spearman sorts' tie order).
        teacher = (teacher * 2).round() / 2
        teacher[:, cols // 2] = teacher.max(dim=1).values  # a second copy of each row's maximum
        student = (student * 2).round() / 2
    return student.to(dtype), teacher.float(), target


def _loss_and_grad(case, student, teacher, target, backend, device):
    s = student.detach().to(device).requires_grad_()
    loss = CASES[case][0](s, teacher.to(device), target.to(device), backend)  # a SparseTeacher or dense logits
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach().cpu(), grad.cpu()


def _relative(a, b, floor):
    return (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), floor)


def _params():
    params = []
    for case in CASES:
        for cols in (2, 1000, 5000) + ((9000,) if case == "spearman" else ()):
            for k in sorted({1, min(10, cols), cols}):
                for dtype in (torch.float32, torch.bfloat16):
                    params.append(pytest.param(case, cols, k, dtype,
                                               id=f"{case}-C{cols}-k{k}-{str(dtype).removeprefix('torch.')}"))
    return params


def _check_against_cpu(case, cols, k, dtype, ties):
    student, logits, target = _inputs(ROWS, cols, dtype, ties=ties)
    sparse = _sparse(logits, k)
    cpu_loss, cpu_grad = _loss_and_grad(case, student, sparse, target, "cpu", "cpu")
    loss, grad = _loss_and_grad(case, student, sparse, target, "cuda", "cuda")
    assert _relative(loss, cpu_loss, 1.0) <= 2e-5, (loss, cpu_loss)
    # fp32: both within ~1e-5 of the exact value (tests/test_fused.py); bf16: both gradients
    # are rounded to bf16 once, so they may differ by an ulp.
    bound = 2e-5 if dtype == torch.float32 else torch.finfo(torch.bfloat16).eps
    assert _relative(grad, cpu_grad, 1e-3) <= bound
    # The sparse rows must be exactly the dense row they describe, read through the same
    # kernels: the same floats, the same sums in the same order.
    dense = sparse.dense(CASES[case][1])
    dense_loss, dense_grad = _loss_and_grad(case, student, dense, target, "cuda", "cuda")
    assert torch.equal(loss, dense_loss), (loss, dense_loss)
    assert torch.equal(grad, dense_grad)


@pytest.mark.gpu
@pytest.mark.parametrize("case, cols, k, dtype", _params())
def test_cuda_matches_cpu_with_a_sparse_teacher(case, cols, k, dtype):
    _check_against_cpu(case, cols, k, dtype, ties=False)


@pytest.mark.gpu
@pytest.mark.smoke
@pytest.mark.parametrize("cols", [7, 100, 200, 300, 2048, 5000, 9000])
@pytest.mark.parametrize("case", ["kd", "spearman", "cmkd", "drkd", "dist"])
def test_cuda_sparse_teacher_with_ties_at_every_layout(case, cols):
    """Each row layout (8, 16 and 32 lanes × 1 run, 32 × 2, a block resident, chunked) and
    both Spearman paths, with tied logits: the rebuilt rows' first maximum (rectification),
    the tail's classes tied at the fill (Spearman), the stored logits' ties."""
    if case == "dist" and cols == 9000:
        pytest.skip("the chunked layout is covered at 5000")
    for k in sorted({1, min(10, cols), cols // 3, cols}):
        _check_against_cpu(case, cols, k, torch.float32, ties=True)


@pytest.mark.gpu
@pytest.mark.smoke
@pytest.mark.parametrize("cols", [37, 1000, 5000, 9000])
def test_cuda_sparse_indices_out_of_range_never_match(cols):
    """The kernels never index memory with the teacher's indices: an out-of-range index
    (negative, ≥ C) in a sorted row is simply never matched, so the row is the dense row of
    the valid ones; duplicated or unsorted indices run without a fault (which stored logit
    a class then gets is not specified), and the device stays usable."""
    rows, k = 5, 8
    student, logits, target = _inputs(rows, cols, torch.float32)
    generator = torch.Generator().manual_seed(1)
    valid = torch.stack([torch.randperm(cols, generator=generator)[:4] for _ in range(rows)])
    bad = torch.tensor([[-(2**31), -3, cols, 2**31 - 1]] * rows)
    indices = torch.cat([valid, bad], 1).sort(dim=1).values.to(torch.int32)
    values = torch.randn(rows, k, generator=generator) * 3 + 5
    fill = torch.randn(rows, generator=generator)
    dense = fill[:, None].expand(rows, cols).clone()
    for row in range(rows):
        for j in range(k):
            if 0 <= indices[row, j] < cols:
                dense[row, indices[row, j]] = values[row, j]
    device = torch.device("cuda")
    s, y = student.to(device), target.to(device)
    for config in ((3.0, 9.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0, 0.0, False),  # KD
                   (3.0, 9.0, 0.3, 0.0, 0.0, 0.0, 1.0, 0, 0.0, True),  # DR-KD
                   (1.5, 0.0, 0.0, 2.9, 0.0, 1.6, 1.0, 0, 0.0, False),  # DIST
                   (3.0, 9.0, 1.0, 9.0, 9.0, 0.0, 0.01, 1, 0.0, False)):  # CMKD
        op = torch.ops.kdfast.fused_kd_loss
        sparse = op(s, values.to(device), y, None, *config, True, False, indices.to(device), fill.to(device))
        expected = op(s, dense.to(device), y, None, *config, True, False)
        assert torch.equal(sparse[0], expected[0]) and torch.equal(sparse[1], expected[1]), config
        shuffled = indices[:, torch.randperm(k, generator=generator)].clone()
        shuffled[:, 1] = shuffled[:, 0]  # a duplicate
        op(s, values.to(device), y, None, *config, True, False, shuffled.to(device), fill.to(device))
    torch.cuda.synchronize()
    again = op(s, dense.to(device), y, None, *config, True, False)
    assert torch.equal(again[0], expected[0])


@pytest.mark.gpu
def test_cuda_sparse_teacher_allocates_no_dense_teacher():
    """No B×C teacher: the forward pass of KD allocates the student's gradient (B×C) and
    O(B) besides it, with a sparse teacher as with a dense one (the CUB path's sort keys,
    for Spearman beyond 8192 classes, are the dense path's workspace)."""
    rows, cols, k = 64, 50_000, 10
    student, logits, _ = _inputs(rows, cols, torch.float32)
    sparse = _sparse(logits, k).to("cuda")
    s = student.cuda().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    kdfast.kd_loss(s, sparse, 3.0, backend="cuda")
    torch.cuda.synchronize()
    grown = torch.cuda.max_memory_allocated() - before
    assert grown < rows * cols * 4 * 1.25, grown  # the gradient, not also a dense teacher


# ------------------------------------------------------------------ without a GPU

def _cuda_module():
    if fused._C_cuda is None:
        pytest.skip("kdfast._C_cuda is not built here (no nvcc)")
    return fused._C_cuda


def _launch(module, config, *, teacher_type=0, indices=0, fill=0, k=0, grad_teacher=0, cols=100):
    """The launcher on made-up device addresses: it must refuse before it touches them."""
    module.fused_loss(0x10000, 0, 0x20000, teacher_type, 0, 0, 4, cols, config, 0x30000, 0x40000, grad_teacher,
                      0x50000, 0, 0, teacher_indices=indices, teacher_fill=fill, teacher_k=k)


def test_the_launcher_refuses_bad_sparse_arguments_before_any_device_call():
    module = _cuda_module()
    config = module.LossConfig()
    config.inv_temperature, config.kl_coef, config.student_grad = 1.0, 1.0, True
    for k in (0, -1, 101):
        with pytest.raises(RuntimeError, match=rf"1 <= k <= C, got k={k} for C=100"):
            _launch(module, config, indices=0x60000, fill=0x70000, k=k)
    with pytest.raises(RuntimeError, match="needs teacher_fill"):
        _launch(module, config, indices=0x60000, k=10)
    for teacher_type in (1, 2):
        with pytest.raises(RuntimeError, match="values must be float32"):
            _launch(module, config, teacher_type=teacher_type, indices=0x60000, fill=0x70000, k=10)
    with pytest.raises(RuntimeError, match="has no gradient"):
        _launch(module, config, indices=0x60000, fill=0x70000, k=10, grad_teacher=0x80000)
    config.teacher_grad = True
    with pytest.raises(RuntimeError, match="has no gradient"):
        _launch(module, config, indices=0x60000, fill=0x70000, k=10)
    config.teacher_grad = False
    for fill, k in ((0x70000, 0), (0, 10)):
        with pytest.raises(RuntimeError, match="for a sparse teacher only"):
            _launch(module, config, fill=fill, k=k)


class _FakeLauncher:
    """Stands in for kdfast._C_cuda on a CPU machine: records what the wrapper passes and
    reads the host buffers it points at while they are alive."""

    def __init__(self):
        self.LossConfig = fused._C_cuda.LossConfig if fused._C_cuda is not None else types.SimpleNamespace
        self.calls = []

    def fused_loss_workspace_bytes(self, rows, cols, config, device):
        self.calls.append(("workspace", rows, cols))
        return 0

    def fused_loss(self, student, student_type, teacher, teacher_type, target, difficulty, rows, cols, config, loss,
                   grad_student, grad_teacher, workspace, device, stream, teacher_indices=0, teacher_fill=0,
                   teacher_k=0):
        call = {"rows": rows, "cols": cols, "teacher_type": teacher_type, "grad_teacher": grad_teacher,
                "teacher_grad": config.teacher_grad, "k": teacher_k, "indices": None, "fill": None, "values": None}
        if teacher_indices:
            n = rows * teacher_k
            call["indices"] = list((ctypes.c_int32 * n).from_address(teacher_indices))
            call["fill"] = list((ctypes.c_float * rows).from_address(teacher_fill))
            call["values"] = list((ctypes.c_float * n).from_address(teacher))
        self.calls.append(("launch", call))


@pytest.fixture
def fake_launcher(monkeypatch):
    return install_fake_cuda_launcher(monkeypatch, _FakeLauncher())


def _wrapper(student, teacher, indices=None, fill=None, teacher_grad=False):
    return fused._fused_kd_loss_cuda(student, teacher, None, None, 2.0, 4.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0, 0.0, False,
                                     True, teacher_grad, indices, fill)


def test_the_wrapper_passes_the_sparse_teacher_to_the_launcher(fake_launcher):
    """Values, int32 indices and fill as contiguous buffers (a strided argument is copied)
    and k; the workspace sized for the student's C classes, not k; no teacher gradient."""
    rows, cols, k = 3, 50, 4
    student = torch.randn(rows, cols)
    values = torch.randn(k, rows).t()  # not contiguous
    indices = torch.tensor([[1, 5, 9, 40], [0, 2, 3, 49], [7, 8, 20, 21]], dtype=torch.int32).t().contiguous().t()
    fill = torch.randn(2 * rows)[::2]
    loss, grad_student, grad_teacher = _wrapper(student, values, indices, fill)
    assert grad_student.shape == student.shape and grad_teacher.numel() == 0
    (_, workspace_rows, workspace_cols), (_, call) = fake_launcher.calls
    assert (workspace_rows, workspace_cols) == (rows, cols)
    assert call["k"] == k and call["teacher_type"] == 0 and call["grad_teacher"] == 0 and not call["teacher_grad"]
    assert call["indices"] == indices.flatten().tolist()
    assert call["values"] == values.flatten().tolist() and call["fill"] == fill.tolist()
    fake_launcher.calls.clear()
    _wrapper(student, torch.randn(rows, cols))  # a dense teacher: no sparse arguments
    assert fake_launcher.calls[1][1]["k"] == 0 and fake_launcher.calls[1][1]["indices"] is None


def test_the_wrapper_refuses_malformed_sparse_teachers(fake_launcher):
    student = torch.randn(3, 50)
    values, indices, fill = torch.randn(3, 4), torch.zeros(3, 4, dtype=torch.int32), torch.zeros(3)
    with pytest.raises(ValueError, match="float32 values, int32 teacher_indices"):
        _wrapper(student, values, indices.long(), fill)
    with pytest.raises(ValueError, match="float32 values, int32 teacher_indices"):
        _wrapper(student, values.half(), indices, fill)
    with pytest.raises(ValueError, match=r"1 <= k <= C"):
        _wrapper(student, torch.randn(3, 51), torch.zeros(3, 51, dtype=torch.int32), fill)
    with pytest.raises(ValueError, match=r"teacher_fill \[B\]"):
        _wrapper(student, values, indices, torch.zeros(2))
    with pytest.raises(ValueError, match="needs teacher_fill"):
        _wrapper(student, values, indices, None)
    with pytest.raises(ValueError, match="has no gradient"):
        _wrapper(student, values, indices, fill, teacher_grad=True)
    assert fake_launcher.calls == []  # refused before sizing or launching anything
