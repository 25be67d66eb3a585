"""Tests for feynkit.core.weights against float64 NumPy references."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.core import (
    check_log_weights,
    conditional_ess,
    ess,
    log_ess,
    log_mean_exp,
    normalize_log_weights,
)

RTOL = 1e-5


def _lse(x, axis=None):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    out = m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))
    return np.squeeze(out, axis=axis) if axis is not None else out.reshape(())


def _ess_ref(lw):
    w = np.exp(np.asarray(lw, np.float64) - np.max(lw))
    return w.sum() ** 2 / np.sum(w**2)


def _cess_ref(lw, inc):
    lw = np.asarray(lw, np.float64)
    inc = np.asarray(inc, np.float64)
    big_w = np.exp(lw - _lse(lw))
    v = np.exp(inc - np.max(inc))  # CESS is scale-invariant in v
    return lw.size * np.sum(big_w * v) ** 2 / np.sum(big_w * v**2)


def _log_weights(seed, n=64, scale=3.0, num_neg_inf=5):
    rng = np.random.default_rng(seed)
    lw = (scale * rng.standard_normal(n) + 10.0).astype(np.float32)
    lw[rng.choice(n, num_neg_inf, replace=False)] = -np.inf
    return lw


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_normalize_log_weights_matches_numpy(seed):
    lw = _log_weights(seed)
    out = np.asarray(normalize_log_weights(lw))
    ref = lw.astype(np.float64) - _lse(lw)
    finite = np.isfinite(lw)
    np.testing.assert_array_equal(np.isneginf(out), ~finite)
    np.testing.assert_allclose(out[finite], ref[finite], rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(np.exp(out.astype(np.float64)).sum(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
def test_log_mean_exp_matches_numpy(seed, axis):
    rng = np.random.default_rng(seed)
    x = (5.0 * rng.standard_normal((6, 9))).astype(np.float32)
    x[2, 3] = -np.inf
    n = x.size if axis is None else x.shape[axis]
    ref = _lse(x, axis) - np.log(n)
    np.testing.assert_allclose(np.asarray(log_mean_exp(x, axis=axis)), ref, rtol=RTOL, atol=1e-5)


def test_log_mean_exp_is_stable_for_large_values():
    x = jnp.asarray([1000.0, 1000.0, 1000.0 + np.log(4.0)], jnp.float32)
    np.testing.assert_allclose(float(log_mean_exp(x)), 1000.0 + np.log(2.0), rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ess_and_log_ess_match_numpy(seed):
    lw = _log_weights(seed)
    ref = _ess_ref(lw)
    np.testing.assert_allclose(float(ess(lw)), ref, rtol=RTOL)
    np.testing.assert_allclose(float(log_ess(lw)), np.log(ref), rtol=RTOL, atol=1e-5)
    # Unnormalised: a common shift does not change the ESS.
    np.testing.assert_allclose(float(ess(lw - 50.0)), ref, rtol=RTOL)
    assert 1.0 <= float(ess(lw)) <= lw.size - 5


@pytest.mark.parametrize("n", [1, 7, 100, 1000])
def test_ess_bounds(n):
    np.testing.assert_allclose(float(ess(jnp.zeros(n))), n, rtol=1e-5)
    one_finite = jnp.full((n,), -jnp.inf).at[n // 2].set(3.0)
    assert float(ess(one_finite)) == 1.0
    lw = _log_weights(n, n=n, num_neg_inf=0)
    assert 1.0 - 1e-5 <= float(ess(lw)) <= n * (1 + 1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conditional_ess_matches_direct_formula(seed):
    lw = _log_weights(seed)
    inc = np.random.default_rng(100 + seed).standard_normal(lw.size).astype(np.float32)
    np.testing.assert_allclose(float(conditional_ess(lw, inc)), _cess_ref(lw, inc), rtol=1e-4)


def test_conditional_ess_is_n_for_constant_increments():
    lw = _log_weights(5)
    for c in [-30.0, 0.0, 12.5]:
        out = float(conditional_ess(lw, jnp.full(lw.shape, c)))
        np.testing.assert_allclose(out, lw.size, rtol=1e-5)


def test_conditional_ess_with_uniform_weights_is_ess_of_increments():
    inc = _log_weights(6, num_neg_inf=0)
    out = conditional_ess(jnp.zeros(inc.shape), inc)
    np.testing.assert_allclose(float(out), _ess_ref(inc), rtol=1e-4)


def test_conditional_ess_upper_bound_and_lower_values():
    # CESS <= n always (Cauchy-Schwarz); it can go below 1 (the docstring's [1, n] is only
    # the upper bound): W = (1 - eps, eps), v = (0, 1) gives n * eps.
    eps = 1e-3
    lw = jnp.log(jnp.asarray([1 - eps, eps]))
    inc = jnp.asarray([-jnp.inf, 0.0])
    np.testing.assert_allclose(float(conditional_ess(lw, inc)), 2 * eps, rtol=1e-4)
    for seed in range(3):
        lw = _log_weights(seed)
        inc = 4.0 * np.random.default_rng(seed).standard_normal(lw.size).astype(np.float32)
        assert 0.0 < float(conditional_ess(lw, inc)) <= lw.size * (1 + 1e-5)


def test_check_log_weights_accepts_valid():
    lw = _log_weights(0)
    assert check_log_weights(lw) is None
    assert check_log_weights(jnp.asarray(lw)) is None


def test_check_log_weights_all_neg_inf():
    with pytest.raises(ValueError, match=r"all 4 log_weights are -inf"):
        check_log_weights(np.full(4, -np.inf, np.float32))


def test_check_log_weights_nan():
    lw = _log_weights(0)
    lw[[3, 7]] = np.nan
    with pytest.raises(ValueError, match=r"my_w contains NaN \(2 of 64\)"):
        check_log_weights(lw, name="my_w")


@pytest.mark.parametrize("shape", [(), (0,), (3, 4), (1, 5)])
def test_check_log_weights_shape(shape):
    with pytest.raises(ValueError, match=r"shape \(n,\), got shape " + re.escape(str(shape))):
        check_log_weights(np.zeros(shape, np.float32))


def test_jit_matches_eager():
    lw = jnp.asarray(_log_weights(3))
    inc = jnp.asarray(np.random.default_rng(0).standard_normal(lw.size), jnp.float32)
    for fn, args in [
        (normalize_log_weights, (lw,)),
        (log_mean_exp, (lw,)),
        (ess, (lw,)),
        (log_ess, (lw,)),
        (conditional_ess, (lw, inc)),
    ]:
        np.testing.assert_allclose(jax.jit(fn)(*args), fn(*args), rtol=1e-6)


def test_vmap_over_batch_matches_numpy():
    batch = np.stack([_log_weights(s, n=32) for s in range(5)])
    incs = np.random.default_rng(9).standard_normal(batch.shape).astype(np.float32)
    np.testing.assert_allclose(jax.vmap(ess)(batch), [_ess_ref(b) for b in batch], rtol=RTOL)
    np.testing.assert_allclose(
        jax.vmap(conditional_ess)(batch, incs),
        [_cess_ref(b, i) for b, i in zip(batch, incs, strict=True)],
        rtol=1e-4,
    )
    norm = jax.jit(jax.vmap(normalize_log_weights))(batch)
    np.testing.assert_allclose(jax.scipy.special.logsumexp(norm, axis=1), np.zeros(5), atol=1e-5)
    np.testing.assert_allclose(
        jax.vmap(log_mean_exp)(batch), [_lse(b) - np.log(32) for b in batch], rtol=RTOL
    )


def test_grad_of_log_mean_exp_is_softmax():
    x = jnp.asarray(_log_weights(4, n=16, num_neg_inf=2))
    g = jax.grad(log_mean_exp)(x)
    w = np.exp(np.asarray(x, np.float64) - _lse(x))
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_check_log_weights_rejects_positive_infinity():
    with pytest.raises(ValueError, match=r"\+inf"):
        check_log_weights(np.array([0.0, np.inf, -1.0]))


def test_normalize_log_weights_with_posinf_shares_the_mass():
    out = np.asarray(normalize_log_weights(jnp.array([0.0, jnp.inf, -1.0, jnp.inf, -jnp.inf])))
    np.testing.assert_allclose(out, [-np.inf, -np.log(2.0), -np.inf, -np.log(2.0), -np.inf], rtol=1e-6)
    jitted = np.asarray(jax.jit(normalize_log_weights)(jnp.array([jnp.inf, 3.0])))
    np.testing.assert_array_equal(jitted, [0.0, -np.inf])
