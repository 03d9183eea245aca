"""Triton kernels of ResKD's gate-and-compact step (the C++ one is csrc/gate_cpu.cpp).

For the logits [A, C] of the A active rows and their dataset rows [A], the step computes
each row's max softmax probability ``1 / Σ_j exp(x_ij − max_i)`` (in float64 from the
exact differences) and writes the rows whose confidence is below the threshold, in their
input order, to the front of ``next_rows`` (the rest −1) and their number to ``count``.

Three launches on the logits' stream, none waiting for the host (the order of the
launches orders their memory):

1. ``_gate_confidence_kernel``: one program per block of BLOCK_ROWS rows (many programs,
   the whole GPU): each row's confidence, from registers when the row fits one tile
   (C ≤ 4096: one read of the logits), else in two passes (max, then sum); the number of
   the block's rows that continue, into ``counts[block]``.
2. ``torch.cumsum`` of those counts: each block's offset among the rows that continue.
3. ``_gate_compact_kernel``: one program per block again: its continuing rows go to
   positions offset + rank (the input order: stable, as the CPU and reference gates), its
   stopping rows to the tail (−1), at total + (rows before the block − offset) + rank.
   Every position of ``next_rows`` is written exactly once, by one program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdfast.kernels.launch import on_device_of

#: Widest row the confidence kernel holds in registers (one read of the logits).
MAX_RESIDENT_CLASSES = 4096


@triton.jit
def _gate_confidence_kernel(
    logits_ptr,  # [A, C] logits, rows stride_row apart, columns contiguous
    confidence_ptr,  # [A] fp64 out: max softmax probability per row
    counts_ptr,  # [blocks] int64 out: the block's rows that continue
    active,
    classes,
    stride_row,
    threshold_ptr,  # [] fp64 θ
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    RESIDENT: tl.constexpr,
):
    # Memory safety: program b reads and writes rows [b·BLOCK_ROWS, (b+1)·BLOCK_ROWS) ∩ [0, A)
    # only (masked), and counts[b]; logit offsets are row·stride_row in int64 (A·C passes
    # 2³¹ at, e.g., 16384 × 131072), columns masked to < C. The only values shared between
    # threads are Triton's reductions.
    block = tl.program_id(0)
    rows = block.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_in = rows < active
    col_offsets = tl.arange(0, BLOCK_COLS)
    base = rows[:, None] * stride_row
    threshold = tl.load(threshold_ptr)  # float64 (a float argument would be rounded to float32)
    maximum = tl.full((BLOCK_ROWS,), float("-inf"), tl.float32)
    has_nan = tl.zeros((BLOCK_ROWS,), tl.int32)
    total = tl.zeros((BLOCK_ROWS,), tl.float64)
    if RESIDENT:
        mask = row_in[:, None] & (col_offsets[None, :] < classes)
        x = tl.load(logits_ptr + base + col_offsets[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        maximum = tl.max(x, axis=1)  # NaN-propagating: a NaN anywhere makes the row's maximum NaN
        has_nan = tl.max((x != x).to(tl.int32), axis=1)
        terms = tl.exp(x.to(tl.float64) - maximum.to(tl.float64)[:, None])
        total = tl.sum(tl.where(mask, terms, 0.0), axis=1)
    else:
        # Pass 1: the row maxima; pass 2: Σ exp(x − max) in float64 from the exact differences.
        for start in range(0, classes, BLOCK_COLS):
            cols = start + col_offsets
            mask = row_in[:, None] & (cols[None, :] < classes)
            x = tl.load(logits_ptr + base + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
            maximum = tl.maximum(maximum, tl.max(x, axis=1))
            has_nan = has_nan | tl.max((x != x).to(tl.int32), axis=1)
        maximum64 = maximum.to(tl.float64)
        for start in range(0, classes, BLOCK_COLS):
            cols = start + col_offsets
            mask = row_in[:, None] & (cols[None, :] < classes)
            x = tl.load(logits_ptr + base + cols[None, :], mask=mask, other=0.0)
            terms = tl.exp(x.to(tl.float32).to(tl.float64) - maximum64[:, None])
            total += tl.sum(tl.where(mask, terms, 0.0), axis=1)
    confidence = 1.0 / tl.where(row_in, total, 1.0)
    confidence = tl.where(has_nan != 0, float("nan"), confidence)
    tl.store(confidence_ptr + rows, confidence, mask=row_in)
    go_on = (row_in & (confidence < threshold)).to(tl.int64)  # a NaN confidence compares false: it stops
    tl.store(counts_ptr + block, tl.sum(go_on, axis=0))


@triton.jit
def _gate_compact_kernel(
    confidence_ptr,  # [A] fp64 the confidences of _gate_confidence_kernel
    rows_ptr,  # [A] int64 dataset rows of the active rows
    offsets_ptr,  # [blocks] int64 inclusive prefix sums of the blocks' counts
    next_rows_ptr,  # [A] int64 out: continuing rows first, then −1
    count_ptr,  # [] int64 out: number of continuing rows
    active,
    blocks,
    threshold_ptr,  # [] fp64 θ
    BLOCK_ROWS: tl.constexpr,
):
    # Memory safety: program b reads its own rows and two prefix sums (b − 1, b; the last
    # one, blocks − 1, is the total). Its continuing rows go to [start, start + n_b), its
    # stopping ones to total + [first − start, first − start + BLOCK_ROWS − n_b) where
    # first = b·BLOCK_ROWS and start = the continuing rows before the block: over all
    # programs these ranges partition [0, A), so each position is written once, by one
    # program, and every position is < A. Only program 0 writes count.
    block = tl.program_id(0)
    first = block.to(tl.int64) * BLOCK_ROWS
    rows = first + tl.arange(0, BLOCK_ROWS)
    row_in = rows < active
    threshold = tl.load(threshold_ptr)
    total = tl.load(offsets_ptr + blocks - 1)
    start = tl.load(offsets_ptr + block - 1, mask=block > 0, other=0)
    confidence = tl.load(confidence_ptr + rows, mask=row_in, other=1.0)
    go_on = (row_in & (confidence < threshold)).to(tl.int64)
    stop = row_in.to(tl.int64) - go_on
    kept_position = start + tl.cumsum(go_on, axis=0) - go_on
    stop_position = total + (first - start) + tl.cumsum(stop, axis=0) - stop
    dataset_rows = tl.load(rows_ptr + rows, mask=row_in, other=-1)
    tl.store(next_rows_ptr + kept_position, dataset_rows, mask=go_on != 0)
    tl.store(next_rows_ptr + stop_position, tl.full((BLOCK_ROWS,), -1, tl.int64), mask=stop != 0)
    tl.store(count_ptr + tl.zeros((1,), tl.int64), tl.full((1,), 0, tl.int64) + total, mask=block == 0)


def launch_config(classes: int) -> tuple[int, int, bool, int]:
    """(BLOCK_ROWS, BLOCK_COLS, resident, num_warps) of the confidence kernel: tiles of about
    4096 values (at least 2 rows), the whole row up to MAX_RESIDENT_CLASSES classes, chunks
    of 4096 beyond."""
    block_cols = min(MAX_RESIDENT_CLASSES, triton.next_power_of_2(max(classes, 1)))
    block_rows = max(1, 4096 // block_cols)
    return block_rows, block_cols, classes <= block_cols, max(1, min(16, block_rows * block_cols // 256))


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
    block_rows, block_cols, resident, warps = launch_config(classes)
    # A device fill, not torch.tensor(): copying a Python float to the GPU would be a
    # synchronizing host-to-device copy on every gate call.
    threshold = torch.full((), float(threshold), dtype=torch.float64, device=logits.device)
    blocks = triton.cdiv(active, block_rows)
    with on_device_of(logits):
        counts = torch.empty(blocks, dtype=torch.int64, device=logits.device)
        _gate_confidence_kernel[(blocks,)](logits, confidence, counts, active, classes, logits.stride(0), threshold,
                                           BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, RESIDENT=resident,
                                           num_warps=warps)
        offsets = torch.cumsum(counts, 0)
        _gate_compact_kernel[(blocks,)](confidence, rows, offsets, next_rows, count, active, blocks, threshold,
                                        BLOCK_ROWS=block_rows, num_warps=1)
    return next_rows, count, confidence


@gate_compact_triton.register_fake
def _(logits, rows, threshold):
    active = logits.shape[0]
    return (logits.new_empty(active, dtype=torch.int64), logits.new_empty((), dtype=torch.int64),
            logits.new_empty(active, dtype=torch.float64))
