"""Sparse (cached) teachers on the Triton kernels, under Triton's interpreter: the rebuilt
teacher row gives the very bits of the dense row it describes (``SparseTeacher.dense``), and
agrees with the CPU operator (the sparse reference) given the same SparseTeacher; ties,
rectification, both layouts, half-precision students, malformed indices (no memory error),
and compilation of the sparse kernels for a Hopper GPU (sm_90, no GPU needed)."""

import contextlib
import math

import pytest
import torch

import kdfast
from kdfast.kernels import kd_losses
from kdfast.sparse_teacher import SparseTeacher
from helpers import KD_ROW_KERNEL, KERNEL_INTEGERS, compile_for_hopper

TEMPERATURES = (1.5, 2.0, 3.0)

# Each case: (loss of (student, teacher, target, backend), its temperature (None: ranks
# only), needs B >= 2). Both DIST terms; CMKD with entropy weighting and a target (KL, CE,
# Pearson, Spearman); DR-KD's rectified teacher.
CASES = {
    "kd": (lambda s, t, y, b: kdfast.kd_loss(s, t, 3.0, backend=b), 3.0, False),
    "dist": (lambda s, t, y, b: kdfast.dist_loss(s, t, 1.5, 1.3, 0.7, backend=b), 1.5, True),
    "pearson_rows": (lambda s, t, y, b: kdfast.pearson_loss(s, t, 2.0, dim=1, backend=b), 2.0, False),
    "pearson_columns": (lambda s, t, y, b: kdfast.pearson_loss(s, t, 2.0, dim=0, backend=b), 2.0, True),
    "spearman": (lambda s, t, y, b: kdfast.spearman_loss(s, t, backend=b), None, False),
    "cmkd": (lambda s, t, y, b: kdfast.cmkd_loss(s, t, y, 3.0, backend=b), 3.0, False),
    "drkd": (lambda s, t, y, b: kdfast.drkd_loss(s, t, y, 3.0, 0.3, backend=b), 3.0, False),
}


def sparse_teacher(logits: torch.Tensor, k: int) -> SparseTeacher:
    """The top k of ``logits`` (torch.topk) and each full row's log-sum-exp at TEMPERATURES."""
    top = logits.float().topk(k, dim=1)
    lse = torch.stack([torch.logsumexp(logits.double() / tau, dim=1) for tau in TEMPERATURES], dim=1).float()
    return SparseTeacher(top.indices, top.values, lse, TEMPERATURES, logits.shape[1])


def _inputs(batch, classes, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(batch, classes, generator=generator, dtype=torch.float64) * 2.0
    target = torch.randint(0, classes, (batch,), generator=generator)
    teacher[torch.arange(batch), target] += 6.0
    student = teacher + torch.randn(batch, classes, generator=generator, dtype=torch.float64) * 1.5
    return student.to(dtype), teacher, target


def _loss_and_grad(case, s, teacher, y, backend):
    s = s.detach().clone().requires_grad_()
    loss = CASES[case][0](s, teacher, y, backend)
    (grad,) = torch.autograd.grad(loss, s)
    return [loss.detach(), grad]


def _relative_errors(got, expected):
    """Loss: |Δ| / max(|L|, 1); dL/ds: max |Δ| / max(max |g|, 1e-2). The floors make the
    error absolute where the value is (nearly) zero: at C = 2 a row correlation is ±1 and its
    gradient rounding noise (~1e-7 on the CPU, exactly 0 on Triton)."""
    return [(a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), floor)
            for a, b, floor in zip(got, expected, (1.0, 1e-2))]


def _check(case, s, sparse, y, block=None):
    """Triton on ``sparse`` gives the bits of Triton on its dense row; returns its relative
    errors (loss, dL/ds) against the CPU operator on the same SparseTeacher."""
    dense = sparse.dense(CASES[case][1] if sparse.top_k < sparse.num_classes else None)
    with kd_losses.forced_block_size(block) if block else contextlib.nullcontext():
        got = _loss_and_grad(case, s, sparse, y, "triton")
        same_row = _loss_and_grad(case, s, dense, y, "triton")
    for ours, theirs in zip(got, same_row):
        assert torch.equal(ours, theirs), f"{case}: the sparse teacher's result is not the dense row's"
    return _relative_errors(got, _loss_and_grad(case, s, sparse, y, "cpu"))


