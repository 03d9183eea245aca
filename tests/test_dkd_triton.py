"""DKD and logit standardization on the Triton kernels, under Triton's interpreter (keep the
shapes small): every public loss that takes them against the fused CPU operator (the
reference implementation of the generic loss, csrc/losses_cpu.cpp's fused_row), with student
and teacher gradients, in both row layouts (resident, and chunked forced by a small block or
by C = 8193), bf16 logits, edge rows (C = 2, B = 1, constant rows, ±1e4 logits, ties, the
target the teacher's argmax or not), sparse teachers, settings of the generic operator no
public loss makes (DKD with a rectified teacher, with the column or Spearman terms), and
compilation of the new kernels for a Hopper GPU (sm_90, no GPU needed) with their registers
and spills. (The reference and the CPU operator: tests/test_dkd.py.)"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import kdfast
from kdfast.kernels import kd_losses
from kdfast.sparse_teacher import SparseTeacher
from helpers import KD_ROW_KERNEL, KERNEL_INTEGERS, compile_for_hopper

# Each case: a loss of (student, teacher, backend) for targets y. DIST with both terms; CMKD
# with a target (CE weight > 0, entropy difficulty from the standardized teacher); DR-KD with
# CE on the raw logits.
CASES = {
    "dkd": lambda y: lambda s, t, b: kdfast.dkd_loss(s, t, y, 1.0, 8.0, 4.0, backend=b),
    "dkd_std": lambda y: lambda s, t, b: kdfast.dkd_loss(s, t, y, 2.0, 0.5, 2.0, standardize=True, backend=b),
    "kd_std": lambda y: lambda s, t, b: kdfast.kd_loss(s, t, 2.0, standardize=True, backend=b),
    "dist_std": lambda y: lambda s, t, b: kdfast.dist_loss(s, t, 2.0, 1.3, 0.7, standardize=True, backend=b),
    "cmkd_std": lambda y: lambda s, t, b: kdfast.cmkd_loss(s, t, y, 2.0, ce_weight=0.7, standardize=True,
                                                           backend=b),
    "drkd_std": lambda y: lambda s, t, b: kdfast.drkd_loss(s, t, y, 2.0, ce_weight=0.5, standardize=True, backend=b),
}


def logits(batch, classes, seed, scale=3.0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, classes, generator=generator, dtype=torch.float64) * scale).to(dtype)


def targets(teacher, seed):
    """Random targets, row 0's the teacher's argmax (the others mostly not)."""
    batch, classes = teacher.shape
    target = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed))
    target[0] = int(teacher[0].argmax())
    return target


def value_and_grads(fn, student, teacher, backend, teacher_grad=True, block=None):
    student = student.detach().clone().requires_grad_(True)
    if not isinstance(teacher, SparseTeacher):
        teacher = teacher.detach().clone().requires_grad_(teacher_grad)
    with kd_losses.forced_block_size(block) if block else contextlib.nullcontext():
        loss = fn(student, teacher, backend)
        grads = torch.autograd.grad(loss, [student, teacher] if teacher_grad else [student])
    return [loss.detach(), *grads]


def relative_error(a, b):
    """Largest difference relative to the largest expected value, at an absolute 1e-2 scale
    where the values vanish (C = 2 standardizes every row to ±1/√2: the gradient through the
    standardization is then rounding alone)."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-2))


def assert_matches_cpu(fn, student, teacher, block=None, tolerance=1e-5, teacher_grad=True):
    got = value_and_grads(fn, student, teacher, "triton", teacher_grad, block)
    expected = value_and_grads(fn, student, teacher, "cpu", teacher_grad)
    for name, ours, theirs in zip(("loss", "grad_student", "grad_teacher"), got, expected):
        assert ours.dtype == theirs.dtype and torch.isfinite(theirs).all() == torch.isfinite(ours).all(), name
        error = relative_error(ours, theirs)
        assert error <= tolerance, f"{name}: relative error {error:.2e}"


