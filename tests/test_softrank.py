"""Soft ranks and sorts against torchsort and scipy, gradients against finite differences."""

import numpy as np
import pytest
import torch
import torchsort
from scipy.stats import rankdata

import kdfast

FUNCTIONS = [(kdfast.soft_rank, torchsort.soft_rank), (kdfast.soft_sort, torchsort.soft_sort)]
IDS = ["rank", "sort"]


def _values_and_grads(fn, x, regularization, strength, g):
    x = x.clone().requires_grad_()
    y = fn(x, regularization, strength)
    y.backward(g)
    return y.detach(), x.grad


@pytest.mark.parametrize("fn,reference", FUNCTIONS, ids=IDS)
@pytest.mark.parametrize("regularization", ["l2", "kl"])
@pytest.mark.parametrize("strength", [0.01, 0.3, 1.0, 10.0])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1000])
def test_matches_torchsort(fn, reference, regularization, strength, n):
    x = torch.randn(4, n, dtype=torch.float64)
    g = torch.randn(4, n, dtype=torch.float64)
    ours = _values_and_grads(fn, x, regularization, strength, g)
    theirs = _values_and_grads(reference, x, regularization, strength, g)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("fn,reference", FUNCTIONS, ids=IDS)
@pytest.mark.parametrize("regularization", ["l2", "kl"])
def test_float32_error_no_worse_than_torchsort(fn, reference, regularization):
    # Both computed in float32 and compared with the float64 result: kdfast's error must
    # stay within 2x torchsort's (plus a few ulps of the values' scale).
    x = torch.randn(16, 300)
    g = torch.randn(16, 300)
    exact = _values_and_grads(fn, x.double(), regularization, 0.5, g.double())
    ours = _values_and_grads(fn, x, regularization, 0.5, g)
    theirs = _values_and_grads(reference, x, regularization, 0.5, g)
    for mine, ref, truth in zip(ours, theirs, exact):
        our_error = (mine.double() - truth).abs().max().item()
        their_error = (ref.double() - truth).abs().max().item()
        assert our_error <= 2 * their_error + 1e-6 * truth.abs().max().item()


@pytest.mark.parametrize("regularization", ["l2", "kl"])
def test_ties(regularization):
    # Tied entries get the same soft rank and the same gradient (their order is arbitrary);
    # soft sorts agree in value, and in the gradient summed over each tie group.
    x = torch.randn(3, 40, dtype=torch.float64).mul(2).round()
    g = torch.randn(3, 40, dtype=torch.float64)
    ranks, rank_grad = _values_and_grads(kdfast.soft_rank, x, regularization, 0.2, g)
    ref_ranks, ref_rank_grad = _values_and_grads(torchsort.soft_rank, x, regularization, 0.2, g)
    torch.testing.assert_close(ranks, ref_ranks)
    torch.testing.assert_close(rank_grad, ref_rank_grad)
    for row in range(3):
        for value in x[row].unique():
            tied = x[row] == value
            assert torch.allclose(ranks[row][tied], ranks[row][tied][0].expand(int(tied.sum())))

    sorted_, sort_grad = _values_and_grads(kdfast.soft_sort, x, regularization, 0.2, g)
    ref_sorted, ref_sort_grad = _values_and_grads(torchsort.soft_sort, x, regularization, 0.2, g)
    torch.testing.assert_close(sorted_, ref_sorted)
    for row in range(3):
        for value in x[row].unique():
            tied = x[row] == value
            torch.testing.assert_close(sort_grad[row][tied].sum(), ref_sort_grad[row][tied].sum())


