"""ResKD's gate-and-compact step: which active rows go on to the next res-student.

:func:`gate_compact` is one operation with three implementations that agree exactly on
which rows continue and in which order (``torch`` reference here, ``cpu`` in
csrc/gate_cpu.cpp, ``triton`` in kernels/gate.py), chosen like the losses' backends
(``backend=``, ``$KDFAST_BACKEND``, then ``auto``).
"""

from __future__ import annotations

import torch

from kdfast import dispatch

__all__ = ["gate_compact", "max_probability"]


def max_probability(logits: torch.Tensor) -> torch.Tensor:
    """Each row's max softmax probability ``1 / Σ_j exp(x_ij − max_i)``, float64 ``[A]``.

    The differences are exact in float64 and the sum accumulates there, so the kernels'
    values agree with these to the last bits of ``exp`` and of the summation order. A row
    holding NaN, or ±inf where the difference is undefined, gives NaN.
    """
    x = logits.float()
    maximum = x.max(dim=1, keepdim=True).values
    return 1.0 / torch.exp(x.double() - maximum.double()).sum(dim=1)


def gate_compact_reference(logits: torch.Tensor, rows: torch.Tensor, threshold: float):
    """The torch reference of :func:`gate_compact`."""
    confidence = max_probability(logits)
    go_on = confidence < threshold  # NaN compares false: such a row stops
    next_rows = torch.full_like(rows, -1)
    kept = rows[go_on]
    next_rows[: len(kept)] = kept
    return next_rows, torch.tensor(len(kept), dtype=torch.int64, device=rows.device), confidence


def gate_compact(logits: torch.Tensor, rows: torch.Tensor, threshold: float, *, backend: str | None = None):
    """Gate the active rows on their confidence and compact the ones that continue.

    Args:
        logits: ``[A, C]`` current logits of the A active rows (float32, float16 or
            bfloat16 on the fused backends; any float dtype on ``torch``).
        rows: ``[A]`` int64, the dataset row of each active row.
        threshold: θ in [0, 1]. A row stops when its max softmax probability is ≥ θ
            (θ = 0: every row stops; θ = 1: only rows whose probability is exactly 1).
        backend: ``"torch"``, ``"cpu"``, ``"triton"`` or ``"auto"`` (default).

    Returns:
        ``(next_rows, count, confidence)``: ``next_rows`` ``[A]`` int64 holds, first, the
        ``rows`` entries that continue in their input order, then −1; ``count`` a 0-d
        int64 tensor on the same device (no host synchronization); ``confidence`` the
        ``[A]`` float64 max probabilities the gate compared.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a [A, C] floating tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if logits.shape[1] < 1:
        raise ValueError("logits must have at least one class (C >= 1)")
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.int64 or rows.shape != (logits.shape[0],):
        raise ValueError(f"rows must be an int64 tensor of shape ({logits.shape[0]},) (one per row of logits), got "
                         f"{rows.dtype if isinstance(rows, torch.Tensor) else type(rows).__name__} "
                         f"{tuple(rows.shape) if isinstance(rows, torch.Tensor) else ''}")
    if rows.device != logits.device:
        raise ValueError(f"rows must be on the device of logits ({logits.device}), got {rows.device}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    implementation = dispatch.resolve("gate_compact", backend, logits.device, (logits.dtype,), tuple(logits.shape))
    return implementation(logits, rows, float(threshold))


def _cpu(logits, rows, threshold):
    return torch.ops.kdfast.gate_compact(logits, rows, threshold)


def _triton(logits, rows, threshold):
    return torch.ops.kdfast.gate_compact_triton(logits, rows, threshold)


dispatch.register("gate_compact", {"torch": gate_compact_reference, "cpu": _cpu, "triton": _triton})