def chunked_block(classes):
    """A forced block that splits a row of ``classes`` into several chunks."""
    return max(1, min(4, classes // 2))


LAYOUTS = pytest.mark.parametrize("chunked", [False, True], ids=["resident", "chunked"])
SHAPES = [(4, 13), (1, 2), (3, 2), (1, 9)]


def _applicable(name, shape):
    batch, classes = shape
    # DIST's intra-class term needs B >= 2; on standardized two-class rows (±1/√2) its
    # columns are constant or two-valued, where the correlation's 1/1e-8 floor magnifies
    # rounding (tests/test_dkd.py skips it there too).
    return not (name == "dist_std" and (batch < 2 or classes == 2))


@pytest.mark.interpreter
@LAYOUTS
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{b}x{c}" for b, c in SHAPES])
@pytest.mark.parametrize("name", list(CASES))
def test_float32_matches_the_cpu_operator(name, shape, chunked):
    if not _applicable(name, shape):
        pytest.skip(f"{name} is degenerate or undefined at {shape}")
    student, teacher = logits(*shape, seed=10), logits(*shape, seed=11)
    fn = CASES[name](targets(teacher, 12))
    assert_matches_cpu(fn, student, teacher, chunked_block(shape[1]) if chunked else None)


@pytest.mark.interpreter
@LAYOUTS
@pytest.mark.parametrize("name", list(CASES))
def test_bfloat16_logits(name, chunked):
    # Both backends read the same bf16 logits and round their fp32 gradients to bf16 once:
    # the loss within fp32 rounding, the gradients within one bf16 rounding.
    student, teacher = logits(3, 19, seed=13, dtype=torch.bfloat16), logits(3, 19, seed=14, dtype=torch.bfloat16)
    fn = CASES[name](targets(teacher, 15))
    got = value_and_grads(fn, student, teacher, "triton", block=8 if chunked else None)
    expected = value_and_grads(fn, student, teacher, "cpu")
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    assert relative_error(got[0], expected[0]) <= 1e-5
    for ours, theirs in zip(got[1:], expected[1:]):
        assert relative_error(ours, theirs) <= torch.finfo(torch.bfloat16).eps


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["dkd", "dkd_std", "kd_std", "drkd_std"])
def test_long_rows_in_the_chunked_layout(name):
    # C = 8193: chunks of 4096, 4096 and 1, the standardization's statistics from their own
    # kernel in three chunks (merged pairwise), the sums pass of its chain rule.
    assert not kd_losses.launch_config(8193).resident
    student, teacher = logits(2, 8193, seed=16), logits(2, 8193, seed=17)
    assert_matches_cpu(CASES[name](targets(teacher, 18)), student, teacher)


def _edge_rows():
    """A constant student row (standardized to zeros), a constant teacher row, ±1e4 logits
    (the target's probability 1 or 0 to fp32, the non-target mass a sum of its own), ties
    between the teacher's maxima (the rectification's first argmax), targets the argmax
    (rows 0, 3) and not."""
    student = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0],
                            [1e4, -1e4, 0.0, 3.0, -2.0],
                            [0.5, 0.5, -2.0, 7.0, 1.0],
                            [-1e4, 2.0, 1e4, 1e4, 0.0],
                            [2.0, -1.0, 0.0, 3.0, 3.0]])
    teacher = torch.tensor([[2.0, 2.0, -1.0, 0.0, 1.0],
                            [-1e4, 1e4, 1.0, 1.0, 5.0],
                            [3.0, 3.0, 3.0, 3.0, 3.0],
                            [0.0, -1e4, 1e4, 5.0, -3.0],
                            [4.0, 1.0, 4.0, -2.0, 0.5]])
    target = torch.tensor([0, 1, 3, 2, 1])
    return student, teacher, target


@pytest.mark.interpreter
@LAYOUTS
@pytest.mark.parametrize("name", list(CASES))
def test_edge_rows(name, chunked):
    student, teacher, target = _edge_rows()
    fn = CASES[name](target)
    got = value_and_grads(fn, student, teacher, "triton", block=2 if chunked else None)
    assert all(torch.isfinite(x).all() for x in got), name
    assert_matches_cpu(fn, student, teacher, 2 if chunked else None)


