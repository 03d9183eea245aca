"""The ``torch`` backend: every kdfast loss written with plain PyTorch operations.

This is the reference that the fused backends are tested against, and the definition of
each loss in code (see DESIGN.md "Loss definitions" and the README). Gradients are those
of autograd through these expressions. Arguments are assumed valid: the public functions
in :mod:`kdfast.losses` check them first.

Arithmetic runs in float32 for fp16/bf16/fp32 inputs and in float64 when an input is
float64 (so that ``torch.autograd.gradcheck`` can run on it); the loss has that dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdfast.softrank import average_ranks, soft_rank
from kdfast.sparse_teacher import SparseTeacher

__all__ = ["kd_loss", "pearson_loss", "dist_loss", "spearman_loss", "cmkd_loss", "drkd_loss", "dkd_loss", "rectify",
           "pearson", "standardize_logits", "spearman_rows", "entropy_difficulty"]

#: Denominator floor of the Pearson correlation: ρ(a, b) = <a−ā, b−b̄> / max(‖a−ā‖‖b−b̄‖, 1e-8).
PEARSON_EPS = 1e-8


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def center(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x − mean(x)`` along ``dim``, exactly zero for a constant vector.

    The mean is taken of ``x − x_0`` (the first element), which is 0 exactly for a
    constant vector; the plain mean of n equal floats can miss them by an ulp.
    """
    shifted = x - x.narrow(dim, 0, 1)
    return shifted - shifted.mean(dim=dim, keepdim=True)


