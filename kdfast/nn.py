"""``torch.nn`` modules around kdfast's losses, and PESF-KD's teacher adapter.

Each loss module stores its hyperparameters (checked at construction) and its forward
is one call of the functional loss in :mod:`kdfast.losses`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdfast import _checks, losses

__all__ = ["CMKDLoss", "DISTLoss", "DKDLoss", "DRKDLoss", "KDLoss", "TeacherAdapter"]


class KDLoss(nn.Module):
    """Hinton KD loss module; ``forward(student, teacher)`` is :func:`kdfast.kd_loss`."""

    def __init__(self, temperature: float = 4.0, *, standardize: bool = False, backend: str | None = None,
                 check_finite: bool = False):
        super().__init__()
        self.temperature = _checks.check_temperature("temperature", temperature)
        self.standardize = _checks.check_bool("standardize", standardize)
        self.backend = backend
        self.check_finite = check_finite

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return losses.kd_loss(student, teacher, self.temperature, standardize=self.standardize, backend=self.backend,
                              check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, standardize={self.standardize}"


class DISTLoss(nn.Module):
    """DIST loss module; ``forward(student, teacher)`` is :func:`kdfast.dist_loss`."""

    def __init__(self, temperature: float = 1.0, beta: float = 1.0, gamma: float = 1.0, *,
                 standardize: bool = False, backend: str | None = None, check_finite: bool = False):
        super().__init__()
        self.temperature = _checks.check_temperature("temperature", temperature)
        self.beta = _checks.check_nonnegative("beta", beta)
        self.gamma = _checks.check_nonnegative("gamma", gamma)
        self.standardize = _checks.check_bool("standardize", standardize)
        self.backend = backend
        self.check_finite = check_finite

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return losses.dist_loss(student, teacher, self.temperature, self.beta, self.gamma,
                                standardize=self.standardize, backend=self.backend, check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, beta={self.beta}, gamma={self.gamma}, "
                f"standardize={self.standardize}")


class CMKDLoss(nn.Module):
    """CMKD loss module; ``forward(student, teacher, target=None)`` is :func:`kdfast.cmkd_loss`.

    ``weighting`` is ``"entropy"`` or ``"fixed"`` here; pass a per-sample ``[B]`` tensor
    to ``forward(..., weighting=w)`` to override it for one batch.
    """

    def __init__(self, temperature: float = 4.0, kl_weight: float = 1.0, corr_weight: float = 1.0,
                 ce_weight: float = 1.0, weighting: str = "entropy", regularization_strength: float | None = None,
                 *, standardize: bool = False, backend: str | None = None, check_finite: bool = False):
        super().__init__()
        self.temperature = _checks.check_temperature("temperature", temperature)
        self.kl_weight = _checks.check_nonnegative("kl_weight", kl_weight)
        self.corr_weight = _checks.check_nonnegative("corr_weight", corr_weight)
        self.ce_weight = _checks.check_nonnegative("ce_weight", ce_weight)
        if weighting not in losses.WEIGHTINGS:
            raise ValueError(f"weighting must be 'entropy' or 'fixed' (pass tensors to forward), got {weighting!r}")
        self.weighting = weighting
        if regularization_strength is not None:
            _checks.check_positive("regularization_strength", regularization_strength)
        self.regularization_strength = regularization_strength
        self.standardize = _checks.check_bool("standardize", standardize)
        self.backend = backend
        self.check_finite = check_finite

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None,
                weighting: torch.Tensor | None = None) -> torch.Tensor:
        return losses.cmkd_loss(
            student, teacher, target, self.temperature, self.kl_weight, self.corr_weight, self.ce_weight,
            self.weighting if weighting is None else weighting, self.regularization_strength,
            standardize=self.standardize, backend=self.backend, check_finite=self.check_finite,
        )

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, kl_weight={self.kl_weight}, corr_weight={self.corr_weight}, "
                f"ce_weight={self.ce_weight}, weighting={self.weighting!r}, standardize={self.standardize}")


class DRKDLoss(nn.Module):
    """DR-KD loss module; ``forward(student, teacher, target)`` is :func:`kdfast.drkd_loss`."""

    def __init__(self, temperature: float = 4.0, ce_weight: float = 0.0, *, standardize: bool = False,
                 backend: str | None = None, check_finite: bool = False):
        super().__init__()
        self.temperature = _checks.check_temperature("temperature", temperature)
        self.ce_weight = _checks.check_nonnegative("ce_weight", ce_weight)
        self.standardize = _checks.check_bool("standardize", standardize)
        self.backend = backend
        self.check_finite = check_finite

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return losses.drkd_loss(student, teacher, target, self.temperature, self.ce_weight,
                                standardize=self.standardize, backend=self.backend, check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, ce_weight={self.ce_weight}, standardize={self.standardize}"


class DKDLoss(nn.Module):
    """DKD loss module; ``forward(student, teacher, target)`` is :func:`kdfast.dkd_loss`."""

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, *, standardize: bool = False,
                 backend: str | None = None, check_finite: bool = False):
        super().__init__()
        self.alpha = _checks.check_nonnegative("alpha", alpha)
        self.beta = _checks.check_nonnegative("beta", beta)
        self.temperature = _checks.check_temperature("temperature", temperature)
        self.standardize = _checks.check_bool("standardize", standardize)
        self.backend = backend
        self.check_finite = check_finite

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return losses.dkd_loss(student, teacher, target, self.alpha, self.beta, self.temperature,
                               standardize=self.standardize, backend=self.backend, check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, "
                f"standardize={self.standardize}")


class TeacherAdapter(nn.Module):
    """PESF-KD teacher adapter: ``t' = t + a(h)`` with a small MLP ``a`` on the teacher feature.

    (Rao et al.: "Parameter-Efficient and Student-Friendly Knowledge Distillation", 2022.)
    The teacher backbone stays frozen; only the adapter trains, with
    :meth:`adapter_loss`, so that the teacher's outputs become easier for the student to
    match. The adapter's last layer is zero-initialized, so ``t'`` starts exactly as ``t``.

    Args:
        feature_dim: D, size of the teacher's pooled penultimate feature ``h`` [B, D].
        num_classes: C.
        hidden_dim: width of the MLP's hidden layer (default: D).
        temperature: τ of the adapter's distillation term.
        rectify: whether :meth:`student_targets` rectifies (DR-KD) the adapted logits.
    """

    def __init__(self, feature_dim: int, num_classes: int, hidden_dim: int | None = None,
                 temperature: float = 4.0, rectify: bool = False, *, backend: str | None = None):
        super().__init__()
        for name, value in (("feature_dim", feature_dim), ("num_classes", num_classes),
                            ("hidden_dim", feature_dim if hidden_dim is None else hidden_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        hidden_dim = feature_dim if hidden_dim is None else hidden_dim
        self.temperature = _checks.check_temperature("temperature", temperature)
        self.rectify = bool(rectify)
        self.backend = backend
        self.mlp = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, num_classes))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, teacher_logits: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        """Adapted logits ``t + a(h)``: ``[B, C]`` logits and ``[B, D]`` features in, ``[B, C]`` out."""
        _checks.check_logits("teacher_logits", teacher_logits)
        _checks.check_logits("teacher_features", teacher_features)
        if teacher_features.shape[0] != teacher_logits.shape[0]:
            raise ValueError(f"teacher_features must have {teacher_logits.shape[0]} rows like teacher_logits, "
                             f"got {teacher_features.shape[0]}")
        if teacher_features.shape[1] != self.mlp[0].in_features:
            raise ValueError(f"teacher_features must have {self.mlp[0].in_features} columns (feature_dim), "
                             f"got {teacher_features.shape[1]}")
        if teacher_logits.shape[1] != self.mlp[-1].out_features:
            raise ValueError(f"teacher_logits must have {self.mlp[-1].out_features} columns (num_classes), "
                             f"got {teacher_logits.shape[1]}")
        # The frozen teacher's outputs carry no graph; only the adapter's branch trains.
        return teacher_logits.detach() + self.mlp(teacher_features.detach()).to(teacher_logits.dtype)

    def adapter_loss(self, adapted_logits: torch.Tensor, student_logits: torch.Tensor,
                     target: torch.Tensor) -> torch.Tensor:
        """``CE(t', y) + τ² · KL(softmax(t'/τ) ‖ stopgrad(softmax(s/τ)))``: trains the adapter only."""
        kd = losses.kd_loss(student_logits.detach(), adapted_logits, self.temperature, backend=self.backend)
        _checks.check_targets(target, adapted_logits.shape[0], adapted_logits.shape[1], adapted_logits.device)
        return F.cross_entropy(adapted_logits.to(kd.dtype), target.long()) + kd

    def student_targets(self, adapted_logits: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher logits the student learns from: ``stopgrad(t')``, rectified if enabled."""
        teacher = adapted_logits.detach()
        if self.rectify:
            if target is None:
                raise ValueError("target is required when the adapter rectifies (rectify=True)")
            teacher = losses.rectify(teacher, target)
        return teacher

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, rectify={self.rectify}"
