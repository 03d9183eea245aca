"""Differentiable soft ranks and soft sorts, and exact average ranks.

Soft ranks and sorts are projections onto the permutahedron (Blondel et al., "Fast
Differentiable Sorting and Ranking", ICML 2020), computed by a sort and the
pool-adjacent-violators isotonic regression of ``kdfast._C``. The conventions are those of
``torchsort``: 2-D input, along the last dimension, ascending ranks (the smallest value
gets rank ~1, the largest ~n), ascending sorted values.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kdfast import _checks, _ops

__all__ = ["soft_rank", "soft_sort", "average_ranks"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # fp16/bf16 are upcast: soft ranks need more resolution than half precision offers.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _descending_weights(like: torch.Tensor) -> torch.Tensor:
    """The ranks n, n-1, ..., 1 broadcast to ``like``'s shape (the permutahedron's vertex)."""
    n = like.shape[1]
    return torch.arange(n, 0, -1, dtype=like.dtype, device=like.device).expand_as(like)


def _unsort(sorted_values: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """Inverse of ``gather(1, permutation)``: puts sorted values back at their positions."""
    return torch.empty_like(sorted_values).scatter_(1, permutation, sorted_values)


class _SoftRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, regularization, strength):
        dtype = _compute_dtype(x)
        theta = x.to(dtype) / strength
        s, permutation = theta.sort(dim=1, descending=True, stable=True)
        w = _descending_weights(s)
        if regularization == "l2":
            dual = _ops.isotonic(s, w, "l2")
            ranks_sorted = s - dual
        else:
            dual = _ops.isotonic(s, w.log(), "kl")
            ranks_sorted = torch.exp(s - dual)
        ctx.regularization = regularization
        ctx.strength = strength
        ctx.save_for_backward(s, dual, permutation, ranks_sorted if regularization == "kl" else None)
        return _unsort(ranks_sorted, permutation).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        s, dual, permutation, ranks_sorted = ctx.saved_tensors
        g = grad_output.to(s.dtype).gather(1, permutation)
        if ctx.regularization == "kl":
            g = g * ranks_sorted  # d exp(u)/du
        grad_sorted = g - _ops.isotonic_vjp(dual, s, g, ctx.regularization)
        grad = _unsort(grad_sorted, permutation) / ctx.strength
        return grad.to(grad_output.dtype), None, None


class _SoftSort(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, regularization, strength):
        dtype = _compute_dtype(x)
        # Sorting -x in descending order gives the ascending order of x.
        s, permutation = (-x.to(dtype)).sort(dim=1, descending=True, stable=True)
        w = _descending_weights(s) / strength
        sol = _ops.isotonic(w, s, regularization)
        ctx.regularization = regularization
        ctx.save_for_backward(s, sol, permutation)
        return (sol - w).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        s, sol, permutation = ctx.saved_tensors
        grad_sorted = _ops.isotonic_vjp(sol, s, grad_output.to(s.dtype).contiguous(), ctx.regularization)
        return _unsort(grad_sorted, permutation).to(grad_output.dtype), None, None


def _check_soft_input(values, regularization, regularization_strength, check_finite):
    _checks.check_logits("values", values)
    _checks.check_regularization(regularization)
    strength = _checks.check_positive("regularization_strength", regularization_strength)
    if check_finite:
        _checks.check_finite(values=values)
    return strength


def soft_rank(
    values: torch.Tensor,
    regularization: str = "l2",
    regularization_strength: float = 1.0,
    *,
    check_finite: bool = False,
) -> torch.Tensor:
    """Differentiable ranks of each row of ``values``.

    Args:
        values: ``[B, n]`` floating tensor (fp16/bf16 are computed in fp32).
        regularization: ``"l2"`` (Euclidean projection) or ``"kl"`` (entropic).
        regularization_strength: ε > 0. Ranks of ``values / ε`` are projected onto the
            permutahedron; as ε → 0 they tend to the hard ranks with ties averaged
            (``scipy.stats.rankdata``), as ε grows they flatten towards the mean rank.
        check_finite: raise ``ValueError`` if ``values`` holds NaN/Inf (one device sync).

    Returns:
        ``[B, n]`` tensor of ``values``' dtype: ascending soft ranks in [1, n]
        (the smallest entry of a row gets ~1, the largest ~n).
    """
    strength = _check_soft_input(values, regularization, regularization_strength, check_finite)
    return _SoftRank.apply(values, regularization, strength)


def soft_sort(
    values: torch.Tensor,
    regularization: str = "l2",
    regularization_strength: float = 1.0,
    *,
    check_finite: bool = False,
) -> torch.Tensor:
    """Differentiable ascending sort of each row of ``values``.

    Args:
        values: ``[B, n]`` floating tensor (fp16/bf16 are computed in fp32).
        regularization: ``"l2"`` or ``"kl"``.
        regularization_strength: ε > 0; as ε → 0 the result tends to ``values.sort(1)``.
        check_finite: raise ``ValueError`` if ``values`` holds NaN/Inf (one device sync).

    Returns:
        ``[B, n]`` tensor of ``values``' dtype, each row sorted ascending (softly).
    """
    strength = _check_soft_input(values, regularization, regularization_strength, check_finite)
    return _SoftSort.apply(values, regularization, strength)


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Hard ascending ranks 1..n of each row, ties sharing their average rank.

    The same as ``scipy.stats.rankdata(row, method="average")`` for every row; not
    differentiable (the result is returned without a graph). ``[B, n]`` in, ``[B, n]``
    out, in ``values``' compute dtype (fp32, or fp64 for fp64 input).
    """
    with torch.no_grad():
        x = values.detach().to(_compute_dtype(values))
        sorted_x, permutation = x.sort(dim=1, stable=True)
        n = x.shape[1]
        positions = torch.arange(1, n + 1, dtype=x.dtype, device=x.device).expand_as(x)
        # Consecutive equal values form one tie group; each gets the mean of its positions.
        new_group = torch.ones_like(sorted_x, dtype=torch.long)
        new_group[:, 1:] = (sorted_x[:, 1:] != sorted_x[:, :-1]).long()
        group = new_group.cumsum(dim=1) - 1
        mean_position = torch.zeros_like(x).scatter_reduce(1, group, positions, reduce="mean", include_self=False)
        return _unsort(mean_position.gather(1, group), permutation)