@pytest.mark.interpreter
@LAYOUTS
def test_sparse_teacher_with_dkd_and_standardization(chunked):
    # A sparse teacher's rebuilt row is what is standardized: bitwise the dense row's result,
    # and the CPU operator's given the same SparseTeacher. k = C (the public losses'
    # standardization needs every class) and k < C for DKD without it.
    block = 4 if chunked else None
    student, teacher = logits(4, 12, seed=19), logits(4, 12, seed=20)
    target = torch.tensor([0, 5, 11, 3])
    target[1] = int(teacher[1].argmax())
    ordered = teacher.sort(1, descending=True)
    full = SparseTeacher(ordered.indices, ordered.values, torch.zeros(4, 1), (4.0,), 12)
    top = teacher.topk(3, dim=1)
    lse = torch.logsumexp(teacher.double() / 4.0, dim=1, keepdim=True).float()
    partial = SparseTeacher(top.indices, top.values, lse, (4.0,), 12)
    for sparse, standardize in ((full, True), (partial, False)):
        def fn(s, t, backend):
            return kdfast.dkd_loss(s, t, target, 1.0, 8.0, 4.0, standardize=standardize, backend=backend)

        got = value_and_grads(fn, student, sparse, "triton", teacher_grad=False, block=block)
        same_row = value_and_grads(fn, student, sparse.dense(4.0), "triton", teacher_grad=False, block=block)
        for ours, theirs in zip(got, same_row):
            assert torch.equal(ours, theirs)
        expected = value_and_grads(fn, student, sparse, "cpu", teacher_grad=False)
        for ours, theirs in zip(got, expected):
            assert relative_error(ours, theirs) <= 1e-5


@pytest.mark.interpreter
@LAYOUTS
def test_sparse_rows_standardized_by_the_operator(chunked):
    # The operator itself standardizes a rebuilt k < C row (the public losses refuse it: the
    # tail's mass is the raw logits'), with KL, CE, DKD, and the Spearman terms' ranks of the
    # standardized rebuilt row.
    student = logits(5, 11, seed=21)
    values = torch.tensor([[2.0, 2.0, 0.5, -1.0], [1.0, 0.5, -3.0, 0.25], [4.0, -0.0, 4.0, 1.0],
                           [0.75, 0.75, 0.75, 0.75], [3.0, -2.0, 1.0, 1.0]])
    indices = torch.tensor([[1, 4, 6, 9], [0, 2, 3, 10], [2, 5, 7, 8], [0, 1, 2, 3], [3, 5, 6, 8]], dtype=torch.int32)
    fill = torch.tensor([0.5, 5.0, 0.0, 0.75, -2.0])
    dense = fill[:, None].expand(5, 11).clone().scatter_(1, indices.long(), values)
    target = torch.tensor([3, 7, 5, 6, 10])
    settings = (3.0, 9.0, 0.5, 4.0, 2.0, 0.0, 0.3, 1, 0.0, False, True, False)
    with kd_losses.forced_block_size(4) if chunked else contextlib.nullcontext():
        got = torch.ops.kdfast.fused_kd_loss_triton(student, values, target, None, *settings, indices, fill, 1.5, 6.0,
                                                    True)
        same_row = torch.ops.kdfast.fused_kd_loss_triton(student, dense, target, None, *settings, None, None, 1.5,
                                                         6.0, True)
    for ours, theirs in zip(got[:2], same_row[:2]):
        assert torch.equal(ours, theirs)
    expected = torch.ops.kdfast.fused_kd_loss(student, values, target, None, *settings, indices, fill, 1.5, 6.0, True)
    for ours, theirs in zip(got[:2], expected[:2]):
        assert relative_error(ours, theirs) <= 1e-5


# Settings of the generic operator no public loss makes: (temperature, kl, ce, pearson,
# spearman, column, rank strength, difficulty mode, difficulty value, rectify, tckd, nckd,
# standardize). DKD with a rectified teacher (in the chunked layout its non-target classes
# take a pass of their own), with the column term (its statistics' kernels standardize the
# rows too; the chunked layout takes DKD's statistics in the column pass), with the Pearson
# and Spearman terms and an entropy difficulty.
SETTINGS = {
    "dkd_rectified": (2.0, 1.0, 0.3, 0.0, 0.0, 0.0, 1.0, 0, 0.0, True, 1.5, 4.0, False),
    "dkd_rectified_std": (2.0, 1.0, 0.3, 0.0, 0.0, 0.0, 1.0, 0, 0.0, True, 1.5, 4.0, True),
    "dkd_pearson_rectified_std": (3.0, 0.5, 0.3, 2.0, 0.0, 0.0, 1.0, 0, 0.4, True, 1.0, 2.0, True),
    "dkd_columns_std": (2.0, 0.5, 0.2, 1.0, 0.0, 0.7, 1.0, 0, 0.3, False, 1.0, 2.0, True),
    "dkd_columns": (2.0, 0.5, 0.2, 1.0, 0.0, 0.7, 1.0, 0, 0.3, False, 1.0, 2.0, False),
    "dkd_spearman_std": (2.0, 1.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1, 0.0, False, 1.0, 1.0, True),
}


