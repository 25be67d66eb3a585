"""Tempered and waste-free SMC: log Ẑ against the closed form of a Gaussian prior × likelihood."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.inference.smc import moves
from feynkit.inference.smc.tempered import next_temperature, tempered_smc
from feynkit.inference.smc.waste_free import waste_free_smc

D, SIGMA = 2, 0.5
Y = jnp.asarray([1.0, -0.5])
SEEDS = 128


def _logprior(x):
    return -0.5 * jnp.sum(x**2)  # unnormalised: Z is relative to N(0, I)'s density × (2π)^{d/2}


def _loglik(x):
    return -0.5 * jnp.sum((x - Y) ** 2) / SIGMA**2


def _log_z():
    # ∫ N(x; 0, I) exp(−|x − y|²/(2σ²)) dx = (σ²/(1+σ²))^{d/2} exp(−|y|²/(2(1+σ²)))
    s2 = SIGMA**2
    return 0.5 * D * np.log(s2 / (1 + s2)) - float(jnp.sum(Y**2)) / (2 * (1 + s2))


def _prior_draws(key, n):
    return jax.random.normal(key, (n, D))


def _check_bias(log_z_hat):
    err = np.asarray(log_z_hat, np.float64) - _log_z()
    se = err.std(ddof=1) / np.sqrt(err.size)
    assert abs(err.mean()) < 2 * se + 1e-3, (err.mean(), se)
    return err.mean(), se


@pytest.mark.parametrize("adaptive", [False, True])
def test_tempered_log_normalizer_closed_form(adaptive):
    betas = None if adaptive else jnp.linspace(0.0, 1.0, 11) ** 2
    move = moves.mala(0.15)

    def one(key):
        state, steps = tempered_smc(
            key,
            _prior_draws(jax.random.fold_in(key, 1), 512),
            _logprior,
            _loglik,
            move,
            betas=betas,
            target_ess=0.5,
            num_mcmc_steps=2,
        )
        return state.log_normalizer, state.shared.beta, steps

    lz, beta, steps = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(0), SEEDS))
    np.testing.assert_array_equal(beta, 1.0)
    _check_bias(lz)
    if adaptive:
        assert 2 <= int(steps.min()) and int(steps.max()) < 30


def test_waste_free_log_normalizer_closed_form():
    def one(key):
        state, _ = waste_free_smc(
            key,
            _prior_draws(jax.random.fold_in(key, 1), 512),
            _logprior,
            _loglik,
            moves.random_walk(0.4),
            num_resampled=64,
        )
        return state.log_normalizer, state.shared.beta, state.particles

    lz, beta, x = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(1), SEEDS))
    np.testing.assert_array_equal(beta, 1.0)
    _check_bias(lz)
    # final particles: the Gaussian posterior N(y/(1+σ²), σ²/(1+σ²) I)
    s2 = SIGMA**2
    np.testing.assert_allclose(np.mean(x, axis=(0, 1)), Y / (1 + s2), atol=0.02)
    np.testing.assert_allclose(np.var(x, axis=(0, 1)), s2 / (1 + s2), rtol=0.05)


def test_next_temperature_hits_target_conditional_ess():
    from feynkit.core import conditional_ess

    rng = np.random.default_rng(0)
    ll = jnp.asarray(-30.0 * rng.random(1000) ** 2)
    lw = jnp.asarray(0.3 * rng.standard_normal(1000))
    lw = lw - jax.scipy.special.logsumexp(lw)
    b = jax.jit(next_temperature)(jnp.asarray(0.2), lw, ll, 0.7)
    assert 0.2 < float(b) < 1.0
    np.testing.assert_allclose(conditional_ess(lw, (b - 0.2) * ll), 700.0, rtol=1e-4)
    assert float(next_temperature(jnp.asarray(0.2), lw, 1e-6 * ll, 0.7)) == 1.0


def test_bad_schedule_rejected():
    with pytest.raises(ValueError, match="betas must be a strictly increasing vector from 0 to 1"):
        tempered_smc(
            jax.random.key(0),
            jnp.zeros((4, 2)),
            _logprior,
            _loglik,
            moves.mala(0.1),
            betas=[0.0, 0.5, 0.4, 1.0],
        )
    with pytest.raises(ValueError, match="target_ess"):
        tempered_smc(
            jax.random.key(0),
            jnp.zeros((4, 2)),
            _logprior,
            _loglik,
            moves.mala(0.1),
            target_ess=1.5,
        )
    with pytest.raises(ValueError, match="multiple"):
        waste_free_smc(
            jax.random.key(0),
            jnp.zeros((10, 2)),
            _logprior,
            _loglik,
            moves.mala(0.1),
            num_resampled=4,
        )
