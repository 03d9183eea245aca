"""Public KD losses: argument checks, then dispatch to a backend (see :mod:`kdfast.dispatch`).

Notation (DESIGN.md "Loss definitions"): ``s``, ``t`` student and teacher logits [B, C];
``y`` integer targets [B]; ``τ`` the temperature; ``p = softmax(s/τ)``, ``q = softmax(t/τ)``
row-wise; ``ρ(a, b) = <a−ā, b−b̄> / max(‖a−ā‖·‖b−b̄‖, 1e-8)`` the Pearson correlation.

Every loss returns a scalar tensor (float32, or float64 when an input is float64), is
differentiable with respect to the student logits and, when they require grad, the
teacher logits, and accepts:

* ``backend``: ``None`` (``$KDFAST_BACKEND``, else ``"auto"``), ``"auto"``, ``"torch"``,
  ``"cpu"``, ``"triton"`` or ``"cuda"``;
* a :class:`~kdfast.sparse_teacher.SparseTeacher` (the offline teacher cache's top-k
  logits) in place of ``teacher`` (not for :func:`rectify`): every backend computes the loss
  on its dense row (:meth:`~kdfast.sparse_teacher.SparseTeacher.dense`: exact when k = C,
  otherwise the top-k probabilities exact and the remaining mass spread evenly, at the
  loss's temperature, which the cache must have stored; the rank-only
  :func:`spearman_loss` ties the other classes below the top k). The fused backends rebuild
  each row where they read it; no dense teacher is made. It takes no gradient;
* ``check_finite``: when True, raise ``ValueError`` if an input holds NaN/Inf instead of
  returning NaN, and check the targets' range on the host (off by default: on a GPU these
  checks cost a device sync; without them an out-of-range target on a GPU trips a
  device-side assertion, as in ``torch.nn.functional.cross_entropy``).
"""

from __future__ import annotations

import torch

from kdfast import _checks, reference
from kdfast.dispatch import resolve
from kdfast.sparse_teacher import SparseTeacher

__all__ = ["kd_loss", "pearson_loss", "dist_loss", "spearman_loss", "cmkd_loss", "drkd_loss", "dkd_loss", "rectify",
           "default_spearman_strength", "SPEARMAN_STRENGTH_SCALE", "WEIGHTINGS"]

#: The default regularization strength of the Spearman terms' soft ranks is
#: ε = SPEARMAN_STRENGTH_SCALE / C, applied to the row-standardized student logits.
#: It must shrink like 1/C: C standardized values lie about 2.5/C apart, and once ε is
#: much larger than that gap the projection onto the permutahedron becomes an affine map
#: of its input, so a fixed ε turns the "Spearman" term into a Pearson term as C grows.
#: At 2/C about three quarters of the soft ranks carry a gradient while the soft Spearman
#: correlation stays within ~0.003 of the hard one for C >= 100 (README, "Choice of ε";
#: tested in tests/test_spearman.py).
SPEARMAN_STRENGTH_SCALE = 2.0


def default_spearman_strength(num_classes: int) -> float:
    """The default ε of :func:`spearman_loss` and :func:`cmkd_loss` for C classes: ``2 / C``."""
    return SPEARMAN_STRENGTH_SCALE / num_classes


WEIGHTINGS = ("entropy", "fixed")


_NO_TEMPERATURE = object()  # the losses without one (a None temperature is a user's mistake)


def _prepare(student, teacher, target=None, check_finite=False, *, temperature=_NO_TEMPERATURE):
    """Checks shared by all losses; returns the checked temperature (None when the loss has none)."""
    if isinstance(teacher, SparseTeacher):
        _check_sparse_teacher(student, teacher, None if temperature is _NO_TEMPERATURE else temperature,
                              check_finite)
        teacher = student  # the pair checks below then see the student's own shape
    _checks.check_pair(student, teacher)
    if target is not None:
        _checks.check_targets(target, student.shape[0], student.shape[1], student.device, exact=check_finite)
    if check_finite:
        _checks.check_finite(student=student, teacher=teacher)
    return None if temperature is _NO_TEMPERATURE else _checks.check_temperature("temperature", temperature)