SHAPES = [(1, 2), (4, 23)]
PAIRS = [pytest.param(case, shape, k, id=f"{case}-{shape[0]}x{shape[1]}-k{k}") for case in CASES for shape in SHAPES
         for k in sorted({1, shape[1] // 2 or 1, shape[1]}) if shape[0] >= 2 or not CASES[case][2]]


@pytest.mark.interpreter
@pytest.mark.parametrize("block", [None, 8], ids=["resident", "chunked"])
@pytest.mark.parametrize("case,shape,k", PAIRS)
def test_sparse_teacher_matches_its_dense_row_and_the_cpu_operator(case, shape, k, block):
    s, t, y = _inputs(*shape)
    sparse = sparse_teacher(t, k)
    for name, error in zip(("loss", "grad_student"), _check(case, s, sparse, y, block)):
        assert error <= 1e-5, f"{name}: relative error {error:.2e} against the CPU operator"


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["kd", "dist", "cmkd", "drkd"])
def test_half_precision_students(case, dtype):
    s, t, y = _inputs(4, 19, seed=1, dtype=dtype)
    errors = _check(case, s, sparse_teacher(t, 6), y)
    assert errors[0] <= 1e-5, f"loss: relative error {errors[0]:.2e}"
    assert errors[1] <= torch.finfo(dtype).eps, f"grad_student: relative error {errors[1]:.2e}"


@pytest.mark.interpreter
@pytest.mark.parametrize("k", [1, 300, 8193])
@pytest.mark.parametrize("case", ["kd", "dist"])
def test_long_rows_in_the_chunked_layout(case, k):
    # C = 8193: the row kernel's chunked layout (two chunks of 4096 and one of 1), and for
    # DIST the long-row column statistics (_softmax_stats_kernel, _column_moments_kernel).
    assert not kd_losses.launch_config(8193).resident
    s, t, y = _inputs(2, 8193, seed=2)
    for name, error in zip(("loss", "grad_student"), _check(case, s, sparse_teacher(t, k), y)):
        assert error <= 1e-5, f"{name}: relative error {error:.2e} against the CPU operator"


# The operator itself, with rows a SparseTeacher cannot make (a fill equal to stored values,
# a fill above them all, ties, signed zeros): (temperature, kl, ce, pearson, spearman,
# column, rank strength, difficulty mode, difficulty value, rectify).
SETTINGS = {
    "cmkd": (3.0, 9.0, 1.0, 9.0, 9.0, 0.0, 0.1, 1, 0.0, False),
    "kl_ce_pearson_entropy": (3.0, 9.0, 1.0, 9.0, 0.0, 0.0, 1.0, 1, 0.0, False),
    "dist": (2.0, 0.0, 0.0, 5.2, 0.0, 2.8, 1.0, 0, 0.0, False),
    "drkd_pearson": (2.0, 4.0, 0.3, 1.0, 0.0, 0.0, 1.0, 0, 0.0, True),
    "spearman": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.05, 0, 1.0, False),
}


def _tied_rows():
    """[5, 11] student, sparse rows (values in class order, int32 indices, fill), the dense
    rows they describe, targets. Row 0: equal stored values and one equal to the fill; row 1:
    the fill above every stored value (the rectification's argmax is then the first tail
    class); row 2: two equal maxima (the first wins) and −0 against a +0 fill; row 3: every
    value equal to the fill; row 4: equal stored values, the fill equal to the smallest."""
    values = torch.tensor([[2.0, 2.0, 0.5, -1.0],
                           [1.0, 0.5, -3.0, 0.25],
                           [4.0, -0.0, 4.0, 1.0],
                           [0.75, 0.75, 0.75, 0.75],
                           [3.0, -2.0, 1.0, 1.0]])
    indices = torch.tensor([[1, 4, 6, 9], [0, 2, 3, 10], [2, 5, 7, 8], [0, 1, 2, 3], [3, 5, 6, 8]], dtype=torch.int32)
    fill = torch.tensor([0.5, 5.0, 0.0, 0.75, -2.0])
    dense = fill[:, None].expand(5, 11).clone().scatter_(1, indices.long(), values)
    student = _inputs(5, 11, seed=5)[0].float()
    target = torch.tensor([3, 7, 5, 6, 10])
    return student, values, indices, fill, dense, target


def _operator(backend, student, teacher, target, setting, sparse=()):
    op = torch.ops.kdfast.fused_kd_loss_triton if backend == "triton" else torch.ops.kdfast.fused_kd_loss
    loss, grad, _ = op(student, teacher, target, None, *SETTINGS[setting], True, False, *sparse)
    return loss, grad


@pytest.mark.interpreter
@pytest.mark.parametrize("block", [None, 4], ids=["resident", "chunked"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_ties_and_fills_match_the_dense_row(setting, block):
    s, values, indices, fill, dense, y = _tied_rows()
    with kd_losses.forced_block_size(block) if block else contextlib.nullcontext():
        got = _operator("triton", s, values, y, setting, (indices, fill))
        same_row = _operator("triton", s, dense, y, setting)
    for ours, theirs in zip(got, same_row):
        assert torch.equal(ours, theirs)
    expected = _operator("cpu", s, values, y, setting, (indices, fill))
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * max(theirs.abs().max().item(), 1e-3))


def _dense_average_ranks(row: torch.Tensor) -> torch.Tensor:
    """The dense Spearman kernel's teacher ranks of one row: a stable ascending sort (NaN
    last, in column order), runs of equal values (NaN equals nothing) sharing their mean
    position, from 1."""
    ordered, order = torch.sort(row, stable=True)
    ranks = torch.empty_like(row)
    start = 0
    while start < len(row):
        end = start
        while end + 1 < len(row) and ordered[end + 1] == ordered[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) * 0.5 + 1.0
        start = end + 1
    return ranks


@pytest.mark.parametrize("k", [1, 3, 6, 9])
def test_teacher_ranks_of_a_sparse_row_are_the_dense_rows(k):
    # Ties among the stored values, stored values equal to the fill, signed zeros, ±inf, and
    # (fill a number) NaN stored values: each NaN alone, after every number, by class.
    classes = 9
    generator = torch.Generator().manual_seed(k)
    rows = []
    pool = torch.tensor([0.0, -0.0, 1.0, 1.0, -2.5, math.inf, -math.inf, math.nan, 3.0, math.nan])
    for _ in range(40):
        values = pool[torch.randint(0, len(pool), (k,), generator=generator)]
        indices = torch.randperm(classes, generator=generator)[:k].sort().values
        fill = pool[torch.randint(0, len(pool) - 3, (), generator=generator)]  # a number (no NaN)
        rows.append((values, indices, fill))
    values = torch.stack([r[0] for r in rows])
    indices = torch.stack([r[1] for r in rows])
    fill = torch.stack([r[2] for r in rows])
    stored, tail = kd_losses._sparse_teacher_ranks(values, fill, classes)
    dense = fill[:, None].expand(-1, classes).clone().scatter_(1, indices, values)
    for row in range(len(rows)):
        expected = _dense_average_ranks(dense[row])
        assert torch.equal(stored[row], expected[indices[row]]), (dense[row], stored[row], expected)
        others = [c for c in range(classes) if c not in indices[row].tolist()]
        if others:
            assert torch.equal(expected[others], tail[row].expand(len(others)))


def test_teacher_ranks_with_a_nan_fill_tie_every_nan():
    values = torch.tensor([[math.nan, 1.0, 2.0], [math.nan, 1.0, math.nan]])
    stored, tail = kd_losses._sparse_teacher_ranks(values, torch.tensor([math.nan, math.nan]), 6)
    # 2 numbers, then 4 NaN classes (one stored, three tail) sharing ranks 3..6; the second
    # row's 5 NaN classes share 2..6.
    assert stored.tolist() == [[4.5, 1.0, 2.0], [4.0, 1.0, 4.0]] and tail.tolist() == [4.5, 4.0]
    # k = C: no class takes the fill, NaN or not; the stored NaNs rank alone, by class.
    stored, _ = kd_losses._sparse_teacher_ranks(values, torch.tensor([math.nan, math.nan]), 3)
    assert stored.tolist() == [[3.0, 1.0, 2.0], [2.0, 1.0, 3.0]]


@pytest.mark.interpreter
def test_malformed_indices_never_leave_the_row():
    # The operator does not check the indices (a device sync): out-of-range classes never
    # match, a repeated class takes its last value (as the CPU operator's rebuild, whose later
    # write wins), and nothing is read outside the [B, k] arrays. The expected rows follow
    # those rules.
    s, _, _, _, _, y = _tied_rows()
    s = s[:3]
    y = y[:3]
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    indices = torch.tensor([[-7, 2, 5, 11], [1, 4, 4, 9], [-2**31, 0, 2**31 - 1, 2**31 - 1]], dtype=torch.int32)
    fill = torch.tensor([0.5, -1.0, 0.25])
    dense = fill[:, None].expand(3, 11).clone()
    dense[0, 2], dense[0, 5] = 2.0, 3.0
    dense[1, 1], dense[1, 4], dense[1, 9] = 1.0, 3.0, 4.0
    dense[2, 0] = 2.0
    # (Not the Spearman term: its ranks are counted from the values, which assumes distinct
    # in-range indices; its kernel reads the indices through the same search.)
    for block in (None, 4):
        for setting in ("kl_ce_pearson_entropy", "dist", "drkd_pearson"):
            with kd_losses.forced_block_size(block) if block else contextlib.nullcontext():
                got = _operator("triton", s, values, y, setting, (indices, fill))
                same_row = _operator("triton", s, dense, y, setting)
            for ours, theirs in zip(got, same_row):
                assert torch.equal(ours, theirs), (setting, block)


# Compilation of the sparse kernels for a Hopper GPU, in a process without TRITON_INTERPRET
# (tests/test_triton.py compiles the dense ones): a kernel is sparse when its t_idx_ptr is
# int32. Prints every kernel's registers and spills (ptxas -v), dense and sparse; the
# resident kd_loss row kernel (C = 1000, bf16) must not spill. (ptxas may trade a few bytes
# of spill for occupancy elsewhere: the chunked kd kernel, sparse, at 64 registers and 16 B.)
KD = KD_ROW_KERNEL
SPARSE_CONFIGURATIONS = [
    ("kd", "_fused_row_kernel", KD, 8),
    ("all-resident", "_fused_row_kernel", dict(KD, HAS_TARGET=True, HAS_CE=True, HAS_PEARSON=True, HAS_SPEARMAN=True,
                                               HAS_COLUMN=True, DIFFICULTY_MODE=1), 8),
    ("drkd-resident", "_fused_row_kernel", dict(KD, HAS_TARGET=True, HAS_CE=True, RECTIFY=True), 8),
    ("kd-chunked", "_fused_row_kernel", dict(KD, C=131072, ROWS=1, BLOCK=4096, RESIDENT=False), 16),
    ("drkd-pearson-chunked", "_fused_row_kernel", dict(KD, C=131072, HAS_TARGET=True, HAS_CE=True, HAS_PEARSON=True,
                                                       RECTIFY=True, ROWS=1, BLOCK=4096, RESIDENT=False), 16),
    ("dist-chunked", "_fused_row_kernel", dict(KD, C=131072, HAS_KL=False, HAS_PEARSON=True, HAS_COLUMN=True, ROWS=1,
                                               BLOCK=4096, RESIDENT=False), 16),
    ("softmax-stats", "_softmax_stats_kernel", dict(BLOCK=4096), 16),
    ("column-moments", "_column_moments_kernel", dict(BLOCK=256), 4),
    ("column-partials", "_column_partials_kernel", dict(C=1000, ROWS=2, BLOCK=1024), 8),
    ("spearman-prepare", "_spearman_prepare_kernel", dict(BLOCK=1024), 4),
    ("spearman-prepare-8192", "_spearman_prepare_kernel", dict(BLOCK=8192), 16),
]


def _pointer_types(sparse: bool) -> dict:
    """bf16 student, the teacher bf16 (dense) or fp32 values with int32 indices (sparse)."""
    return {"s_ptr": "*bf16", "gs_ptr": "*bf16", "s_sorted_ptr": "*bf16", "t_ptr": "*fp32" if sparse else "*bf16",
            "t_idx_ptr": "*i32" if sparse else "*fp32", "target_ptr": "*i64", "t_order_ptr": "*i64",
            "rho_s_ptr": "*fp64", "partial_ptr": "*fp64", "theta_ptr": "*fp64"}


def test_sparse_kernels_compile_for_hopper(tmp_path):
    report = compile_for_hopper([
        dict(label=f"{label}-{mode}", kernel=f"kd_losses.{name}", constexprs=flags, warps=warps,
             types=_pointer_types(mode == "sparse"), integers=KERNEL_INTEGERS)
        for label, name, flags, warps in SPARSE_CONFIGURATIONS for mode in ("dense", "sparse")], tmp_path)
    print({label: (entry["registers"], entry["spills"]) for label, entry in report.items()})
    for label in ("kd-dense", "kd-sparse"):
        if report[label]["spills"] is not None:  # when Triton prints ptxas's log
            assert report[label]["spills"] == 0, report