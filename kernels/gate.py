"""Triton kernel of ResKD's gate-and-compact step (the C++ one is csrc/gate_cpu.cpp).

For the logits [A, C] of the A active rows and their dataset rows [A], one launch computes
each row's max softmax probability ``1 / Σ_j exp(x_ij − max_i)`` (in float64 from the
exact differences, two passes over the row: max, then sum) and writes the rows whose
confidence is below the threshold, in their input order, to the front of ``next_rows``
(the rest −1) and their number to ``count``.

The launch is a single program that walks the rows in blocks: each block's rows are
reduced over column chunks, then compacted with a prefix sum (``tl.cumsum``) at the offset
the earlier blocks reached. One program keeps the compaction stable without any
cross-program synchronization; it reads the logits once per pass, which is the whole
cost (a sub-batch's logits, A·C values, next to the res-student that will run on it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdfast.kernels.launch import on_device_of


@triton.jit
def _gate_compact_kernel(
    logits_ptr,  # [A, C] logits, rows stride_row apart, columns contiguous
    rows_ptr,  # [A] int64 dataset rows of the active rows
    next_rows_ptr,  # [A] int64 out: continuing rows first, then −1
    count_ptr,  # [] int64 out: number of continuing rows
    confidence_ptr,  # [A] fp64 out: max softmax probability per row
    active,
    classes,
    stride_row,
    threshold_ptr,  # [] fp64 θ
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    # Memory safety: a single program (grid (1,)), so the compaction's running offset is
    # program-local and no other program writes next_rows. Logit offsets are row·stride_row
    # in int64 (A·C passes 2³¹ at, e.g., 16384 × 131072); every other offset is < A. Every
    # load and store is masked to rows < A and columns < C; positions of kept rows are
    # < the number of rows seen, so < A. The only values shared between threads are
    # Triton's reductions and scans.
    row_offsets = tl.arange(0, BLOCK_ROWS)
    col_offsets = tl.arange(0, BLOCK_COLS)
    threshold = tl.load(threshold_ptr)  # float64 (a float argument would be rounded to float32)
    kept = 0
    for first in range(0, active, BLOCK_ROWS):
        rows = first + row_offsets
        row_in = rows < active
        # Pass 1: the row maxima (NaN-propagating: a NaN anywhere makes the row's maximum NaN).
        maximum = tl.full((BLOCK_ROWS,), float("-inf"), tl.float32)
        has_nan = tl.zeros((BLOCK_ROWS,), tl.int32)
        for start in range(0, classes, BLOCK_COLS):
            cols = start + col_offsets
            mask = row_in[:, None] & (cols[None, :] < classes)
            x = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_row + cols[None, :], mask=mask,
                        other=float("-inf")).to(tl.float32)
            maximum = tl.maximum(maximum, tl.max(x, axis=1))
            has_nan = has_nan | tl.max((x != x).to(tl.int32), axis=1)
        # Pass 2: Σ exp(x − max) in float64 from the exact differences.
        total = tl.zeros((BLOCK_ROWS,), tl.float64)
        maximum64 = maximum.to(tl.float64)
        for start in range(0, classes, BLOCK_COLS):
            cols = start + col_offsets
            mask = row_in[:, None] & (cols[None, :] < classes)
            x = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_row + cols[None, :], mask=mask, other=0.0)
            terms = tl.exp(x.to(tl.float32).to(tl.float64) - maximum64[:, None])
            total += tl.sum(tl.where(mask, terms, 0.0), axis=1)
        confidence = 1.0 / tl.where(row_in, total, 1.0)
        confidence = tl.where(has_nan != 0, float("nan"), confidence)
        tl.store(confidence_ptr + rows, confidence, mask=row_in)
        # Compaction: a NaN confidence compares false, so such a row stops.
        go_on = (row_in & (confidence < threshold)).to(tl.int32)
        position = kept + tl.cumsum(go_on, axis=0) - go_on
        dataset_rows = tl.load(rows_ptr + rows, mask=row_in, other=-1)
        tl.store(next_rows_ptr + position, dataset_rows, mask=go_on != 0)
        kept += tl.sum(go_on, axis=0)
    for first in range(0, active, BLOCK_ROWS):  # the tail past the count: −1
        rows = first + row_offsets
        tl.store(next_rows_ptr + rows, tl.full((BLOCK_ROWS,), -1, tl.int64), mask=(rows < active) & (rows >= kept))
    tl.store(count_ptr, kept.to(tl.int64))


def launch_config(classes: int) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS): tiles of about 4096 values, whole rows up to 1024 classes."""
    block_cols = min(1024, triton.next_power_of_2(max(classes, 1)))
    return max(1, 4096 // block_cols), block_cols


@torch.library.custom_op("kdfast::gate_compact_triton", mutates_args=())
def gate_compact_triton(logits: torch.Tensor, rows: torch.Tensor,
                        threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(next_rows [A] int64, count [] int64, confidence [A] float64); see the module docstring."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    rows = rows.contiguous()
    active, classes = logits.shape
    next_rows = torch.empty(active, dtype=torch.int64, device=logits.device)
    count = torch.zeros((), dtype=torch.int64, device=logits.device)
    confidence = torch.empty(active, dtype=torch.float64, device=logits.device)
    if active == 0:
        return next_rows, count, confidence
    block_rows, block_cols = launch_config(classes)
    # A device fill, not torch.tensor(): copying a Python float to the GPU would be a
    # synchronizing host-to-device copy on every gate call.
    threshold = torch.full((), float(threshold), dtype=torch.float64, device=logits.device)
    with on_device_of(logits):
        _gate_compact_kernel[(1,)](logits, rows, next_rows, count, confidence, active, classes, logits.stride(0),
                                   threshold, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=8)
    return next_rows, count, confidence


@gate_compact_triton.register_fake
def _(logits, rows, threshold):
    active = logits.shape[0]
    return (logits.new_empty(active, dtype=torch.int64), logits.new_empty((), dtype=torch.int64),
            logits.new_empty(active, dtype=torch.float64))
