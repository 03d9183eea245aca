"""The Triton kernels: agreement with the reference under Triton's interpreter (on the CPU;
keep the grids small, every program costs milliseconds there), and compilation for a
Hopper GPU (sm_90), which needs no GPU and catches what the interpreter would accept.
On a GPU, tests/test_fused.py and tests/test_edge_cases.py run them compiled."""

import contextlib

import pytest
import torch
from test_fused import CASES, _applicable, _inputs, _loss_and_grads, _relative_errors

import kdfast
from kdfast.kernels import kd_losses

# The tests marked `interpreter` call the Triton backend on CPU tensors: they run where
# Triton is interpreted (no GPU); on a GPU, test_fused.py and test_edge_cases.py run the
# same kernels compiled.

# (3, 37): several warps' worth of columns; (1, 2) and (3, 7): the smallest rows;
# (40, 5): three chunks of rows in the column statistics (for the losses that have them).
SHAPES = [(1, 1), (1, 2), (3, 7), (3, 37), (40, 5)]
COLUMN_CASES = ("pearson_columns", "dist")


PAIRS = [pytest.param(case, shape, id=f"{case}-{shape[0]}x{shape[1]}") for case in CASES for shape in SHAPES
         if _applicable(case, shape) and (shape[0] <= 3 or case in COLUMN_CASES)]


@pytest.mark.interpreter
@pytest.mark.parametrize("case,shape", PAIRS)
@pytest.mark.parametrize("block", [None, 4], ids=["whole-row", "chunked"])
def test_float32_matches_the_float64_reference(case, shape, block):
    s, t, y, w = _inputs(shape)
    s, t = s.float(), t.float()
    truth = _loss_and_grads(case, s.double(), t.double(), y, w, "torch", "cpu")
    with kd_losses.forced_block_size(block) if block else contextlib.nullcontext():
        got = _loss_and_grads(case, s, t, y, w, "triton", "cpu")
    for name, error in zip(("loss", "grad_student", "grad_teacher"), _relative_errors(got, truth)):
        assert error <= 1e-5, f"{name}: relative error {error:.2e}"


@pytest.mark.interpreter
@pytest.mark.parametrize("case", CASES)
def test_bfloat16_no_worse_than_the_reference_at_that_dtype(case):
    s, t, y, w = _inputs((3, 19))
    s, t = s.bfloat16(), t.bfloat16()
    truth = _loss_and_grads(case, s.double(), t.double(), y, w, "torch", "cpu")
    reference = _loss_and_grads(case, s, t, y, w, "torch", "cpu")
    got = _loss_and_grads(case, s, t, y, w, "triton", "cpu")
    floor = torch.finfo(torch.bfloat16).eps / 4
    for ours, theirs in zip(_relative_errors(got, truth), _relative_errors(reference, truth)):
        assert ours <= 2 * theirs + floor


@pytest.mark.interpreter
def test_long_rows_through_the_online_softmax():
    # KL and Pearson on a row far longer than one block (chunks of 4096), not a power of two.
    generator = torch.Generator().manual_seed(0)
    s = (torch.randn(1, 131075, generator=generator) * 3).requires_grad_()
    t = torch.randn(1, 131075, generator=generator) * 3
    for loss in (kdfast.kd_loss, kdfast.pearson_loss):
        ours = loss(s, t, backend="triton")
        (grad,) = torch.autograd.grad(ours, s)
        expected = loss(s, t, backend="cpu")
        (expected_grad,) = torch.autograd.grad(expected, s)
        torch.testing.assert_close(ours, expected, rtol=2e-5, atol=1e-7)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-10)


@pytest.mark.interpreter
def test_spearman_terms_beyond_the_supported_width_say_so():
    s, t = torch.randn(1, kd_losses.MAX_SPEARMAN_CLASSES + 1), torch.randn(1, kd_losses.MAX_SPEARMAN_CLASSES + 1)
    with pytest.raises(kdfast.BackendUnavailableError, match="at most 8192 classes"):
        kdfast.spearman_loss(s, t, backend="triton")
    with pytest.raises(ValueError, match="at most 8192 classes"):  # the operator itself, called directly
        torch.ops.kdfast.fused_kd_loss_triton(s, t, None, None, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0, 1.0, False,
                                              False, False)
    assert torch.isfinite(kdfast.kd_loss(s, t, backend="triton"))  # the other losses have no limit