def pearson(a: torch.Tensor, b: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Pearson correlation of ``a`` and ``b`` along ``dim`` (0 for a constant vector, never NaN)."""
    a_c = center(a, dim)
    b_c = center(b, dim)
    covariance = (a_c * b_c).sum(dim=dim)
    norms = torch.linalg.vector_norm(a_c, dim=dim) * torch.linalg.vector_norm(b_c, dim=dim)
    return covariance / norms.clamp_min(PEARSON_EPS)


def standardize_rows(x: torch.Tensor) -> torch.Tensor:
    """Row-wise ``(x − mean) / std`` with the population std; a constant row becomes zeros.

    The zero-variance case is masked before the square root so that its gradient is 0,
    not NaN.
    """
    # Divided first by the row's largest |x − x_0| (a constant the result does not depend
    # on, so it carries no gradient): squaring logits of 1e20 would overflow float32 and
    # standardize a varying row to zeros.
    shifted = x - x[:, :1]
    scale = shifted.detach().abs().amax(dim=1, keepdim=True)
    x_c = center(shifted / torch.where(scale > 0, scale, torch.ones_like(scale)), dim=1)
    variance = (x_c * x_c).mean(dim=1, keepdim=True)
    varying = variance > 0
    std = torch.where(varying, variance, torch.ones_like(variance)).sqrt()
    return torch.where(varying, x_c / std, torch.zeros_like(x_c))


def upcast(student, teacher, temperature=None):
    """Both logits in the compute dtype. Each loss upcasts once, at its entry, so that the
    gradients of all its terms accumulate in that dtype and are rounded to the input's
    dtype only once. A :class:`~kdfast.sparse_teacher.SparseTeacher` becomes its dense
    row at ``temperature`` (None: the rank-only Spearman loss), the row the fused
    backends rebuild."""
    if isinstance(teacher, SparseTeacher):
        teacher = teacher.dense(temperature)
    dtype = compute_dtype(student, teacher)
    return student.to(dtype), teacher.to(dtype)


def _log_probs(student, teacher, temperature):
    return F.log_softmax(student / temperature, dim=1), F.log_softmax(teacher / temperature, dim=1)


#: Added to the unbiased standard deviation by logit standardization (the authors' code).
STANDARDIZE_EPS = 1e-7


def standardize_logits(x: torch.Tensor) -> torch.Tensor:
    """Logit standardization (Sun et al., CVPR 2024): each row as ``(x − mean) / (std + 1e-7)``
    with the unbiased std, as the authors' code computes it; differentiable. A constant row
    becomes zeros; there the std, whose gradient is undefined (0/0), passes none."""
    centered = x - x.mean(dim=1, keepdim=True)
    variance = (centered * centered).sum(dim=1, keepdim=True) / (x.shape[1] - 1)
    positive = variance > 0
    std = torch.where(positive, torch.where(positive, variance, torch.ones_like(variance)).sqrt(),
                      torch.zeros_like(variance))
    return centered / (std + STANDARDIZE_EPS)


def _standardized(student, teacher, standardize: bool):
    """The logits the KL and correlation terms see: standardized rows when asked."""
    if not standardize:
        return student, teacher
    return standardize_logits(student), standardize_logits(teacher)


def _kl_rows(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    # KL(q ‖ p) per row from log-probabilities: an underflowed q_c = 0 contributes
    # 0 · finite = 0 (log_softmax stays finite), and a class the teacher masks out (a −inf
    # logit, probability exactly 0) contributes 0, never 0 · (−inf) = NaN; where q_c > 0 and
    # the student's p_c = 0 the loss is +inf, as KL is. KL ≥ 0, but at a large temperature
    # rounding can take a near-zero row below it: the value is clamped at 0 (every backend
    # does), the gradient stays the unclamped one's (kl − kl.detach() is 0 in value; an
    # infinite or NaN row is left as it is, where the same trick would give inf − inf = NaN).
    kl = _xlogy_terms(log_q, log_q - log_p).sum(dim=1)
    return torch.where(kl < 0, kl - kl.detach(), kl)


def _xlogy_terms(log_q: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """q · factor, 0 where q = 0 exactly (log q = −inf), with a gradient that stays finite
    there (the unselected branch is evaluated at log q = 0, not at −inf)."""
    present = log_q > -math.inf
    safe_log_q = torch.where(present, log_q, torch.zeros_like(log_q))
    safe_factor = torch.where(present, factor, torch.zeros_like(factor))
    return torch.where(present, safe_log_q.exp() * safe_factor, torch.zeros_like(log_q))


def kd_loss(student, teacher, temperature, standardize=False):
    log_p, log_q = _log_probs(*_standardized(*upcast(student, teacher, temperature), standardize), temperature)
    return temperature**2 * _kl_rows(log_q, log_p).mean()


def pearson_loss(student, teacher, temperature, dim):
    log_p, log_q = _log_probs(*upcast(student, teacher, temperature), temperature)
    rho = pearson(log_p.exp(), log_q.exp(), dim=dim)
    return temperature**2 * (1.0 - rho.mean())


def dist_loss(student, teacher, temperature, beta, gamma, standardize=False):
    log_p, log_q = _log_probs(*_standardized(*upcast(student, teacher, temperature), standardize), temperature)
    p, q = log_p.exp(), log_q.exp()
    loss = p.new_zeros(())
    if beta != 0:
        loss = loss + beta * temperature**2 * (1.0 - pearson(p, q, dim=1).mean())
    if gamma != 0:
        loss = loss + gamma * temperature**2 * (1.0 - pearson(p, q, dim=0).mean())
    return loss


def spearman_rows(student, teacher, regularization_strength):
    """ρ_S per row: soft ranks of the standardized student logits vs the teacher's average ranks."""
    student_ranks = soft_rank(standardize_rows(student), "l2", regularization_strength)
    return pearson(student_ranks, average_ranks(teacher), dim=1)


def spearman_loss(student, teacher, regularization_strength):
    return 1.0 - spearman_rows(*upcast(student, teacher), regularization_strength).mean()


def entropy_difficulty(teacher, temperature):
    """d_i = H(softmax(t_i/τ)) / log C in [0, 1], without gradient."""
    with torch.no_grad():
        log_q = F.log_softmax(teacher / temperature, dim=1)
        entropy = -_xlogy_terms(log_q, log_q).sum(dim=1)
        return (entropy / math.log(teacher.shape[1])).clamp(0.0, 1.0)


def cmkd_loss(student, teacher, target, temperature, kl_weight, corr_weight, ce_weight, difficulty,
              regularization_strength, standardize=False):
    """CMKD; ``difficulty`` is the per-sample weight d: a float, a [B] tensor, or None for entropy."""
    student, teacher = upcast(student, teacher, temperature)
    z_s, z_t = _standardized(student, teacher, standardize)  # the CE term keeps the raw logits
    log_p, log_q = _log_probs(z_s, z_t, temperature)
    loss = kl_weight * temperature**2 * _kl_rows(log_q, log_p).mean()
    if corr_weight != 0:
        if difficulty is None:
            difficulty = entropy_difficulty(z_t, temperature)
        elif isinstance(difficulty, torch.Tensor):
            difficulty = difficulty.detach().to(log_p.dtype)
        rho = pearson(log_p.exp(), log_q.exp(), dim=1)
        rho_s = spearman_rows(z_s, z_t, regularization_strength)
        per_sample = (1.0 - difficulty) * (1.0 - rho) + difficulty * (1.0 - rho_s)
        loss = loss + corr_weight * temperature**2 * per_sample.mean()
    if target is not None and ce_weight != 0:
        loss = loss + ce_weight * F.cross_entropy(student, target)
    return loss


def rectify(teacher, target):
    """Swap, in each row whose argmax is not the target, the max logit with the target's logit."""
    batch, num_classes = teacher.shape
    argmax = teacher.argmax(dim=1)
    target = target.long()
    permutation = torch.arange(num_classes, device=teacher.device).expand(batch, -1).clone()
    rows = torch.arange(batch, device=teacher.device)
    # Rows whose argmax is the target get the identity twice; the others a transposition.
    permutation[rows, target] = argmax
    permutation[rows, argmax] = target
    return teacher.gather(1, permutation)


def drkd_loss(student, teacher, target, temperature, ce_weight, standardize=False):
    student, teacher = upcast(student, teacher, temperature)
    # Standardization commutes with the rectifying permutation; CE keeps the raw logits.
    loss = kd_loss(student, rectify(teacher, target), temperature, standardize)
    if ce_weight != 0:
        loss = loss + ce_weight * F.cross_entropy(student, target)
    return loss


def _log_non_target(log_probs: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """log(1 − prob of the target) per row [B, 1], as the log-sum-exp of the other classes'
    log-probabilities (no cancellation when the target holds almost all the mass)."""
    return log_probs.masked_fill(target_mask, -math.inf).logsumexp(dim=1, keepdim=True)


def dkd_loss(student, teacher, target, alpha, beta, temperature, standardize=False):
    """DKD (Zhao et al., CVPR 2022), exactly: TCKD on the binary target / non-target split,
    NCKD on the non-target classes renormalized (the target removed, not pushed down by the
    authors' −1000), ``τ² (1/B) Σ_i (α TCKD_i + β NCKD_i)``."""
    student, teacher = upcast(student, teacher, temperature)
    log_p, log_q = _log_probs(*_standardized(student, teacher, standardize), temperature)
    target_mask = F.one_hot(target.long(), log_p.shape[1]).bool()
    index = target.long()[:, None]
    log_p_rest, log_q_rest = _log_non_target(log_p, target_mask), _log_non_target(log_q, target_mask)
    binary_p = torch.cat([log_p.gather(1, index), log_p_rest], dim=1)
    binary_q = torch.cat([log_q.gather(1, index), log_q_rest], dim=1)
    tckd = _kl_rows(binary_q, binary_p)
    # log p̃_j = log p_j − log(1 − p_y) over j ≠ y; the target's entry is −inf (probability 0).
    nckd = _kl_rows((log_q - log_q_rest).masked_fill(target_mask, -math.inf),
                    (log_p - log_p_rest).masked_fill(target_mask, -math.inf))
    return temperature**2 * (alpha * tckd + beta * nckd).mean()