def _check_sparse_teacher(student, teacher: SparseTeacher, temperature, check_finite: bool) -> None:
    """A sparse (cached) teacher must describe the student's batch and classes, on its device,
    without a gradient, and (k < C) know the remaining mass at the loss's temperature."""
    _checks.check_logits("student", student)
    batch, classes = student.shape
    if (teacher.batch_size, teacher.num_classes) != (batch, classes):
        raise ValueError(f"teacher (a SparseTeacher) must describe the student's {batch} rows and {classes} classes, "
                         f"got {teacher.batch_size} rows and {teacher.num_classes} classes")
    if teacher.device != student.device:
        raise ValueError(f"teacher (a SparseTeacher) must be on the student's device {student.device}, got "
                         f"{teacher.device} (SparseTeacher.to(device) moves it)")
    if teacher.values.requires_grad:
        raise ValueError("teacher (a SparseTeacher) cannot take a gradient: its values must not require grad")
    if temperature is not None and teacher.top_k < classes:
        teacher.temperature_column(temperature)  # ValueError naming the stored temperatures
    if check_finite:
        _checks.check_finite(**{"teacher values": teacher.values, "teacher log_sum_exp": teacher.log_sum_exp})


def _class_indices(target):
    """Targets of any integer dtype as the int64 indices every backend indexes with."""
    return None if target is None else target.long()


def _run(op, backend, student, teacher, *args):
    """Runs ``op`` of the backend chosen for these logits' device and dtypes (a sparse
    teacher's are float32)."""
    teacher_dtype = torch.float32 if isinstance(teacher, SparseTeacher) else teacher.dtype
    implementation = resolve(op, backend, student.device, (student.dtype, teacher_dtype), tuple(student.shape))
    return implementation(student, teacher, *args)


def _spearman_strength(regularization_strength, num_classes: int) -> float:
    if regularization_strength is None:
        return default_spearman_strength(num_classes)
    return _checks.check_positive("regularization_strength", regularization_strength)


def kd_loss(student, teacher, temperature=4.0, *, standardize=False, backend=None, check_finite=False):
    """Hinton KD loss: ``τ² · (1/B) Σ_i KL(q_i ‖ p_i)``.

    Args:
        student: ``[B, C]`` student logits (fp16, bf16, fp32 or fp64).
        teacher: ``[B, C]`` teacher logits, same shape and device.
        temperature: τ in (0, 100] (default 4.0).
        standardize: logit standardization (Sun et al., CVPR 2024): each row of both
            logits becomes ``(z − mean) / (std + 1e-7)`` (unbiased std) before the
            temperature; needs C ≥ 2. Gradients flow through it.

    Returns:
        Scalar loss. (Hinton, Vinyals, Dean: "Distilling the Knowledge in a Neural
        Network", 2015.)
    """
    temperature = _prepare(student, teacher, check_finite=check_finite, temperature=temperature)
    standardize = _standardize_option(standardize, student, teacher)
    return _run("kd_loss", backend, student, teacher, temperature, standardize)


def pearson_loss(student, teacher, temperature=1.0, dim=1, *, backend=None, check_finite=False):
    """Pearson-correlation loss of the softened probabilities: ``τ² · (1 − mean ρ(p, q))``.

    Args:
        student, teacher: ``[B, C]`` logits.
        temperature: τ in (0, 100] (default 1.0).
        dim: 1 correlates each row (over classes, needs C ≥ 2); 0 correlates each
            column (over the batch, needs B ≥ 2). The softmax is always over classes.

    Returns:
        Scalar loss; with ``dim=1`` it is DIST's inter-class term, with ``dim=0`` its
        intra-class term.
    """
    temperature = _prepare(student, teacher, check_finite=check_finite, temperature=temperature)
    if isinstance(dim, bool) or dim not in (0, 1, -1, -2):
        raise ValueError(f"dim must be 1 (per row) or 0 (per column), got {dim!r}")
    dim = dim % 2
    what = "classes (dim=1)" if dim == 1 else "the batch (dim=0)"
    _checks.check_correlation_length("pearson_loss", student.shape[dim], what)
    return _run("pearson_loss", backend, student, teacher, temperature, dim)