def test_launch_configuration_heuristic():
    layout = kd_losses.launch_config
    assert layout(7) == kd_losses.RowLayout(block=8, rows=16, warps=1, resident=True)
    assert layout(100) == kd_losses.RowLayout(block=128, rows=16, warps=8, resident=True)
    assert layout(1000) == kd_losses.RowLayout(block=1024, rows=2, warps=8, resident=True)
    assert layout(8192) == kd_losses.RowLayout(block=8192, rows=1, warps=16, resident=True)
    assert layout(8193) == kd_losses.RowLayout(block=4096, rows=1, warps=16, resident=False)
    assert layout(8192, correlation_terms=2) == kd_losses.RowLayout(block=4096, rows=1, warps=16, resident=False)
    assert layout(4096, correlation_terms=2) == kd_losses.RowLayout(block=4096, rows=1, warps=16, resident=True)
    assert layout(262144) == kd_losses.RowLayout(block=4096, rows=1, warps=16, resident=False)
    with kd_losses.forced_block_size(16):
        assert layout(1000) == kd_losses.RowLayout(block=16, rows=1, warps=1, resident=False)
        assert layout(16) == kd_losses.RowLayout(block=16, rows=1, warps=1, resident=True)


# The multi-row layouts: B not a multiple of the rows per program (the last program's
# surplus rows masked), C at the edges of a block (1, 2, 31; 1000 and 1001 in a 1024-wide
# tile; 8192 the widest resident row of a loss with one correlation term and a chunked one
# for DIST and CMKD, 8193 chunked for all).
LAYOUT_SHAPES = [(17, 1), (17, 2), (19, 31), (3, 1000), (3, 1001), (2, 8192), (2, 8193)]
LAYOUT_CASES = ("kd", "dist", "pearson_columns", "cmkd_per_sample", "drkd", "spearman")


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", LAYOUT_SHAPES, ids=[f"{b}x{c}" for b, c in LAYOUT_SHAPES])
@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_multi_row_and_resident_layouts_match_the_float64_reference(case, shape):
    if not _applicable(case, shape) or (case in ("spearman", "cmkd_per_sample")
                                        and shape[1] > kd_losses.MAX_SPEARMAN_CLASSES):
        pytest.skip(f"{case} is not defined (or not on Triton) at {shape}")
    s, t, y, w = _inputs(shape, seed=3)
    s, t = s.float(), t.float()
    truth = _loss_and_grads(case, s.double(), t.double(), y, w, "torch", "cpu")
    got = _loss_and_grads(case, s, t, y, w, "triton", "cpu")
    for name, error in zip(("loss", "grad_student", "grad_teacher"), _relative_errors(got, truth)):
        assert error <= 1e-5, f"{name}: relative error {error:.2e}"


@pytest.mark.interpreter
def test_rectified_teacher_gradient_lands_on_the_unrectified_columns():
    # DR-KD with a teacher that requires grad: the resident layout swaps the teacher's
    # columns in registers and must swap its gradient back before the (vector) store.
    s, t, y, _ = _inputs((5, 37), seed=4)
    y = torch.tensor([0, 36, 5, 5, 17])
    t[2, 5] = t[2].max() + 1  # the target already the argmax: no swap on that row
    for block in (None, 8):
        got, expected = [], []
        for backend, sink in (("triton", got), ("torch", expected)):
            a = s.float().clone().requires_grad_()
            b = t.float().clone().requires_grad_()
            with kd_losses.forced_block_size(block) if block else contextlib.nullcontext():
                loss = kdfast.drkd_loss(a, b, y, 2.0, 0.3, backend=backend)
            sink.extend([loss, *torch.autograd.grad(loss, (a, b))])
        for ours, theirs in zip(got, expected):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# Compilation for a Hopper GPU, in a process without TRITON_INTERPRET (under the
