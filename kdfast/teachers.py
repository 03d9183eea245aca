"""Several teachers as one: the combination of their logits that every KD loss takes.

``combine_teachers(logits_list, weights=None, mode="logits", temperature=1.0)``:

* ``mode="logits"``: the weighted mean of the teachers' logits, ``Σ_k w_k t_k``;
* ``mode="probabilities"``: the weighted mean of their softened distributions
  ``q = Σ_k w_k softmax(t_k / τ)``, returned as logits ``τ · log q`` (so that
  ``softmax(result / τ) = q`` exactly; a loss must then use the same τ).

Weights default to uniform and are normalized to sum to 1.

:class:`TeacherEnsemble` runs K frozen teachers over a batch and combines their logits so;
the trainer and the cache builder use it for ``--teacher`` given more than once. A leaf
module: the losses, the trainer and the cache import it, it imports none of them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kdfast import _checks

__all__ = ["MODES", "TeacherEnsemble", "combine_teachers", "describe_teachers"]

MODES = ("logits", "probabilities")


def describe_teachers(names, mode: str | None = None, weights=None, temperature: float | None = None) -> str | None:
    """``resnet56`` for one teacher; ``resnet56 + wrn_40_2`` for several, followed, when
    ``mode`` is given, by their combination: ``(mean of their probabilities at τ = 4, weights
    1:3)`` (``uniform`` without weights; τ only for ``probabilities``). None without teachers."""
    if not names:
        return None
    text = " + ".join(names)
    if mode is None or len(names) == 1:
        return text
    at = f" at τ = {temperature:g}" if mode == "probabilities" and temperature is not None else ""
    shown = "uniform" if weights is None else "weights " + ":".join(f"{w:g}" for w in weights)
    return f"{text} (mean of their {mode}{at}, {shown})"


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


class TeacherEnsemble(nn.Module):
    """K frozen teachers as one: ``forward(images)`` gives the combined logits and the features.

    Each teacher runs once over the batch, under the caller's ``no_grad``/autocast, one after
    the other; their logits are combined by :func:`combine_teachers` (``weights``, ``mode``,
    ``temperature``). With one teacher, ``forward`` is that teacher's
    ``fc(forward_features(images))`` itself (no combination: bitwise a single-teacher run).

    Memory: all K teachers' weights stay on the device; under ``no_grad`` a teacher's
    activations are freed when its forward returns, so the activation peak is the largest
    single teacher's, plus K × ([B, C] logits + [B, D_k] features) kept for the combination.
    Time: the sum of the K forwards.

    Args:
        teachers: K ≥ 1 models of the zoo (``forward_features`` and ``fc``); put in eval mode
            and frozen here.
        weights, mode, temperature: as :func:`combine_teachers`.

    Attributes:
        feature_dim: the features' width: the teacher's, or for K > 1 the sum of the
            teachers' (their features concatenated, in order; what PESF-KD's adapter reads).
    """

    def __init__(self, teachers, weights=None, mode: str = "logits", temperature: float = 1.0):
        super().__init__()
        teachers = list(teachers)
        if not teachers:
            raise ValueError("teachers must hold at least one model")
        if mode not in MODES:
            raise ValueError(f"mode must be 'logits' or 'probabilities', got {mode!r}")
        if weights is not None and len(weights) != len(teachers):
            raise ValueError(f"weights must have one entry per teacher ({len(teachers)}), got {len(weights)}")
        self.teachers = nn.ModuleList(teacher.eval().requires_grad_(False) for teacher in teachers)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.mode = mode
        self.temperature = _checks.check_temperature("temperature", temperature)
        self.feature_dim = sum(teacher.feature_dim for teacher in teachers)
        self._feature_forwards = [teacher.forward_features for teacher in self.teachers]

    def train(self, mode: bool = True):
        """Teachers stay in eval mode (their BatchNorm statistics are frozen) whatever is asked."""
        return super().train(False)

    def compile_features(self, **options) -> None:
        """``torch.compile`` each teacher's feature extractor (the heads and the combination run eagerly)."""
        self._feature_forwards = [torch.compile(teacher.forward_features, **options) for teacher in self.teachers]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(combined logits [B, C], features [B, feature_dim]) of ``images``."""
        features = [forward(images) for forward in self._feature_forwards]
        logits = [teacher.fc(feature) for teacher, feature in zip(self.teachers, features)]
        if len(logits) == 1:
            return logits[0], features[0]
        combined = combine_teachers(logits, self.weights, self.mode, self.temperature)
        return combined, torch.cat(features, dim=1)
