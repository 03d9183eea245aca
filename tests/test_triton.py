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
    assert kd_losses.launch_config(7) == (8, 1)
    assert kd_losses.launch_config(1000) == (1024, 4)
    assert kd_losses.launch_config(262144) == (4096, 16)
    with kd_losses.forced_block_size(16):
        assert kd_losses.launch_config(1000) == (16, 1)


# Compilation for a Hopper GPU, in a process without TRITON_INTERPRET (under the
# interpreter the kernels are not compilable objects): every kernel with the constexpr
# combinations the launcher uses, at the widest rows included (compile times per kernel:
# benchmarks/results/gpu_static.csv).
HOPPER_COMPILE = r"""
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kdfast.kernels import gate, kd_losses

KERNELS = [
    ("_fused_row_kernel", dict(HAS_TARGET=True, HAS_CE=True, HAS_PEARSON=True, HAS_SPEARMAN=True, HAS_COLUMN=True,
                               RECTIFY=False, DIFFICULTY_MODE=1, STUDENT_GRAD=True, TEACHER_GRAD=True, BLOCK=1024), 4),
    ("_fused_row_kernel", dict(HAS_TARGET=True, HAS_CE=True, HAS_PEARSON=False, HAS_SPEARMAN=False, HAS_COLUMN=False,
                               RECTIFY=True, DIFFICULTY_MODE=0, STUDENT_GRAD=True, TEACHER_GRAD=False, BLOCK=4096), 16),
    ("_softmax_stats_kernel", dict(BLOCK=4096), 16),
    ("_column_moments_kernel", dict(PASS=0, BLOCK=256), 4),
    ("_column_moments_kernel", dict(PASS=1, BLOCK=256), 4),
    ("_spearman_kernel", dict(WITH_GRAD=True, BLOCK=1024), 4),
    ("_spearman_kernel", dict(WITH_GRAD=True, BLOCK=8192), 16),
    ("gate._gate_compact_kernel", dict(BLOCK_ROWS=4, BLOCK_COLS=1024), 8),
]
POINTERS = {"s_ptr": "*bf16", "gs_ptr": "*bf16", "target_ptr": "*i64", "rho_s_ptr": "*fp64", "rho_ptr": "*fp64",
            "partial_ptr": "*fp64", "theta_ptr": "*fp64", "stack_a_ptr": "*fp64", "stack_b_ptr": "*fp64",
            "stack_start_ptr": "*i32", "flag_ptr": "*i32", "s_order_ptr": "*i64", "t_order_ptr": "*i64",
            "s_sorted_ptr": "*bf16", "t_sorted_ptr": "*bf16", "logits_ptr": "*bf16", "rows_ptr": "*i64",
            "next_rows_ptr": "*i64", "count_ptr": "*i64", "confidence_ptr": "*fp64", "threshold_ptr": "*fp64"}
for name, constexprs, warps in KERNELS:
    kernel = getattr(gate, name.split(".")[1]) if name.startswith("gate.") else getattr(kd_losses, name)
    signature = {}
    for arg in inspect.signature(kernel.fn).parameters:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = POINTERS.get(arg, "*fp32")
        else:
            integers = ("C", "B", "rows_per_chunk", "active", "classes", "stride_row")
            signature[arg] = "i32" if arg in integers else "fp32"
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert len(compiled.asm["cubin"]) > 0, name
    print("compiled", name, constexprs)
"""


def test_kernels_compile_for_hopper():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", HOPPER_COMPILE], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("compiled") == 8
