"""Noise2Score against conjugate-prior posteriors, with the exact score of the noisy marginal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special, stats

from feynkit.inference.diffusion.noise2score import (
    noise2score_gamma,
    noise2score_gaussian,
    noise2score_poisson,
)
from feynkit.models import GaussianMixture


def test_gaussian_prior_gives_the_posterior_mean_exactly():
    m, s2, sigma = 0.3, 1.7, 0.8
    y = jnp.linspace(-4.0, 4.0, 33)
    score = lambda y: -(y - m) / (s2 + sigma**2)  # p(y) = N(m, s² + σ²)
    post_mean = m + s2 / (s2 + sigma**2) * (np.asarray(y, np.float64) - m)
    np.testing.assert_allclose(
        noise2score_gaussian(score, y, sigma), post_mean, rtol=1e-6, atol=1e-6
    )


def test_gaussian_mixture_prior_gives_the_posterior_mean():
    # E[x | y] of a mixture prior: Σ_k r_k(y) (posterior mean of component k), in float64.
    w, mu, s = np.array([0.3, 0.7]), np.array([-2.0, 1.5]), np.array([0.5, 1.0])
    sigma = 0.6
    gmm = GaussianMixture.create(w, mu[:, None], scales=s)
    y = np.linspace(-4.0, 4.0, 41)
    v = s**2 + sigma**2
    logr = np.log(w) - 0.5 * np.log(v) - 0.5 * (y[:, None] - mu) ** 2 / v
    r = np.exp(logr - special.logsumexp(logr, axis=1, keepdims=True))
    post = np.sum(r * (mu + s**2 / v * (y[:, None] - mu)), axis=1)
    score = jax.jit(gmm.noised(1.0, sigma).score)
    est = noise2score_gaussian(score, jnp.asarray(y[:, None], jnp.float32), sigma)[:, 0]
    np.testing.assert_allclose(est, post, atol=2e-5)


def _poisson_setup(a=3.0, b=0.5, zeta=0.1):
    """λ = x/ζ ~ Gamma(a, rate b); z = y/ζ ~ Poisson(λ) is negative binomial. Its continuous
    extension log p(z) = lgamma(z + a) − lgamma(z + 1) − z log(b + 1) + const has the score
    ψ(z + a) − ψ(z + 1) − log(b + 1) in z, i.e. that / ζ in y."""

    def score_y(y):
        z = y / zeta
        return (
            jax.scipy.special.digamma(z + a) - jax.scipy.special.digamma(z + 1.0) - np.log(b + 1)
        ) / zeta

    return a, b, zeta, score_y


def test_poisson_negative_binomial_marginal_is_what_the_score_differentiates():
    a, b, zeta, _ = _poisson_setup()
    z = np.arange(0, 30)
    logp = special.gammaln(z + a) - special.gammaln(z + 1) - special.gammaln(a)
    logp += a * np.log(b / (b + 1)) - z * np.log(b + 1)
    np.testing.assert_allclose(logp, stats.nbinom.logpmf(z, a, b / (b + 1)), rtol=1e-10)


def test_poisson_is_the_posterior_geometric_mean_up_to_the_digamma_approximation():
    a, b, zeta, score = _poisson_setup()
    z = np.arange(1, 40, dtype=np.float64)
    y = jnp.asarray(zeta * z, jnp.float32)
    est = np.asarray(noise2score_poisson(score, y, zeta), np.float64)
    # posterior λ | z ~ Gamma(a + z, b + 1): exp E[log x | y] = ζ exp(ψ(a + z)) / (b + 1)
    geo = zeta * np.exp(special.digamma(a + z)) / (b + 1)
    # Noise2Score uses log(z + ½) for ψ(z + 1): |ψ(z+1) − log(z+½)| ≤ 1/(24 (z+½)²) (+ float32)
    np.testing.assert_array_less(np.abs(np.log(est / geo)), 1 / (24 * (z + 0.5) ** 2) + 1e-5)
    # and so it sits below the posterior mean E[x | y] = ζ (a + z)/(b + 1) by ≈ 1/(2(a + z)):
    # an approximation of the posterior mean with relative bias O(1/(a + z)).
    mean = zeta * (a + z) / (b + 1)
    rel = 1 - est / mean
    assert np.all(rel > 0) and np.all(rel < 1 / (a + z))
    assert np.all(np.abs(rel - 1 / (2 * (a + z))) < 0.05 / (a + z))


def test_gamma_noise_is_the_exact_posterior_harmonic_mean():
    # θ = 1/x ~ Gamma(a, rate b), y | x ~ Gamma(k, rate k θ) (mean x): posterior θ | y ~
    # Gamma(a + k, b + k y) and p(y) ∝ y^(k−1) (b + k y)^(−(a+k)).
    a, b, k = 4.0, 2.0, 6.0
    score = lambda y: (k - 1) / y - k * (a + k) / (b + k * y)
    y = np.linspace(0.05, 3.0, 25)
    # the closed-form marginal (checked by quadrature) is what `score` differentiates
    for yi in (0.3, 1.2):
        dens = lambda th, yy: (
            stats.gamma.pdf(yy, k, scale=1 / (k * th)) * stats.gamma.pdf(th, a, scale=1 / b)
        )
        logp = lambda yy: np.log(integrate.quad(dens, 0, np.inf, args=(yy,))[0])
        fd = (logp(yi + 1e-5) - logp(yi - 1e-5)) / 2e-5
        assert fd == pytest.approx(score(yi), rel=1e-4)
    est = np.asarray(noise2score_gamma(score, jnp.asarray(y, jnp.float32), k), np.float64)
    np.testing.assert_allclose(1 / est, (a + k) / (b + k * y), rtol=1e-5)  # E[1/x | y], exact
    # the posterior mean is larger by the factor (a + k)/(a + k − 1)
    np.testing.assert_allclose(est * (a + k) / (a + k - 1), (b + k * y) / (a + k - 1), rtol=1e-5)


def test_noise2score_jits_and_rejects_bad_parameters():
    score = lambda y: -y
    y = jnp.linspace(0.1, 2.0, 8)
    for fn, p in (
        (noise2score_gaussian, 0.5),
        (noise2score_poisson, 0.1),
        (noise2score_gamma, 3.0),
    ):
        jitted = jax.jit(lambda y, fn=fn, p=p: fn(score, y, p))
        np.testing.assert_allclose(jitted(y), fn(score, y, p), rtol=1e-6)
        with pytest.raises(ValueError, match="> 0"):
            fn(score, y, -1.0)
