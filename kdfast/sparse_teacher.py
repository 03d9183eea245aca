"""The sparse (cached) teacher: a row's top-k logits plus what the loss needs for the rest.

Every kdfast loss accepts a :class:`SparseTeacher` in place of dense teacher logits (the
offline teacher cache, :mod:`kdfast.cache`, yields one per batch); the fused backends
rebuild each row from it where they read the teacher, without a dense B×C teacher.

For a row with teacher logits ``t`` (C classes), the cache keeps the k largest logits
``v_j`` (their classes ``i_j``) and, for each stored temperature τ, the full row's
log-sum-exp ``L_τ = log Σ_c exp(t_c / τ)`` (fp32, from the unrounded logits).

**Uniform remainder.** At a stored τ the top-k probabilities are exact,
``q_j = exp(v_j/τ − L_τ)``, and the remaining mass ``r = 1 − Σ_j q_j`` is spread evenly
over the other C − k classes. :meth:`SparseTeacher.dense` writes this as one logit row:
``v_j`` at the top-k classes and the fill logit

    f = τ · (log(r / (C − k)) + L_τ)

elsewhere, so that ``softmax(dense / τ)`` gives exactly ``q_j`` on the top k and
``r / (C − k)`` on every other class (the row's partition function at τ is ``exp(L_τ)``
either way). Exact when k = C (the stored logits are returned, at any τ). For k < C only
the shape of the tail is approximated: with the tail's true probabilities ``q_c`` and
``q̄ = r/(C − k)``, a KD term ``KL(q ‖ p)`` changes by
``Σ_tail (q̄ log q̄ − q_c log q_c) − Σ_tail (q̄ − q_c) log p_c``, which is at most of the order
of ``r · log(C − k)`` and vanishes with the tail mass ``r``. Rounding of the stored values
(fp16: relative 2⁻¹¹) perturbs ``q_j`` by a relative ``|Δv_j| / τ``; when that rounding
makes ``Σ q_j ≥ 1``, ``r`` is clamped to the smallest positive float32 (the tail then has
practically no mass, and ``softmax(dense/τ)`` renormalizes the top k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["SparseTeacher"]

#: The remaining mass below which the tail is treated as empty (the smallest normal float32).
_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class SparseTeacher:
    """Top-k teacher logits of a batch and the log-sum-exp of each full row per temperature.

    Attributes:
        indices: [B, k] int64 class indices of the top-k logits (distinct within a row, in [0, C)).
        values: [B, k] float32 logits at those classes.
        log_sum_exp: [B, T] float32, ``log Σ_c exp(t_c / τ)`` of the full row for each
            temperature of ``temperatures``.
        temperatures: the T temperatures of ``log_sum_exp``'s columns.
        num_classes: C.

    Construction checks shapes, dtypes and the indices (in range, no duplicate in a row):
    ValueError naming the argument.
    """

    indices: torch.Tensor
    values: torch.Tensor
    log_sum_exp: torch.Tensor
    temperatures: tuple[float, ...]
    num_classes: int

    def __post_init__(self):
        indices, values, lse = self.indices, self.values, self.log_sum_exp
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {self.num_classes!r}")
        if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.dtype != torch.int64:
            raise ValueError(f"indices must be an int64 tensor [B, k], got "
                             f"{getattr(indices, 'dtype', type(indices).__name__)} {tuple(getattr(indices, 'shape', ()))}")
        batch, k = indices.shape
        if not 1 <= k <= self.num_classes:
            raise ValueError(f"indices must have 1 <= k <= num_classes={self.num_classes} columns, got k={k}")
        if not isinstance(values, torch.Tensor) or values.shape != indices.shape or not values.is_floating_point():
            raise ValueError(f"values must be a floating tensor of the indices' shape {tuple(indices.shape)}, got "
                             f"{getattr(values, 'dtype', type(values).__name__)} {tuple(getattr(values, 'shape', ()))}")
        temperatures = tuple(float(t) for t in self.temperatures)
        if not temperatures or not all(math.isfinite(t) and t > 0 for t in temperatures):
            raise ValueError(f"temperatures must be positive numbers, got {self.temperatures!r}")
        object.__setattr__(self, "temperatures", temperatures)
        if not isinstance(lse, torch.Tensor) or lse.shape != (batch, len(temperatures)) or not lse.is_floating_point():
            raise ValueError(f"log_sum_exp must be a floating tensor [B={batch}, T={len(temperatures)}], got "
                             f"{getattr(lse, 'dtype', type(lse).__name__)} {tuple(getattr(lse, 'shape', ()))}")
        if batch and (int(indices.min()) < 0 or int(indices.max()) >= self.num_classes):
            bad = ((indices < 0) | (indices >= self.num_classes)).nonzero()[0].tolist()
            raise ValueError(f"indices must be in [0, num_classes={self.num_classes}), got {int(indices[tuple(bad)])} "
                             f"at row {bad[0]}, column {bad[1]}")
        if batch and k > 1:
            ordered = indices.sort(dim=1).values
            repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
            if bool(repeated.any()):
                row = int(repeated.nonzero()[0, 0])
                raise ValueError(f"indices must be distinct within a row, got a duplicated class in row {row}: "
                                 f"{indices[row].tolist()}")

    @property
    def top_k(self) -> int:
        return self.indices.shape[1]

    @property
    def batch_size(self) -> int:
        return self.indices.shape[0]

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, device) -> "SparseTeacher":
        """The same teacher with its tensors on ``device`` (not checked again: on a GPU the
        index checks would cost a device sync every step)."""
        moved = object.__new__(SparseTeacher)
        for name, value in (("indices", self.indices.to(device)), ("values", self.values.to(device)),
                            ("log_sum_exp", self.log_sum_exp.to(device)), ("temperatures", self.temperatures),
                            ("num_classes", self.num_classes)):
            object.__setattr__(moved, name, value)
        return moved

    def temperature_column(self, temperature: float) -> int:
        """The column of ``log_sum_exp`` that holds ``temperature`` (ValueError when it is not stored)."""
        for column, stored in enumerate(self.temperatures):
            if math.isclose(stored, float(temperature), rel_tol=1e-6):
                return column
        raise ValueError(f"temperature {temperature:g} has no stored log-sum-exp (stored: "
                         f"{', '.join(f'{t:g}' for t in self.temperatures)}); with k={self.top_k} < C="
                         f"{self.num_classes} the remaining mass is only known at those (build the cache with "
                         f"--temperatures including {temperature:g})")

    def fill(self, temperature: float | None) -> torch.Tensor:
        """float32 [B]: the logit every class outside the top k gets.

        At a temperature, the uniform remainder's fill logit ``f`` (module doc). With
        ``temperature=None`` (the rank-only Spearman loss, which has none) the largest float32
        below the row's smallest stored logit: the other classes tie below the top k, whose
        ranks are exact. When k = C no class takes it (zeros)."""
        batch, k = self.indices.shape
        values = self.values.float()
        if k == self.num_classes:
            return torch.zeros(batch, dtype=torch.float32, device=values.device)
        if temperature is None:
            lowest = values.min(dim=1).values
            return torch.nextafter(lowest, torch.full_like(lowest, -math.inf))
        column = self.temperature_column(temperature)
        tau = self.temperatures[column]
        lse = self.log_sum_exp[:, column].double()
        kept = torch.exp(values.double() / tau - lse[:, None]).sum(dim=1)
        remaining = (1.0 - kept).clamp_min(_TINY)
        return (tau * (torch.log(remaining / (self.num_classes - k)) + lse)).float()

    def dense(self, temperature: float | None) -> torch.Tensor:
        """float32 [B, C] teacher logits: the stored top k and :meth:`fill` elsewhere, so that
        ``softmax(dense / temperature)`` has the exact top-k probabilities and the remaining
        mass spread evenly over the other classes (module doc).

        When k = C the stored logits themselves, exact at any temperature; otherwise
        ``temperature`` must be one of :attr:`temperatures` (or None: ranks only)."""
        batch, classes = self.batch_size, self.num_classes
        fill = self.fill(temperature if self.top_k < classes else None)
        return fill[:, None].expand(batch, classes).clone().scatter_(1, self.indices, self.values.float())

    def kernel_arguments(self, temperature: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the fused operators take for this teacher (their ``teacher``,
        ``teacher_indices`` and ``teacher_fill``): float32 values [B, k] and int32 indices
        [B, k], each row sorted by class (the GPU kernels find a class by binary search), and
        the float32 fill [B] of :meth:`fill`. The row they describe is :meth:`dense`'s."""
        indices, order = self.indices.sort(dim=1)
        values = self.values.float().gather(1, order)
        return values.contiguous(), indices.to(torch.int32).contiguous(), self.fill(temperature).contiguous()