@pytest.mark.interpreter
@LAYOUTS
@pytest.mark.parametrize("setting", SETTINGS)
def test_generic_settings_match_the_cpu_operator(setting, chunked):
    from helpers import teacher_like

    s, t, y = teacher_like(5, 13, generator=torch.Generator().manual_seed(22))
    s, t = s.float(), t.float()
    y = (t.argmax(1) + 1 + torch.arange(5)) % 13  # the teacher's argmax is never the target...
    y[0] = t[0].argmax()  # ...but in one row
    *arguments, tckd, nckd, standardize = SETTINGS[setting]
    with kd_losses.forced_block_size(4) if chunked else contextlib.nullcontext():
        got = torch.ops.kdfast.fused_kd_loss_triton(s, t, y, None, *arguments, True, True, None, None, tckd, nckd,
                                                    standardize)
    expected = torch.ops.kdfast.fused_kd_loss(s, t, y, None, *arguments, True, True, None, None, tckd, nckd,
                                              standardize)
    for name, ours, theirs in zip(("loss", "grad_student", "grad_teacher"), got, expected):
        error = relative_error(ours, theirs)
        assert error <= 1e-5, f"{name}: relative error {error:.2e}"


@pytest.mark.interpreter
@LAYOUTS
@pytest.mark.parametrize("standardize", [False, True], ids=["raw", "standardized"])
def test_each_rows_tckd_and_nckd(standardize, chunked):
    # The row kernel's per-row TCKD and NCKD (its dkd_ptr output) against the papers'
    # definitions in fp64, target = argmax in row 0; standardized rows rounded to fp32 first,
    # as every backend rounds them (TCKD, a small difference of nearby distributions, passes
    # that rounding on magnified).
    import torch.nn.functional as F

    from kdfast.reference import standardize_logits

    student, teacher = logits(4, 9, seed=23), logits(4, 9, seed=24)
    target = targets(teacher, 25)
    terms = torch.empty(4, 2, dtype=torch.float64)
    with kd_losses.forced_block_size(4) if chunked else contextlib.nullcontext():
        kd_losses._fused_loss(student, teacher, target, None, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0, 0.0, False, True,
                              False, None, None, 1.0, 1.0, standardize, dkd_terms=terms)
    s, t = student.double(), teacher.double()
    if standardize:
        s, t = standardize_logits(s).float().double(), standardize_logits(t).float().double()
    for row in range(4):
        y = int(target[row])
        p, q = F.softmax(s[row] / 2.0, 0), F.softmax(t[row] / 2.0, 0)
        b_p, b_q = torch.stack([p[y], 1 - p[y]]), torch.stack([q[y], 1 - q[y]])
        others = [c for c in range(9) if c != y]
        p_hat, q_hat = F.softmax(s[row, others] / 2.0, 0), F.softmax(t[row, others] / 2.0, 0)
        tckd = float((b_q * (b_q / b_p).log()).sum())
        nckd = float((q_hat * (q_hat / p_hat).log()).sum())
        assert terms[row, 0].item() == pytest.approx(tckd, rel=1e-5, abs=1e-7)
        assert terms[row, 1].item() == pytest.approx(nckd, rel=1e-5, abs=1e-7)


@pytest.mark.interpreter
def test_operator_refusals():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    with pytest.raises(ValueError, match="DKD terms need a target"):
        torch.ops.kdfast.fused_kd_loss_triton(s, t, None, None, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0, 0.0, False,
                                              True, False, None, None, 1.0, 8.0, False)
    with pytest.raises(ValueError, match="at least 2 classes"):
        torch.ops.kdfast.fused_kd_loss_triton(s[:, :1], t[:, :1], None, None, 4.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0,
                                              0.0, False, True, False, None, None, 0.0, 0.0, True)