def dist_loss(student, teacher, temperature=1.0, beta=1.0, gamma=1.0, *, standardize=False, backend=None,
              check_finite=False):
    """DIST loss: ``β · L_inter + γ · L_intra``.

    ``L_inter = τ² (1 − (1/B) Σ_i ρ(p_i, q_i))`` correlates each sample's class
    probabilities, ``L_intra = τ² (1 − (1/C) Σ_c ρ(p_:,c, q_:,c))`` each class's
    probabilities across the batch. (Huang, You, Wang, Qian, Xu: "Knowledge Distillation
    from A Stronger Teacher", NeurIPS 2022.)

    Args:
        student, teacher: ``[B, C]`` logits; C ≥ 2 when β ≠ 0, B ≥ 2 when γ ≠ 0
            (for B = 1 pass ``gamma=0``).
        temperature: τ in (0, 100] (default 1.0).
        beta, gamma: weights ≥ 0 of the inter- and intra-class terms, not both 0.
        standardize: logit standardization before the temperature (see :func:`kd_loss`).

    Returns:
        Scalar loss.
    """
    temperature = _prepare(student, teacher, check_finite=check_finite, temperature=temperature)
    beta = _checks.check_nonnegative("beta", beta)
    gamma = _checks.check_nonnegative("gamma", gamma)
    if beta == 0 and gamma == 0:
        raise ValueError("beta and gamma must not both be 0: the loss would be identically zero")
    if beta != 0:
        _checks.check_correlation_length("dist_loss (inter-class, beta != 0)", student.shape[1], "classes")
    if gamma != 0:
        _checks.check_correlation_length(
            "dist_loss (intra-class, gamma != 0; pass gamma=0 for B=1)", student.shape[0], "the batch"
        )
    standardize = _standardize_option(standardize, student, teacher)
    return _run("dist_loss", backend, student, teacher, temperature, beta, gamma, standardize)


def spearman_loss(student, teacher, regularization_strength=None, *, backend=None, check_finite=False):
    """Soft Spearman-correlation loss: ``(1/B) Σ_i (1 − ρ(soft_rank(ẑ_i), rank(t_i)))``.

    ``ẑ_i`` is row i of the student logits standardized to zero mean and unit population
    std (a constant row standardizes to zeros); ``soft_rank`` uses l2 regularization with
    strength ε; ``rank(t_i)`` are the teacher's hard ranks with ties averaged (no
    gradient flows through them). Ranks are invariant under the softmax, so the logits
    are used and no temperature applies.

    Args:
        student, teacher: ``[B, C]`` logits, C ≥ 2.
        regularization_strength: ε > 0 of the soft ranks of ẑ; ``None`` uses
            :func:`default_spearman_strength` (``2 / C``), which keeps the soft
            correlation within ~0.003 of the hard Spearman correlation for C ≥ 100.
            A fixed ε much larger than ~1/C makes the soft ranks an affine map of ẑ,
            i.e. turns the term into a Pearson correlation.

    Returns:
        Scalar loss in [0, 2].
    """
    _prepare(student, teacher, check_finite=check_finite)
    _checks.check_correlation_length("spearman_loss", student.shape[1], "classes")
    strength = _spearman_strength(regularization_strength, student.shape[1])
    return _run("spearman_loss", backend, student, teacher, strength)


