"""FK steering against the closed-form reward tilt of a Gaussian mixture, and best-of-N."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.core import LinearSchedule
from feynkit.inference import diffusion as dif
from feynkit.inference.smc.steering import best_of_n, fk_steering
from feynkit.models import GaussianMixture

SCHEDULE = LinearSchedule()
WEIGHTS = np.array([0.5, 0.5])
MEANS = np.array([[-2.0, 0.0], [2.0, 0.0]])
SCALE = 0.5
GMM = GaussianMixture.create(WEIGHTS, MEANS, scales=[SCALE, SCALE])
A = np.array([1.0, 0.5])


def eps_model(x, t):
    return -SCHEDULE.sigma(t[0]) * GMM.marginal(SCHEDULE, t[0]).score(x)


def reward(x):
    return x @ jnp.asarray(A, x.dtype)


def tilted(lam):
    """p(x) exp(λ aᵀx) for an isotropic mixture: component k keeps its covariance, its mean
    moves by λ s² a and its weight is multiplied by exp(λ aᵀμ_k + λ² s² ‖a‖²/2)."""
    logw = np.log(WEIGHTS) + lam * MEANS @ A + 0.5 * lam**2 * SCALE**2 * A @ A
    w = np.exp(logw - logw.max())
    w /= w.sum()
    return w, MEANS + lam * SCALE**2 * A


@pytest.fixture(scope="module")
def steered():
    x0 = jax.random.normal(jax.random.key(1), (2048, 2))
    ts = dif.time_grid(200, 1.0, 1e-3)
    run = jax.jit(
        lambda k, x: fk_steering(k, dif.ddim(SCHEDULE, 1.0), eps_model, x, ts, reward, lam=1.0)
    )
    return run(jax.random.key(2), x0)


def test_difference_potential_targets_the_tilt(steered):
    w_true, means_true = tilted(1.0)
    weights = np.exp(np.asarray(steered.log_weights, np.float64))
    x = np.asarray(steered.x, np.float64)
    # Monte Carlo std of the weighted mean with ESS ≥ ~1000 is ~0.03 per coordinate (the
    # tilted law's std is ≈ 0.6); the tolerance also covers the 200-step discretisation.
    np.testing.assert_allclose(weights @ x, w_true @ means_true, atol=0.1)
    right = weights @ (x[:, 0] > 0)
    assert abs(right - w_true[1]) < 0.015  # binomial std at n_eff ~ 1000: 0.004
    assert int(steered.nfe) == 201  # one evaluation per DDIM step plus the initial one


def test_zero_lambda_is_plain_sampling():
    x0 = jax.random.normal(jax.random.key(1), (256, 2))
    ts = dif.time_grid(20, 1.0, 1e-3)
    res = fk_steering(
        jax.random.key(0), dif.ddim(SCHEDULE, 1.0), eps_model, x0, ts, reward, lam=0.0
    )
    np.testing.assert_allclose(np.exp(res.log_weights), 1.0 / 256, rtol=1e-5)
    assert not bool(jnp.any(res.info.resampled))


def test_deterministic_solver_without_resampling_matches_sample():
    x0 = jax.random.normal(jax.random.key(1), (64, 2))
    ts = dif.time_grid(10, 1.0, 1e-3)
    solver = dif.ddim(SCHEDULE, 0.0)
    res = fk_steering(
        jax.random.key(0), solver, eps_model, x0, ts, reward, lam=0.5, ess_threshold=0.0
    )
    ref, _ = dif.sample(jax.random.key(0), solver, eps_model, x0, ts, denoise_final=True)
    np.testing.assert_allclose(res.x, ref, rtol=1e-5, atol=1e-5)
    # importance weights of the tilt: exp(λ r(x̂₀)) normalised
    lw = 0.5 * np.asarray(reward(ref), np.float64)
    np.testing.assert_allclose(
        np.exp(res.log_weights), np.exp(lw - lw.max()) / np.exp(lw - lw.max()).sum(), rtol=1e-3
    )


def test_best_of_n_brute_force():
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(12, 3))
    rewards = rng.normal(size=12)
    chosen, r = best_of_n(jnp.asarray(samples), jnp.asarray(rewards), 4)
    for g in range(3):
        i = 4 * g + int(np.argmax(rewards[4 * g : 4 * g + 4]))
        np.testing.assert_allclose(chosen[g], samples[i])
        assert r[g] == pytest.approx(rewards[i])
    with pytest.raises(ValueError, match="group_size"):
        best_of_n(jnp.asarray(samples), jnp.asarray(rewards), 5)


def test_bad_input():
    x0 = jnp.zeros((8, 2))
    ts = dif.time_grid(4)
    solver = dif.ddim(SCHEDULE, 1.0)  # stochastic: a deterministic one warns (see test_corrector)
    with pytest.raises(ValueError, match="potential"):
        fk_steering(jax.random.key(0), solver, eps_model, x0, ts, reward, potential="best")
    with pytest.raises(ValueError, match="reward_fn"):
        fk_steering(jax.random.key(0), solver, eps_model, x0, ts, lambda x: x)
