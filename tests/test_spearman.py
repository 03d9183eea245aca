"""The default ε of the Spearman terms: close to the hard Spearman, not a Pearson in disguise."""

import numpy as np
import pytest
import torch
from helpers import teacher_like
from scipy.stats import spearmanr

import kdfast
from kdfast import reference


def _hard_spearman(student, teacher):
    return float(np.mean([spearmanr(a, b).statistic for a, b in zip(student.numpy(), teacher.numpy())]))


@pytest.mark.parametrize("classes", [100, 1000])
def test_default_strength_tracks_the_hard_spearman_and_not_pearson(classes):
    generator = torch.Generator().manual_seed(classes)
    student, teacher, _ = teacher_like(64, classes, generator)
    soft = 1.0 - kdfast.spearman_loss(student.float(), teacher.float()).item()
    hard = _hard_spearman(student, teacher)
    assert abs(soft - hard) <= 0.02
    # Pearson of the logits and of the probabilities: what the term would measure if the
    # soft ranks had collapsed to an affine map of their input.
    pearson_logits = reference.pearson(student, teacher).mean().item()
    pearson_probs = reference.pearson(student.softmax(1), teacher.softmax(1)).mean().item()
    for pearson in (pearson_logits, pearson_probs):
        assert abs(soft - pearson) >= max(0.01, 5 * abs(soft - hard))


@pytest.mark.parametrize("classes", [100, 1000])
def test_a_fixed_large_strength_collapses_to_pearson_of_the_standardized_logits(classes):
    # Why ε must shrink like 1/C: with a fixed ε the projection onto the permutahedron
    # is an affine map of ẑ, and ρ_S is exactly ρ(ẑ, rank(t)).
    student, teacher, _ = teacher_like(16, classes)
    collapsed = reference.pearson(reference.standardize_rows(student), kdfast.average_ranks(teacher))
    soft = reference.spearman_rows(student, teacher, 1.0)
    torch.testing.assert_close(soft, collapsed, rtol=0, atol=1e-12)
    default = reference.spearman_rows(student, teacher, kdfast.default_spearman_strength(classes))
    assert (default - collapsed).abs().max().item() > 1e-3


@pytest.mark.parametrize("classes", [10, 100, 1000])
def test_default_strength_keeps_gradients_flowing(classes):
    # ε too small gives hard ranks almost everywhere, and hard ranks have no gradient.
    # (Measured w.r.t. ẑ: through the standardization every logit gets some gradient.)
    student, teacher, _ = teacher_like(16, classes)
    z = reference.standardize_rows(student).requires_grad_()
    ranks = kdfast.soft_rank(z, "l2", kdfast.default_spearman_strength(classes))
    reference.pearson(ranks, kdfast.average_ranks(teacher)).sum().backward()
    assert (z.grad != 0).double().mean().item() >= 0.5
    assert kdfast.default_spearman_strength(classes) == pytest.approx(2.0 / classes)
