"""The compiled pool-adjacent-violators operators against independent solvers."""

import numpy as np
import pytest
import torch
from sklearn.isotonic import isotonic_regression

from kdfast import _ops


def _random_rows(rows, n, dtype, ties=False):
    y = torch.randn(rows, n, dtype=torch.float64)
    w = torch.randn(rows, n, dtype=torch.float64).sort(dim=1, descending=True).values
    if ties:
        y = y.round()
    return y.to(dtype), w.to(dtype)


def _blocks(sol_row):
    """Runs of equal values of a 1-D array, as (start, end) pairs."""
    edges = [0] + [i for i in range(1, len(sol_row)) if sol_row[i] != sol_row[i - 1]] + [len(sol_row)]
    return list(zip(edges[:-1], edges[1:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
@pytest.mark.parametrize("ties", [False, True])
def test_l2_matches_scikit_learn(dtype, n, ties):
    y, w = _random_rows(5, n, dtype, ties)
    sol = _ops.isotonic(y, w, "l2")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for row in range(5):
        target = (y[row] - w[row]).double().numpy()
        expected = isotonic_regression(target, increasing=False)
        np.testing.assert_allclose(sol[row].double().numpy(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_kl_solution_satisfies_its_optimality_conditions(dtype, n):
    # On each block the KL solution is logsumexp(y_B) - logsumexp(w_B), blocks strictly
    # decrease, and (KKT) every prefix of a block carries at least its share of exp(y):
    # pooling is only needed where the unpooled solution would increase.
    y, w = _random_rows(4, n, dtype)
    sol = _ops.isotonic(y, w, "kl")
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for row in range(4):
        s, yy, ww = sol[row].double(), y[row].double(), w[row].double()
        blocks = _blocks(sol[row].tolist())
        values = [s[a].item() for a, _ in blocks]
        assert all(a > b for a, b in zip(values, values[1:]))
        for (a, b), value in zip(blocks, values):
            expected = torch.logsumexp(yy[a:b], 0) - torch.logsumexp(ww[a:b], 0)
            assert abs(value - expected.item()) <= tol * max(1.0, abs(value))
            for k in range(a + 1, b):
                prefix = torch.logsumexp(yy[a:k], 0) - torch.logsumexp(ww[a:k], 0)
                assert prefix.item() <= value + tol * max(1.0, abs(value))


def test_l2_blocks_strictly_decrease_so_the_vjp_recovers_them():
    y, w = _random_rows(8, 300, torch.float32, ties=True)
    sol = _ops.isotonic(y, w, "l2")
    assert bool((sol[:, 1:] <= sol[:, :-1]).all())
    for row in sol:
        values = [row[a].item() for a, _ in _blocks(row.tolist())]
        assert all(a > b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("regularization", ["l2", "kl"])
def test_vjp_is_the_transpose_of_the_numerical_jacobian(regularization):
    y, w = _random_rows(3, 12, torch.float64)
    y = y * 0.3  # dense enough that several blocks pool
    sol = _ops.isotonic(y, w, regularization)
    g = torch.randn_like(y)
    vjp = _ops.isotonic_vjp(sol, y, g, regularization)
    h = 1e-7
    for row in range(3):
        for j in range(12):
            bumped = y.clone()
            bumped[row, j] += h
            derivative = (_ops.isotonic(bumped, w, regularization)[row] - sol[row]) / h
            assert abs((derivative * g[row]).sum().item() - vjp[row, j].item()) < 1e-5


@pytest.mark.parametrize("regularization", ["l2", "kl"])
def test_rows_are_independent_of_batching(regularization):
    y, w = _random_rows(257, 33, torch.float64)
    batched = _ops.isotonic(y, w, regularization)
    one_by_one = torch.cat([_ops.isotonic(y[i : i + 1], w[i : i + 1], regularization) for i in range(257)])
    assert torch.equal(batched, one_by_one)


def test_non_contiguous_and_empty_inputs():
    y, w = _random_rows(6, 10, torch.float64)
    expected = _ops.isotonic(y, w, "l2")
    y_t = y.t().contiguous().t()
    assert not y_t.is_contiguous()
    assert torch.equal(_ops.isotonic(y_t, w, "l2"), expected)
    assert _ops.isotonic(y[:0], w[:0], "l2").shape == (0, 10)
    assert _ops.isotonic(y[:, :0], w[:, :0], "kl").shape == (6, 0)


@pytest.mark.parametrize("regularization", ["l2", "kl"])
def test_non_finite_values_do_not_crash(regularization):
    y, w = _random_rows(3, 9, torch.float64)
    y[0, 3] = float("nan")
    y[1, 0] = float("inf")
    y[2, :] = -float("inf")
    sol = _ops.isotonic(y, w, regularization)
    assert sol.shape == y.shape
    g = torch.ones_like(y)
    assert _ops.isotonic_vjp(sol, y, g, regularization).shape == y.shape


def test_operator_rejects_bad_arguments():
    y, w = _random_rows(2, 5, torch.float32)
    with pytest.raises(RuntimeError, match="regularization must be 'l2' or 'kl'"):
        _ops.isotonic(y, w, "l1")
    with pytest.raises(RuntimeError, match="float32 or float64"):
        _ops.isotonic(y.half(), w.half(), "l2")
    with pytest.raises(RuntimeError, match="'w' must have shape"):
        _ops.isotonic(y, w[:, :3], "l2")
    with pytest.raises(RuntimeError, match="2-D"):
        _ops.isotonic(y[0], w[0], "l2")