def cmkd_loss(
    student,
    teacher,
    target=None,
    temperature=4.0,
    kl_weight=1.0,
    corr_weight=1.0,
    ce_weight=1.0,
    weighting="entropy",
    regularization_strength=None,
    *,
    standardize=False,
    backend=None,
    check_finite=False,
):
    """CMKD loss: KL plus difficulty-weighted Pearson and Spearman terms (plus CE).

    ``L = w_kl·L_kd + w_corr·τ²·(1/B) Σ_i [(1−d_i)(1−ρ(p_i,q_i)) + d_i(1−ρ_S,i)] + w_ce·CE(s, y)``

    where ``ρ_S,i`` is the soft Spearman correlation of :func:`spearman_loss` and ``d_i``
    the per-sample difficulty. The CE term is added only when ``target`` is given.
    The CMKD paper (Niu et al.: "Efficient and Robust Knowledge Distillation from A
    Stronger Teacher Based on Correlation Matching", 2024) does not publish its exact
    weighting; this definition is kdfast's.

    Args:
        student, teacher: ``[B, C]`` logits, C ≥ 2.
        target: optional ``[B]`` integer class indices in [0, C).
        temperature: τ in (0, 100] (default 4.0).
        kl_weight, corr_weight, ce_weight: weights ≥ 0 of the three terms.
        weighting: ``"entropy"`` (default): ``d_i = H(q_i)/log C``, the teacher's
            normalized entropy, so confident samples lean on Pearson and uncertain ones
            on ranks; ``"fixed"``: ``d_i = 0.5``; or a ``[B]`` floating tensor of
            weights (normally in [0, 1]). No gradient flows through ``d``.
        regularization_strength: ε of the soft ranks (``None``: ``2 / C``, as in
            :func:`spearman_loss`).
        standardize: logit standardization of the KL, correlation and difficulty terms'
            logits (see :func:`kd_loss`); CE keeps the raw logits.

    Returns:
        Scalar loss.
    """
    temperature = _prepare(student, teacher, target, check_finite, temperature=temperature)
    weights = [_checks.check_nonnegative(name, value) for name, value in
               (("kl_weight", kl_weight), ("corr_weight", corr_weight), ("ce_weight", ce_weight))]
    _checks.check_correlation_length("cmkd_loss", student.shape[1], "classes")
    difficulty = _difficulty(weighting, student)
    if check_finite and isinstance(difficulty, torch.Tensor):
        _checks.check_finite(weighting=difficulty)
    target = _class_indices(target)
    strength = _spearman_strength(regularization_strength, student.shape[1])
    standardize = _standardize_option(standardize, student, teacher)
    return _run("cmkd_loss", backend, student, teacher, target, temperature, *weights, difficulty, strength,
                standardize)


def _difficulty(weighting, student):
    """None for entropy weighting, 0.5 for fixed, or the checked [B] tensor."""
    if isinstance(weighting, torch.Tensor):
        if not weighting.dtype.is_floating_point:
            raise TypeError(f"weighting must be a floating-point tensor of per-sample weights, got {weighting.dtype}")
        if weighting.shape != student.shape[:1]:
            raise ValueError(f"weighting must have shape ({student.shape[0]},), got {tuple(weighting.shape)}")
        if weighting.device != student.device:
            raise ValueError(f"weighting must be on the logits' device {student.device}, got {weighting.device}")
        return weighting
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be 'entropy', 'fixed' or a [B] tensor, got {weighting!r}")
    return None if weighting == "entropy" else 0.5


def rectify(teacher, target, *, check_finite=False):
    """DR-KD's rectified teacher logits (a new tensor; the input is not modified).

    In every row whose argmax is not the target class, the maximum logit and the
    target's logit are swapped, so the target becomes the argmax while the teacher's
    other "dark knowledge" is kept. Differentiable (a permutation of each row).

    Args:
        teacher: ``[B, C]`` logits.
        target: ``[B]`` integer class indices in [0, C).

    Returns:
        ``[B, C]`` tensor of ``teacher``'s dtype.
    """
    _checks.check_logits("teacher", teacher)
    _checks.check_targets(target, teacher.shape[0], teacher.shape[1], teacher.device, exact=check_finite)
    if check_finite:
        _checks.check_finite(teacher=teacher)
    return reference.rectify(teacher, target)


