"""Shared OBS machinery: damping, inverse-Hessian Cholesky factor, lazy-batch column sweep."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.compression.hessian import (
    damped_hessian,
    dead_columns,
    inverse_hessian_cholesky,
    obs_sweep,
)


def _problem(seed=0, rows=6, cols=24, n=200):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, cols)) @ (np.eye(cols) + 0.4 * rng.normal(size=(cols, cols)))
    H = 2.0 / n * X.T @ X
    W = rng.normal(size=(rows, cols))
    return W, H


def test_damped_hessian_closed_form_and_dead_columns():
    _, H = _problem()
    H[3, :] = 0
    H[:, 3] = 0
    Hd = np.asarray(damped_hessian(H, 0.05))
    diag = np.diag(H).copy()
    diag[3] = 1.0
    expected = H.copy()
    expected[np.diag_indices_from(H)] = diag + 0.05 * diag.mean()
    np.testing.assert_allclose(Hd, expected, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(dead_columns(H)), np.arange(24) == 3)


def test_inverse_hessian_cholesky_factor():
    _, H = _problem()
    U = np.asarray(inverse_hessian_cholesky(H, 0.01), np.float64)
    np.testing.assert_array_equal(np.tril(U, -1), 0.0)
    Hd = H + 0.01 * np.mean(np.diag(H)) * np.eye(24)
    np.testing.assert_allclose(U.T @ U, np.linalg.inv(Hd), rtol=2e-4, atol=1e-6)


def test_not_positive_definite_raises():
    with pytest.raises(ValueError, match="percdamp"):
        inverse_hessian_cholesky(-np.eye(4), 0.0)
    with pytest.raises(ValueError, match="square"):
        damped_hessian(np.ones((3, 4)))


def test_single_column_removal_is_the_obs_closed_form():
    # Fixing column 0 to zero and keeping the rest: OBS gives
    # δ = −w₀ / [H⁻¹]₀₀ · [H⁻¹]₀,:, the exact minimiser of ‖(W − Ŵ) X‖² with ŵ₀ = 0.
    W, H = _problem(1)
    U = inverse_hessian_cholesky(H, 0.0)
    Q, losses = obs_sweep(W, U, lambda w, j: jnp.where(j == 0, 0.0, w), block_size=8)
    Hinv = np.linalg.inv(H)
    expected = W - W[:, :1] * Hinv[None, 0, :] / Hinv[0, 0]
    expected[:, 0] = 0.0
    np.testing.assert_allclose(np.asarray(Q), expected, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(float(losses[0]), np.sum(W[:, 0] ** 2) / (2 * Hinv[0, 0]), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(losses[1:]), 0.0, atol=1e-5)
    # and it is the least-squares optimum: any other compensation is worse
    err = lambda Wh: np.sum(((W - Wh) @ H) * (W - Wh))
    rng = np.random.default_rng(0)
    pert = rng.normal(size=W.shape) * 1e-2
    pert[:, 0] = 0
    assert err(np.asarray(Q, np.float64)) < err(np.asarray(Q, np.float64) + pert)


def _reference_sweep(W, U, column_fn, group_size=None, group_fn=None):
    """Unblocked float64 loop (the definition the blocked sweep must reproduce)."""
    W = np.array(W, np.float64)
    Q = np.zeros_like(W)
    losses = np.zeros(W.shape[1])
    aux = None
    for j in range(W.shape[1]):
        if group_fn is not None and j % group_size == 0:
            aux = group_fn(W[:, j : j + group_size], np.diag(U)[j : j + group_size], j)
        w = W[:, j].copy()
        q = column_fn(w, j) if group_fn is None else column_fn(w, j, aux)
        err = (w - q) / U[j, j]
        W[:, j:] -= np.outer(err, U[j, j:])
        Q[:, j] = q
        losses[j] = np.sum((w - q) ** 2) / (2 * U[j, j] ** 2)
    return Q, losses


@pytest.mark.parametrize("block_size", [5, 8, 24])
def test_blocked_sweep_matches_unblocked_reference_nm_pruning(block_size):
    # SparseGPT-style 2:4 pruning: each group of 4 columns keeps the 2 largest w²/U_jj² per row,
    # chosen from the current (updated) weights when the sweep reaches the group.
    W, H = _problem(2)
    U = np.asarray(inverse_hessian_cholesky(H), np.float64)

    def group_np(wg, dg, j):
        score = wg**2 / dg[None, :] ** 2
        return np.argsort(np.argsort(-score, axis=1), axis=1) < 2

    def group_jx(wg, dg, j):
        score = wg**2 / dg[None, :] ** 2
        return jnp.argsort(jnp.argsort(-score, axis=1), axis=1) < 2

    col_np = lambda w, j, keep: np.where(keep[:, j % 4], w, 0.0)
    col_jx = lambda w, j, keep: jnp.where(jnp.take(keep, j % 4, axis=1), w, 0.0)
    Q_ref, L_ref = _reference_sweep(W, U, col_np, 4, group_np)
    bs = block_size if block_size % 4 == 0 else 4
    if block_size % 4:
        with pytest.raises(ValueError, match="group_size"):
            obs_sweep(W, U, col_jx, block_size, group_size=4, group_fn=group_jx)
    Q, L = obs_sweep(W, U, col_jx, bs, group_size=4, group_fn=group_jx)
    np.testing.assert_allclose(np.asarray(Q), Q_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(L), L_ref, rtol=1e-3, atol=1e-6)
    assert np.all(np.sum(np.asarray(Q).reshape(6, 6, 4) == 0, axis=2) >= 2)


def test_sweep_extras_and_jit_compile_once():
    W, H = _problem(3)
    U = inverse_hessian_cholesky(H)
    traces = []

    def run(W, U):
        traces.append(1)
        return obs_sweep(W, U, lambda w, j: (jnp.round(w), j), 8, has_aux=True)

    f = jax.jit(run)
    Q, L, idx = f(W, U)
    f(W + 1.0, U)
    assert len(traces) == 1
    np.testing.assert_array_equal(np.asarray(idx), np.arange(24))
    np.testing.assert_array_equal(np.asarray(Q), np.round(np.asarray(Q)))
