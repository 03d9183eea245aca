"""Bad input raises TypeError/ValueError naming the argument and what was expected."""

import pytest
import torch

import kdfast
import kdfast.kernels.kd_losses  # noqa: F401  (registers torch.ops.kdfast.fused_kd_loss_triton)

S = torch.randn(4, 6)
T = torch.randn(4, 6)
Y = torch.tensor([0, 5, 2, 3])

# Every public loss with valid arguments; each test replaces one of them.
CALLS = {
    "kd_loss": lambda s=S, t=T, **kw: kdfast.kd_loss(s, t, **kw),
    "pearson_loss": lambda s=S, t=T, **kw: kdfast.pearson_loss(s, t, **kw),
    "dist_loss": lambda s=S, t=T, **kw: kdfast.dist_loss(s, t, **kw),
    "spearman_loss": lambda s=S, t=T, **kw: kdfast.spearman_loss(s, t, **kw),
    "cmkd_loss": lambda s=S, t=T, y=Y, **kw: kdfast.cmkd_loss(s, t, y, **kw),
    "drkd_loss": lambda s=S, t=T, y=Y, **kw: kdfast.drkd_loss(s, t, y, **kw),
}
WITH_TARGET = ["cmkd_loss", "drkd_loss"]
WITH_TEMPERATURE = ["kd_loss", "pearson_loss", "dist_loss", "cmkd_loss", "drkd_loss"]


@pytest.mark.parametrize("name", CALLS)
def test_mismatched_shapes(name):
    with pytest.raises(ValueError, match=r"teacher must have the student's shape \(4, 6\), got \(4, 5\)"):
        CALLS[name](t=torch.randn(4, 5))


@pytest.mark.parametrize("name", CALLS)
def test_non_floating_logits(name):
    with pytest.raises(TypeError, match="student must be a floating-point tensor"):
        CALLS[name](s=torch.ones(4, 6, dtype=torch.long))
    with pytest.raises(TypeError, match="teacher must be a floating-point tensor"):
        CALLS[name](t=torch.ones(4, 6, dtype=torch.int32))
    with pytest.raises(TypeError, match="student must be a torch.Tensor"):
        CALLS[name](s=S.numpy())


@pytest.mark.parametrize("name", CALLS)
def test_logits_must_be_2d(name):
    with pytest.raises(ValueError, match=r"student must be a 2-D tensor \[B, C\]"):
        CALLS[name](s=torch.randn(4, 6, 1), t=torch.randn(4, 6, 1))


@pytest.mark.parametrize("name", CALLS)
def test_tensors_on_different_devices(name):
    # The meta device stands in for a second device on a CPU-only machine.
    with pytest.raises(ValueError, match="teacher must be on the student's device cpu, got meta"):
        CALLS[name](t=torch.empty(4, 6, device="meta"))


@pytest.mark.parametrize("name", WITH_TARGET)
@pytest.mark.parametrize(
    "target,error,message",
    [
        (torch.tensor([0, 6, 2, 3]), ValueError, r"target values must lie in \[0, 5\], got values in \[0, 6\]"),
        (torch.tensor([0, -1, 2, 3]), ValueError, r"target values must lie in \[0, 5\]"),
        (torch.tensor([0, 1, 2]), ValueError, r"target must have shape \(4,\)"),
        (torch.tensor([[0, 1, 2, 3]]), ValueError, r"target must have shape \(4,\)"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), TypeError, "target must be an integer tensor"),
        (torch.tensor([True, False, True, False]), TypeError, "target must be an integer tensor"),
        ([0, 1, 2, 3], TypeError, "target must be a torch.Tensor"),
        (torch.empty(4, dtype=torch.long, device="meta"), ValueError, "target must be on the logits' device"),
    ],
)
def test_bad_targets(name, target, error, message):
    with pytest.raises(error, match=message):
        CALLS[name](y=target)


def test_rectify_and_drkd_require_a_target():
    with pytest.raises(ValueError, match="target is required by drkd_loss"):
        kdfast.drkd_loss(S, T, None)
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 5\]"):
        kdfast.rectify(T, torch.tensor([0, 1, 2, 9]))


@pytest.mark.parametrize("name", WITH_TEMPERATURE)
@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_temperature_must_be_positive_and_finite(name, bad):
    with pytest.raises(ValueError, match="temperature must be"):
        CALLS[name](temperature=bad)


@pytest.mark.parametrize("name", WITH_TEMPERATURE)
def test_temperature_range_ends_at_max_temperature(name):
    assert kdfast._checks.MAX_TEMPERATURE == 100.0  # the README and the C++ operator say 100
    assert torch.isfinite(CALLS[name](temperature=100.0))
    with pytest.raises(ValueError, match=r"temperature must be in \(0, 100\] \(fp32 loses the KD loss to "
                                         r"cancellation beyond it\), got 100.001"):
        CALLS[name](temperature=100.001)


