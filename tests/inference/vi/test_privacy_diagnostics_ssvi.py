"""Bayesian DP ε posteriors, the posterior-collapse diagnostic and SSVI."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from feynkit.inference import vi
from feynkit.inference.vi import privacy, ssvi


def test_epsilon_from_rates_inverts_the_tradeoff_curve():
    for eps in (0.5, 1.0, 3.0):
        for fpr in (0.01, 0.1, 0.3):
            for delta in (0.0, 1e-3):
                a, b = privacy.rates_for_epsilon(eps, fpr, delta)
                if b <= 0:
                    continue
                np.testing.assert_allclose(privacy.epsilon_from_rates(a, b, delta), eps, rtol=1e-5)
    # a random guess certifies nothing
    assert float(privacy.epsilon_from_rates(0.5, 0.5)) == 0.0


def test_posterior_matches_beta_pushforward_and_intervals_nest():
    """The ε samples are the push-forward of Beta(1 + FP, 1 + n − FP) × Beta(1 + FN, 1 + n − FN):
    their median matches a float64 NumPy Monte Carlo reference within its error."""
    fp, fn, n = 40, 120, 500
    s = privacy.epsilon_posterior(jax.random.key(0), fp, n, fn, n, num_samples=40_000)
    rng = np.random.default_rng(0)
    a = rng.beta(1 + fp, 1 + n - fp, 40_000)
    b = rng.beta(1 + fn, 1 + n - fn, 40_000)
    ref = np.maximum(np.log((1 - a) / b), np.log((1 - b) / a))
    assert abs(float(jnp.median(s)) - np.median(ref)) < 0.01
    lo, hi = privacy.credible_interval(s, 0.95)
    c_lo, c_hi = privacy.clopper_pearson_interval(fp, n, fn, n, 0.0, 0.95)
    assert c_lo < lo < np.median(ref) < hi < c_hi
    # Clopper–Pearson rates: exact binomial tail at the bound
    a_cp = (1 - 0.95) / 2
    upper = stats.beta.ppf(1 - a_cp / 2, fp + 1, n - fp)
    np.testing.assert_allclose(stats.binom.cdf(fp, n, upper), a_cp / 2, rtol=1e-6)


@pytest.mark.slow
def test_bayesian_interval_covers_and_is_narrower():
    """400 simulated attacks at ε = 2 (n = 500 per class): 95% credible intervals cover the truth
    at 0.95 ± 0.035 (3 binomial standard errors) and are narrower than Clopper–Pearson."""
    eps, n, trials = 2.0, 500, 400
    fpr, fnr = privacy.rates_for_epsilon(eps, 0.05)
    rng = np.random.default_rng(1)
    fp, fn = rng.binomial(n, fpr, trials), rng.binomial(n, fnr, trials)
    s = privacy.epsilon_posterior(jax.random.key(1), fp, n, fn, n, num_samples=2000)
    lo, hi = (np.asarray(v) for v in privacy.credible_interval(s))
    c_lo, c_hi = privacy.clopper_pearson_interval(fp, n, fn, n)
    cover = np.mean((lo <= eps) & (eps <= hi))
    assert abs(cover - 0.95) < 0.035, cover
    assert np.mean(hi - lo) < 0.8 * np.mean(c_hi - c_lo)


def test_privacy_bad_input():
    with pytest.raises(ValueError, match="fp"):
        privacy.epsilon_posterior(jax.random.key(0), 11, 10, 1, 10)
    with pytest.raises(ValueError, match="delta"):
        privacy.epsilon_from_rates(0.1, 0.1, delta=1.0)
    with pytest.raises(ValueError, match="level"):
        privacy.clopper_pearson_interval(1, 10, 1, 10, level=1.5)
    with pytest.raises(ValueError, match="one shape"):
        privacy.epsilon_posterior(jax.random.key(0), np.array([1, 2]), 10, 1, 10)


def test_collapse_report_on_known_encoders():
    rng = np.random.default_rng(0)
    n, k = 500, 6
    mean = np.zeros((n, k))
    logvar = np.zeros((n, k))
    mean[:, :2] = rng.normal(size=(n, 2))  # two informative dimensions
    logvar[:, :2] = -2.0
    rep = vi.collapse_report(mean, logvar)
    kl_true = np.mean(0.5 * (np.exp(logvar) + mean**2 - 1 - logvar), 0)
    np.testing.assert_allclose(rep.kl_per_dim, kl_true, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(rep.collapsed_dims, [False, False, True, True, True, True])
    np.testing.assert_array_equal(rep.active_dims, [True, True, False, False, False, False])
    assert bool(rep.collapsed)  # 4 of 6 collapsed >= 1/2
    mean[:, 2:4] = rng.normal(size=(n, 2))
    assert not bool(vi.collapse_report(mean, logvar).collapsed)  # 2 of 6
    with pytest.raises(ValueError, match="mean and logvar"):
        vi.collapse_report(mean[0], logvar[0])
    with pytest.raises(ValueError, match="kl_threshold"):
        vi.collapse_report(mean, logvar, kl_threshold=0.0)


def test_ssvi_keeps_its_sparsity_and_learns():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(400, 20)), jnp.float32)
    w_true = rng.normal(size=(20, 3)) * (rng.random((20, 3)) < 0.2)
    y = jnp.asarray(np.argmax(np.asarray(x) @ w_true, -1))

    def apply(w, x):
        return x @ w["w"] + w["b"][None]

    init = {"w": jnp.zeros((20, 3)), "b": jnp.zeros(3)}
    state = ssvi.ssvi_train(
        jax.random.key(0),
        apply,
        init,
        x,
        y,
        density=0.25,
        num_steps=600,
        batch_size=64,
        learning_rate=0.05,
        update_every=100,
    )
    assert ssvi.active_count(state.masks) == round(0.25 * 60) + max(1, round(0.25 * 3))
    for m, mask in zip(jax.tree.leaves(state.mu), jax.tree.leaves(state.masks), strict=True):
        assert float(jnp.max(jnp.abs(jnp.where(mask, 0.0, m)))) == 0.0
    probs = ssvi.predictive_probs(jax.random.key(1), apply, state, x, 8)
    assert float(jnp.mean(jnp.argmax(probs, -1) == y)) > 0.8
    assert math.isfinite(float(jnp.sum(probs)))
    with pytest.raises(ValueError, match="density"):
        ssvi.random_masks(jax.random.key(0), init, 0.0)