def drkd_loss(student, teacher, target, temperature=4.0, ce_weight=0.0, *, standardize=False, backend=None,
              check_finite=False):
    """DR-KD loss: KD against the rectified teacher, ``τ² (1/B) Σ_i KL(softmax(rectify(t)_i/τ) ‖ p_i)``.

    Plus ``ce_weight · CE(s, y)``. In self-distillation the "teacher" is the student's own
    logits for the sample from the previous epoch. (Amik et al.: "Dynamic Rectification
    Knowledge Distillation", 2022.)

    Args:
        student, teacher: ``[B, C]`` logits.
        target: ``[B]`` integer class indices in [0, C) (required: it drives rectification).
        temperature: τ in (0, 100] (default 4.0).
        ce_weight: weight ≥ 0 of the cross-entropy term (default 0).
        standardize: logit standardization of the KL term's logits (see :func:`kd_loss`;
            it commutes with rectification); CE keeps the raw logits.

    Returns:
        Scalar loss.
    """
    if target is None:
        raise ValueError("target is required by drkd_loss: it decides which rows are rectified")
    temperature = _prepare(student, teacher, target, check_finite, temperature=temperature)
    ce_weight = _checks.check_nonnegative("ce_weight", ce_weight)
    standardize = _standardize_option(standardize, student, teacher)
    return _run("drkd_loss", backend, student, teacher, _class_indices(target), temperature, ce_weight, standardize)


def dkd_loss(student, teacher, target, alpha=1.0, beta=8.0, temperature=4.0, *, standardize=False, backend=None,
             check_finite=False):
    """DKD: ``τ² · (1/B) Σ_i (α·TCKD_i + β·NCKD_i)`` (Zhao, Cui, Song, Qiu, Liang: "Decoupled
    Knowledge Distillation", CVPR 2022).

    ``TCKD_i = KL(b̂_i ‖ b_i)`` with ``b = [p_y, 1 − p_y]`` (the binary target / non-target
    split of ``p = softmax(s/τ)``, ``b̂`` the teacher's); ``NCKD_i = KL(q̃_i ‖ p̃_i)`` with ``p̃``,
    ``q̃`` the softmax over the classes other than the target. Exact: the authors' code
    subtracts 1000 from the target logit instead of removing it; the two agree wherever a
    logit gap below 1000·τ keeps that trick exact.

    Args:
        student, teacher: ``[B, C]`` logits, C ≥ 2.
        target: ``[B]`` integer class indices in [0, C) (required: it splits the classes).
        alpha, beta: weights ≥ 0 of TCKD and NCKD (default 1 and 8, the authors' CIFAR-100
            setting; they use β = 0.5 on ImageNet).
        temperature: τ in (0, 100] (default 4.0).
        standardize: logit standardization before the temperature (see :func:`kd_loss`).

    Returns:
        Scalar loss.
    """
    if target is None:
        raise ValueError("target is required by dkd_loss: it splits target from non-target classes")
    temperature = _prepare(student, teacher, target, check_finite, temperature=temperature)
    alpha = _checks.check_nonnegative("alpha", alpha)
    beta = _checks.check_nonnegative("beta", beta)
    if student.shape[1] < 2:
        raise ValueError(f"dkd_loss needs at least 2 classes (the target and the others), got C={student.shape[1]}")
    standardize = _standardize_option(standardize, student, teacher)
    return _run("dkd_loss", backend, student, teacher, _class_indices(target), alpha, beta, temperature,
                standardize)


def _standardize_option(standardize, student, teacher=None) -> bool:
    """``standardize`` as a bool; logit standardization needs C ≥ 2 (an unbiased std) and,
    with a sparse teacher, every class (the tail's stored mass is that of the raw logits)."""
    _checks.check_bool("standardize", standardize)
    if standardize and isinstance(teacher, SparseTeacher) and teacher.top_k < teacher.num_classes:
        raise ValueError(f"standardize=True needs the teacher's whole rows: a SparseTeacher with k={teacher.top_k} < "
                         f"C={teacher.num_classes} knows the remaining mass of the raw logits only (build the cache "
                         f"with --top-k {teacher.num_classes})")
    if standardize and student.shape[1] < 2:
        raise ValueError(f"standardize=True needs at least 2 classes (each row's unbiased std), got "
                         f"C={student.shape[1]}")
    return standardize