def test_modules_and_operators_refuse_temperatures_beyond_the_range():
    for module in (kdfast.nn.KDLoss, kdfast.nn.DISTLoss, kdfast.nn.CMKDLoss, kdfast.nn.DRKDLoss):
        with pytest.raises(ValueError, match=r"temperature must be in \(0, 100\]"):
            module(temperature=1e4)
    arguments = (None, None, 1e4, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0, 1.0, False, True, False)
    with pytest.raises(RuntimeError, match=r"temperature must be in \(0, 100\]"):  # the CPU operator itself
        torch.ops.kdfast.fused_kd_loss(S, T, *arguments)
    with pytest.raises(ValueError, match=r"temperature must be in \(0, 100\]"):
        torch.ops.kdfast.fused_kd_loss_triton(S, T, *arguments)


@pytest.mark.parametrize("name", WITH_TEMPERATURE)
@pytest.mark.parametrize("bad", ["4", None, True, torch.tensor(4.0)])
def test_temperature_must_be_a_number(name, bad):
    with pytest.raises(TypeError, match="temperature must be a real number"):
        CALLS[name](temperature=bad)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: kdfast.pearson_loss(torch.randn(4, 1), torch.randn(4, 1)), "over classes"),
        (lambda: kdfast.pearson_loss(torch.randn(1, 5), torch.randn(1, 5), dim=0), "over the batch"),
        (lambda: kdfast.dist_loss(torch.randn(1, 5), torch.randn(1, 5)), "pass gamma=0 for B=1"),
        (lambda: kdfast.dist_loss(torch.randn(4, 1), torch.randn(4, 1), gamma=0.0), "inter-class"),
        (lambda: kdfast.spearman_loss(torch.randn(4, 1), torch.randn(4, 1)), "spearman_loss"),
        (lambda: kdfast.cmkd_loss(torch.randn(4, 1), torch.randn(4, 1)), "cmkd_loss"),
    ],
)
def test_correlation_over_fewer_than_two_elements(call, message):
    with pytest.raises(ValueError, match="needs at least 2 elements") as info:
        call()
    assert message in str(info.value)


def test_pearson_dim_and_dist_weights():
    with pytest.raises(ValueError, match="dim must be 1 .* or 0"):
        kdfast.pearson_loss(S, T, dim=2)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        kdfast.dist_loss(S, T, beta=-1.0)
    with pytest.raises(ValueError, match="gamma must be finite"):
        kdfast.dist_loss(S, T, gamma=float("nan"))
    with pytest.raises(ValueError, match="beta and gamma must not both be 0"):
        kdfast.dist_loss(S, T, beta=0.0, gamma=0.0)


@pytest.mark.parametrize("name", ["spearman_loss", "cmkd_loss"])
@pytest.mark.parametrize("bad", [0.0, -0.1, float("inf")])
def test_regularization_strength(name, bad):
    with pytest.raises(ValueError, match="regularization_strength must be"):
        CALLS[name](regularization_strength=bad)


def test_cmkd_weights_and_weighting():
    for weight in ("kl_weight", "corr_weight", "ce_weight"):
        with pytest.raises(ValueError, match=f"{weight} must be >= 0"):
            kdfast.cmkd_loss(S, T, Y, **{weight: -1.0})
    with pytest.raises(ValueError, match="weighting must be 'entropy', 'fixed' or a \\[B\\] tensor, got 'uniform'"):
        kdfast.cmkd_loss(S, T, Y, weighting="uniform")
    with pytest.raises(ValueError, match=r"weighting must have shape \(4,\)"):
        kdfast.cmkd_loss(S, T, Y, weighting=torch.ones(3))
    with pytest.raises(TypeError, match="weighting must be a floating-point tensor"):
        kdfast.cmkd_loss(S, T, Y, weighting=torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="weighting must be on the logits' device"):
        kdfast.cmkd_loss(S, T, Y, weighting=torch.ones(4, device="meta"))


def test_empty_batch():
    with pytest.raises(ValueError, match="student must have at least one row and one class"):
        kdfast.kd_loss(torch.randn(0, 5), torch.randn(0, 5))


def test_modules_check_their_arguments_at_construction():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kdfast.nn.KDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        kdfast.nn.DISTLoss(gamma=-2.0)
    with pytest.raises(ValueError, match="weighting must be 'entropy' or 'fixed'"):
        kdfast.nn.CMKDLoss(weighting="hard")
    with pytest.raises(ValueError, match="regularization_strength must be > 0"):
        kdfast.nn.CMKDLoss(regularization_strength=0.0)
    with pytest.raises(ValueError, match="ce_weight must be >= 0"):
        kdfast.nn.DRKDLoss(ce_weight=-0.1)
    with pytest.raises(ValueError, match="feature_dim must be a positive integer"):
        kdfast.nn.TeacherAdapter(0, 10)
    with pytest.raises(ValueError, match="hidden_dim must be a positive integer"):
        kdfast.nn.TeacherAdapter(8, 10, hidden_dim=2.5)


def test_empty_inputs_of_the_row_wise_functions():
    assert kdfast.rectify(torch.randn(0, 5), torch.zeros(0, dtype=torch.long)).shape == (0, 5)
    assert kdfast.soft_rank(torch.randn(0, 5)).shape == (0, 5)
    assert kdfast.soft_sort(torch.randn(3, 0)).shape == (3, 0)
    assert kdfast.average_ranks(torch.randn(3, 0)).shape == (3, 0)