# interpreter the kernels are not compilable objects): every kernel with the constexpr
# combinations the launcher uses, at the widest rows included (compile times per kernel:
# benchmarks/results/gpu_static.csv).
HOPPER_KERNELS = [
    ("kd_losses._fused_row_kernel", dict(C=1000, HAS_TARGET=True, HAS_CE=True, HAS_PEARSON=True, HAS_SPEARMAN=True,
                                         HAS_COLUMN=True, RECTIFY=False, DIFFICULTY_MODE=1, STUDENT_GRAD=True,
                                         TEACHER_GRAD=True, ROWS=2, BLOCK=1024, RESIDENT=True), 8),
    ("kd_losses._fused_row_kernel", dict(C=8192, HAS_TARGET=True, HAS_CE=True, HAS_PEARSON=True, HAS_SPEARMAN=False,
                                         HAS_COLUMN=False, RECTIFY=True, DIFFICULTY_MODE=0, STUDENT_GRAD=True,
                                         TEACHER_GRAD=True, ROWS=1, BLOCK=8192, RESIDENT=True), 16),
    ("kd_losses._fused_row_kernel", dict(C=131072, HAS_TARGET=True, HAS_CE=True, HAS_PEARSON=False,
                                         HAS_SPEARMAN=False, HAS_COLUMN=False, RECTIFY=True, DIFFICULTY_MODE=0,
                                         STUDENT_GRAD=True, TEACHER_GRAD=False, ROWS=1, BLOCK=4096, RESIDENT=False), 16),
    ("kd_losses._softmax_stats_kernel", dict(BLOCK=4096), 16),
    ("kd_losses._column_moments_kernel", dict(BLOCK=256), 4),
    ("kd_losses._column_partials_kernel", dict(C=1000, ROWS=2, BLOCK=1024), 8),
    ("kd_losses._spearman_prepare_kernel", dict(BLOCK=1024), 4),
    ("kd_losses._spearman_prepare_kernel", dict(BLOCK=8192), 16),
    ("kd_losses._pav_kernel", dict(ROWS=32), 1),
    ("kd_losses._spearman_finish_kernel", dict(WITH_GRAD=True, BLOCK=1024), 4),
    ("kd_losses._spearman_finish_kernel", dict(WITH_GRAD=True, BLOCK=8192), 16),
    ("gate._gate_confidence_kernel", dict(BLOCK_ROWS=4, BLOCK_COLS=1024, RESIDENT=True), 8),
    ("gate._gate_confidence_kernel", dict(BLOCK_ROWS=1, BLOCK_COLS=4096, RESIDENT=False), 8),
    ("gate._gate_compact_kernel", dict(BLOCK_ROWS=4), 1),
]
HOPPER_POINTERS = {
    "s_ptr": "*bf16", "gs_ptr": "*bf16", "target_ptr": "*i64", "rho_s_ptr": "*fp64", "rho_ptr": "*fp64",
    "partial_ptr": "*fp64", "theta_ptr": "*fp64", "stack_a_ptr": "*fp64", "stack_b_ptr": "*fp64",
    "stack_start_ptr": "*i32", "flag_ptr": "*i32", "s_order_ptr": "*i64", "t_order_ptr": "*i64",
    "s_sorted_ptr": "*bf16", "t_sorted_ptr": "*bf16", "logits_ptr": "*bf16", "rows_ptr": "*i64",
    "next_rows_ptr": "*i64", "count_ptr": "*i64", "confidence_ptr": "*fp64", "threshold_ptr": "*fp64",
    "counts_ptr": "*i64", "offsets_ptr": "*i64", "block_count_ptr": "*i32", "prefix_ptr": "*fp64"}
HOPPER_INTEGERS = ("C", "B", "rows_per_chunk", "rows_per_program", "active", "classes", "stride_row", "blocks")


def test_kernels_compile_for_hopper(tmp_path):
    from helpers import compile_for_hopper

    report = compile_for_hopper([
        dict(label=f"{number}:{name}", kernel=name, constexprs=constexprs, warps=warps, types=HOPPER_POINTERS,
             integers=HOPPER_INTEGERS, divisibility=False)
        for number, (name, constexprs, warps) in enumerate(HOPPER_KERNELS)], tmp_path, timeout=600)
    assert len(report) == 14 and all(entry["cubin_bytes"] > 0 for entry in report.values()), report


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["kd", "cmkd", "drkd"])
def test_chunked_layout_at_large_temperatures(name):
    # The chunked layout takes KL and the entropy online in its first pass (an fp64 sum of
    # e_j (t_j − s_j)/τ, rescaled as the running max moves): the same fp64 agreement at
    # every accepted τ as the resident layout, and no negative KL for nearly equal rows.
    import test_edge_cases as edge

    s, t = edge.logits(8, 300, torch.float32), edge.logits(8, 300, torch.float32)
    y = torch.randint(0, 300, (8,))
    for temperature in (1.0, 100.0):
        exact = edge._loss_and_grads(name, s.double(), t.double(), y, "torch", temperature=temperature)
        with kd_losses.forced_block_size(64):
            got = edge._loss_and_grads(name, s, t, y, "triton", temperature=temperature)
        torch.testing.assert_close(got[0].double(), exact[0], rtol=2e-4, atol=1e-6)
        for ours, truth in zip(got[1:], exact[1:]):
            if truth is not None:
                torch.testing.assert_close(ours.double(), truth, rtol=0, atol=2e-4 * truth.abs().max().item())
    t = edge.logits(4, 1000, torch.float32)
    s = t + edge.logits(4, 1000, torch.float32, scale=1e-4)
    kw = {"temperature": 100.0, **({"corr_weight": 0.0, "ce_weight": 0.0} if name == "cmkd" else {})}
    truth = edge.LOSSES[name](s.double(), t.double(), t.argmax(1), backend="torch", **kw).item()
    with kd_losses.forced_block_size(256):
        loss = edge.LOSSES[name](s, t, t.argmax(1), backend="triton", **kw).item()
    assert 0.0 <= loss and loss == pytest.approx(truth, abs=1e-3)