# Compilation for a Hopper GPU, in a process without TRITON_INTERPRET: the row kernel with
# DKD's terms (dkd_ptr fp64) and the standardization (standard_ptr fp64) in both layouts, the
# statistics kernels with it, and _standardize_kernel; ptxas's registers and spills
# (printed). The flags off, the kd kernel is the one tests/test_sparse_triton.py compiles:
# it must not spill.
KD = KD_ROW_KERNEL
DKD = dict(KD, HAS_KL=False, HAS_TARGET=True)
CHUNKED = dict(C=131072, ROWS=1, BLOCK=4096, RESIDENT=False)
WIDE = dict(C=8192, ROWS=1, BLOCK=8192)
DKD_PTR = {"dkd_ptr": "*fp64"}
STD_PTR = {"standard_ptr": "*fp64"}
HOPPER_KERNELS = [
    ("kd", "_fused_row_kernel", KD, 8, {}),
    ("dkd", "_fused_row_kernel", DKD, 8, DKD_PTR),
    ("dkd-teacher-grad", "_fused_row_kernel", dict(DKD, TEACHER_GRAD=True), 8, DKD_PTR),
    ("kd-std", "_fused_row_kernel", KD, 8, STD_PTR),
    ("dkd-std", "_fused_row_kernel", DKD, 8, {**DKD_PTR, **STD_PTR}),
    ("drkd-std", "_fused_row_kernel", dict(KD, HAS_TARGET=True, HAS_CE=True, RECTIFY=True), 8, STD_PTR),
    ("cmkd-std", "_fused_row_kernel", dict(KD, HAS_TARGET=True, HAS_CE=True, HAS_PEARSON=True, HAS_SPEARMAN=True,
                                           DIFFICULTY_MODE=1), 8, STD_PTR),
    ("dist-std", "_fused_row_kernel", dict(KD, HAS_KL=False, HAS_PEARSON=True, HAS_COLUMN=True), 8, STD_PTR),
    ("dkd-8192", "_fused_row_kernel", dict(DKD, **WIDE), 16, DKD_PTR),
    ("kd-std-8192", "_fused_row_kernel", dict(KD, **WIDE), 16, STD_PTR),
    ("kd-chunked", "_fused_row_kernel", dict(KD, **CHUNKED), 16, {}),
    ("dkd-chunked", "_fused_row_kernel", dict(DKD, **CHUNKED), 16, DKD_PTR),
    ("kd-std-chunked", "_fused_row_kernel", dict(KD, **CHUNKED), 16, STD_PTR),
    ("dkd-std-chunked", "_fused_row_kernel", dict(DKD, **CHUNKED), 16, {**DKD_PTR, **STD_PTR}),
    ("drkd-dkd-std-chunked", "_fused_row_kernel", dict(DKD, HAS_KL=True, HAS_CE=True, RECTIFY=True, TEACHER_GRAD=True,
                                                       **CHUNKED), 16, {**DKD_PTR, **STD_PTR}),
    ("dist-dkd-std-chunked", "_fused_row_kernel", dict(DKD, HAS_PEARSON=True, HAS_COLUMN=True, **CHUNKED), 16,
     {**DKD_PTR, **STD_PTR}),
    ("standardize", "_standardize_kernel", dict(BLOCK=4096, WRITE_ROWS=True), 16, {}),
    ("softmax-stats-std", "_softmax_stats_kernel", dict(BLOCK=4096), 16, STD_PTR),
    ("column-moments-std", "_column_moments_kernel", dict(BLOCK=256), 4, STD_PTR),
    ("column-partials-std", "_column_partials_kernel", dict(C=1000, ROWS=2, BLOCK=1024), 8, STD_PTR),
]
BF16_INPUTS = {"s_ptr": "*bf16", "t_ptr": "*bf16", "gs_ptr": "*bf16", "gt_ptr": "*bf16", "target_ptr": "*i64",
               "rho_s_ptr": "*fp64", "partial_ptr": "*fp64"}


def test_dkd_and_standardization_kernels_compile_for_hopper(tmp_path):
    report = compile_for_hopper([
        dict(label=label, kernel=f"kd_losses.{name}", constexprs=constexprs, warps=warps,
             types={**BF16_INPUTS, **typed}, integers=KERNEL_INTEGERS)
        for label, name, constexprs, warps, typed in HOPPER_KERNELS], tmp_path, timeout=1800)
    print({label: (entry["registers"], entry["spills"]) for label, entry in report.items()})
    assert len(report) == 20
    if report["kd"]["spills"] is not None:  # when Triton prints ptxas's log
        assert report["kd"]["spills"] == 0, report