@pytest.mark.parametrize("regularization", ["l2", "kl"])
def test_hard_limit_is_scipy_average_rank(regularization):
    x = torch.randn(6, 50, dtype=torch.float64)
    x[:, 10:20] = x[:, 10:11]  # a tie group in every row
    ranks = kdfast.soft_rank(x, regularization, 1e-4)
    expected = np.stack([rankdata(row, method="average") for row in x.numpy()])
    np.testing.assert_allclose(ranks.numpy(), expected, atol=1e-6)
    sorted_ = kdfast.soft_sort(x, regularization, 1e-4)
    np.testing.assert_allclose(sorted_.numpy(), np.sort(x.numpy(), axis=1), atol=1e-6)


def test_average_ranks_is_scipy_rankdata():
    x = torch.randn(10, 33).mul(1.5).round()
    expected = np.stack([rankdata(row, method="average") for row in x.numpy()])
    np.testing.assert_array_equal(kdfast.average_ranks(x).numpy(), expected)


def test_large_strength_flattens_towards_the_mean_rank():
    x = torch.randn(2, 9, dtype=torch.float64)
    ranks = kdfast.soft_rank(x, "l2", 1e6)
    torch.testing.assert_close(ranks, torch.full_like(ranks, 5.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fn", [kdfast.soft_rank, kdfast.soft_sort], ids=IDS)
@pytest.mark.parametrize("regularization", ["l2", "kl"])
@pytest.mark.parametrize("strength", [0.1, 1.0])
def test_gradcheck(fn, regularization, strength):
    # Values spread so that several elements pool into blocks but no evaluation of the
    # finite differences sits on a block boundary.
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: fn(v, regularization, strength), (x,), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("fn", [kdfast.soft_rank, kdfast.soft_sort], ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_upcast(fn, dtype):
    x = torch.randn(5, 64).to(dtype).requires_grad_()
    out = fn(x, "l2", 0.5)
    assert out.dtype == dtype
    out.backward(torch.ones_like(out))
    assert x.grad.dtype == dtype
    x32 = x.detach().float().requires_grad_()
    out32 = fn(x32, "l2", 0.5)
    out32.backward(torch.ones_like(out32))
    torch.testing.assert_close(out.float(), out32.to(dtype).float())
    torch.testing.assert_close(x.grad.float(), x32.grad.to(dtype).float())


@pytest.mark.parametrize("fn", [kdfast.soft_rank, kdfast.soft_sort], ids=IDS)
def test_non_contiguous_input(fn):
    base = torch.randn(30, 7, dtype=torch.float64)
    x = base.t()
    assert not x.is_contiguous()
    torch.testing.assert_close(fn(x, "kl", 0.3), fn(x.contiguous(), "kl", 0.3))


@pytest.mark.parametrize("fn", [kdfast.soft_rank, kdfast.soft_sort], ids=IDS)
def test_non_finite_input_never_crashes_and_check_finite_raises(fn):
    x = torch.randn(3, 6)
    x[0, 2] = float("nan")
    x[1, 1] = float("inf")
    original = x.clone()
    x.requires_grad_()
    out = fn(x, "l2", 1.0)
    out.sum().backward()
    assert torch.isfinite(out[2]).all()
    assert torch.equal(x.detach().nan_to_num(), original.nan_to_num())  # input untouched
    with pytest.raises(ValueError, match="values contains NaN or Inf"):
        fn(x, "l2", 1.0, check_finite=True)


@pytest.mark.parametrize("fn", [kdfast.soft_rank, kdfast.soft_sort], ids=IDS)
def test_bad_arguments(fn):
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="regularization must be 'l2' or 'kl'"):
        fn(x, "l1")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="regularization_strength"):
            fn(x, "l2", bad)
    with pytest.raises(TypeError, match="regularization_strength must be a real number"):
        fn(x, "l2", "1.0")
    with pytest.raises(ValueError, match=r"values must be a 2-D tensor"):
        fn(x[0])
    with pytest.raises(TypeError, match="values must be a floating-point tensor"):
        fn(torch.arange(10).view(2, 5))
    with pytest.raises(TypeError, match="values must be a torch.Tensor"):
        fn([[1.0, 2.0]])