@pytest.mark.interpreter
@pytest.mark.parametrize("block", [None, 4], ids=["resident", "chunked"])
def test_column_statistics_shifted_by_an_outlying_first_row(block):
    # The column sums are shifted by row 0's probabilities (one pass, exact for constant
    # columns); a peaked row 0 far from every column mean costs the fp64 sums a few digits,
    # not the fp32 result.
    generator = torch.Generator().manual_seed(11)
    s = torch.randn(40, 9, generator=generator, dtype=torch.float64)
    t = torch.randn(40, 9, generator=generator, dtype=torch.float64)
    s[0, 3] = t[0, 5] = 30.0
    exact = _loss_and_grads("pearson_columns", s, t, torch.zeros(40, dtype=torch.long), torch.ones(40), "torch", "cpu")
    with kd_losses.forced_block_size(block) if block else contextlib.nullcontext():
        got = _loss_and_grads("pearson_columns", s.float(), t.float(), torch.zeros(40, dtype=torch.long),
                              torch.ones(40), "triton", "cpu")
    for name, error in zip(("loss", "grad_student", "grad_teacher"), _relative_errors(got, exact)):
        assert error <= 1e-5, f"{name}: relative error {error:.2e}"


@pytest.mark.interpreter
@pytest.mark.parametrize("block", [None, 4], ids=["resident", "chunked"])
@pytest.mark.parametrize("case", ["pearson_rows", "dist", "cmkd"])
def test_constant_rows_in_both_layouts_match_the_float64_reference(case, block):
    # A constant student row (row 1) and a constant teacher row (row 2): the correlation's
    # 1/1e-8 floor multiplies p − c_p and q − c_q, so the gradient's centers must equal such
    # a row's p bit for bit (the chunked layout's weighted means are divided in an order that
    # keeps them exact); the other rows are teacher-like (ρ ≈ 1, the ill-conditioned case).
    s, t, y, w = _inputs((4, 9))
    s, t = s.float(), t.float()
    s[1] = 2.5
    t[2] = -1.0
    truth = _loss_and_grads(case, s.double(), t.double(), y, w, "torch", "cpu")
    with kd_losses.forced_block_size(block) if block else contextlib.nullcontext():
        got = _loss_and_grads(case, s, t, y, w, "triton", "cpu")
    for name, error in zip(("loss", "grad_student", "grad_teacher"), _relative_errors(got, truth)):
        assert error <= 1e-5, f"{name}: relative error {error:.2e}"


@pytest.mark.interpreter
@pytest.mark.parametrize("block", [None, 8], ids=["resident", "chunked"])
def test_rectified_teacher_with_a_row_pearson_term_matches_the_cpu_operator(block):
    # A setting no public loss makes, which the generic operator allows: DR-KD's rectified
    # teacher under KL, CE and the row Pearson term, with both gradients. The chunked
    # layout takes the rectification off the first pass's cross sum in closed form and puts
    # the two exchanged columns back over the final max.
    from helpers import teacher_like

    s, t, y = teacher_like(5, 37, generator=torch.Generator().manual_seed(3))
    s, t = s.float(), t.float()
    y = (t.argmax(1) + 1 + torch.arange(5)) % 37  # the teacher's argmax is never the target...
    y[0] = t[0].argmax()  # ...but in a row with nothing to exchange
    arguments = (2.0, 1.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0, 0.3, True, True, True)
    expected = torch.ops.kdfast.fused_kd_loss(s, t, y, None, *arguments)
    with kd_losses.forced_block_size(block) if block else contextlib.nullcontext():
        got = torch.ops.kdfast.fused_kd_loss_triton(s, t, y, None, *arguments)
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * max(theirs.abs().max().item(), 1e-3))
