"""Several teachers as one: the combination of their logits that every KD loss takes.

``combine_teachers(logits_list, weights=None, mode="logits", temperature=1.0)``:

* ``mode="logits"``: the weighted mean of the teachers' logits, ``Σ_k w_k t_k``;
* ``mode="probabilities"``: the weighted mean of their softened distributions
  ``q = Σ_k w_k softmax(t_k / τ)``, returned as logits ``τ · log q`` (so that
  ``softmax(result / τ) = q`` exactly; a loss must then use the same τ).

Weights default to uniform and are normalized to sum to 1. A leaf module: the losses and
the trainer import it, it imports neither.
"""

from __future__ import annotations

import math

import torch

from kdfast import _checks

MODES = ("logits", "probabilities")


def combine_teachers(logits_list, weights=None, mode: str = "logits", temperature: float = 1.0) -> torch.Tensor:
    """The teachers' combined logits [B, C] (see the module doc).

    Args:
        logits_list: a sequence of K ≥ 1 teacher logit tensors [B, C], one shape, dtype and device.
        weights: K non-negative numbers, not all 0 (normalized); None: uniform.
        mode: ``"logits"`` or ``"probabilities"``.
        temperature: τ of the ``"probabilities"`` mode (ignored by ``"logits"``).

    Returns:
        [B, C] logits in the teachers' dtype (computed in fp32, or fp64 for fp64 inputs).
        Differentiable with respect to every teacher.
    """
    if isinstance(logits_list, torch.Tensor) or not isinstance(logits_list, (list, tuple)) or not logits_list:
        raise ValueError("logits_list must be a non-empty list of [B, C] teacher logit tensors")
    for index, logits in enumerate(logits_list):
        _checks.check_logits(f"logits_list[{index}]", logits)
        first = logits_list[0]
        if logits.shape != first.shape or logits.dtype != first.dtype or logits.device != first.device:
            raise ValueError(f"logits_list[{index}] must match logits_list[0] ({tuple(first.shape)}, {first.dtype}, "
                             f"{first.device}), got ({tuple(logits.shape)}, {logits.dtype}, {logits.device})")
    if mode not in MODES:
        raise ValueError(f"mode must be 'logits' or 'probabilities', got {mode!r}")
    count = len(logits_list)
    if weights is None:
        weights = [1.0] * count
    weights = [_checks.check_nonnegative(f"weights[{i}]", w) for i, w in enumerate(weights)]
    if len(weights) != count:
        raise ValueError(f"weights must have one entry per teacher ({count}), got {len(weights)}")
    total = math.fsum(weights)
    if total == 0:
        raise ValueError("weights must not all be 0")
    weights = [w / total for w in weights]
    compute = torch.float64 if first.dtype == torch.float64 else torch.float32
    if count == 1:
        return logits_list[0]
    if mode == "logits":
        combined = sum(w * t.to(compute) for w, t in zip(weights, logits_list))
        return combined.to(first.dtype)
    temperature = _checks.check_temperature("temperature", temperature)
    # log Σ_k w_k softmax(t_k/τ), as a log-sum-exp over the teachers (no underflow, no log 0
    # unless every teacher gives a class probability 0); weight-0 teachers drop out.
    terms = [torch.log_softmax(t.to(compute) / temperature, dim=1) + math.log(w)
             for w, t in zip(weights, logits_list) if w > 0]
    return (temperature * torch.logsumexp(torch.stack(terms), dim=0)).to(first.dtype)
