"""Gaussian mixtures against float64 SciPy/NumPy references; exact samplers against quadrature."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from feynkit.core import LinearSchedule
from feynkit.models import GaussianMixture, sample_guided, sample_tempered

RNG = np.random.default_rng(0)
COVS = np.stack(
    [np.array([[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 0.8]]), np.diag([0.4, 1.2, 0.7])]
)
G = GaussianMixture.create([0.35, 0.65], [[0.0, 1.0, -1.0], [2.0, -1.0, 0.5]], covs=COVS)


def _ref_logpdf(x, w, means, covs):
    dens = sum(
        wk * multivariate_normal(m, c).pdf(x) for wk, m, c in zip(w, means, covs, strict=True)
    )
    return np.log(dens)


def test_log_prob_and_score_against_scipy():
    x = RNG.normal(size=(7, 3)) * 2
    ref = _ref_logpdf(x, [0.35, 0.65], np.asarray(G.means), COVS)
    np.testing.assert_allclose(G.log_prob(x), ref, rtol=1e-5, atol=1e-5)
    # score against central differences of the float64 reference
    eps = 1e-5
    num = np.stack(
        [
            (
                _ref_logpdf(x + eps * e, [0.35, 0.65], np.asarray(G.means), COVS)
                - _ref_logpdf(x - eps * e, [0.35, 0.65], np.asarray(G.means), COVS)
            )
            / (2 * eps)
            for e in np.eye(3)
        ],
        -1,
    )
    np.testing.assert_allclose(G.score(x), num, rtol=1e-3, atol=1e-3)
    assert G.log_prob(x[0]).shape == () and G.score(x[:2][None]).shape == (1, 2, 3)


def test_noised_marginal_matches_forward_process():
    sched = LinearSchedule()
    t = 0.3
    m = G.marginal(sched, t)
    a, s = float(sched.alpha(t)), float(sched.sigma(t))
    np.testing.assert_allclose(m.mean(), a * np.asarray(G.mean()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        m.covariance(), a**2 * np.asarray(G.covariance()) + s**2 * np.eye(3), rtol=1e-5, atol=1e-6
    )
    # Monte Carlo: noise real draws and compare moments
    x0 = G.sample(jax.random.key(0), 200_000)
    xt = a * x0 + s * jax.random.normal(jax.random.key(1), x0.shape)
    np.testing.assert_allclose(np.cov(np.asarray(xt).T), m.covariance(), atol=0.02)


def test_mixture_moments_from_samples():
    x = np.asarray(G.sample(jax.random.key(2), 200_000), np.float64)
    np.testing.assert_allclose(x.mean(0), G.mean(), atol=0.01)
    np.testing.assert_allclose(np.cov(x.T), G.covariance(), atol=0.02)


def test_product_is_the_normalised_pointwise_product():
    h = GaussianMixture.create([0.5, 0.2, 0.3], RNG.normal(size=(3, 3)), scales=[0.7, 1.0, 1.3])
    prod, log_z = G.product(h)
    assert prod.num_components == 6
    x = RNG.normal(size=(9, 3))
    np.testing.assert_allclose(
        prod.log_prob(x), G.log_prob(x) + h.log_prob(x) - log_z, rtol=1e-4, atol=1e-4
    )


def test_product_normaliser_by_quadrature_1d():
    a = GaussianMixture.create([0.4, 0.6], [[-1.0], [1.5]], scales=[0.5, 0.9])
    b = GaussianMixture.create([0.7, 0.3], [[0.0], [2.0]], scales=[1.1, 0.4])
    grid = np.linspace(-10, 10, 40001)
    dens = np.exp(
        np.asarray(a.log_prob(grid[:, None]), np.float64)
        + np.asarray(b.log_prob(grid[:, None]), np.float64)
    )
    np.testing.assert_allclose(a.product(b)[1], np.log(dens.sum() * (grid[1] - grid[0])), rtol=1e-4)


def test_modes_are_stationary_points():
    modes = G.modes()
    np.testing.assert_allclose(G.score(modes), 0.0, atol=1e-3)


def _quad_moments(log_density):
    grid = np.linspace(-8, 8, 20001)
    lp = np.asarray(log_density(jnp.asarray(grid[:, None])), np.float64)
    d = np.exp(lp - lp.max())
    d /= d.sum()
    mean = (grid * d).sum()
    return mean, ((grid - mean) ** 2 * d).sum()


def test_exact_samplers_match_quadrature():
    p = GaussianMixture.create([0.3, 0.7], [[-1.5], [1.0]], scales=[0.5, 0.8])
    x = np.asarray(sample_tempered(jax.random.key(0), p, 3.0, 50_000)[:, 0], np.float64)
    mean, var = _quad_moments(lambda z: 3.0 * p.log_prob(z))
    # standard error of the mean ~ sqrt(var / 5e4) < 0.005
    np.testing.assert_allclose([x.mean(), x.var()], [mean, var], atol=0.02)
    cond = p.select([0])
    y = np.asarray(sample_guided(jax.random.key(1), cond, p, 2.5, 0.3, 50_000)[:, 0], np.float64)
    mean, var = _quad_moments(lambda z: 2.5 * cond.log_prob(z) - 1.5 * p.log_prob(z))
    np.testing.assert_allclose([y.mean(), y.var()], [mean, var], atol=0.02)


def test_bad_input():
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        GaussianMixture.create([1.0, 2.0, 3.0], [[0.0], [1.0]], scales=1.0)
    with pytest.raises(ValueError, match="exactly one of covs"):
        GaussianMixture.create([1.0], [[0.0]])
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture.create([1.0], [[0.0, 0.0]], covs=[[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(ValueError, match="trailing dimension 3"):
        G.log_prob(jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="beta >= 1"):
        sample_tempered(jax.random.key(0), G, 0.5, 10)
    with pytest.raises(ValueError, match="envelope"):
        # cond_mass far too large for this pair: the bound p(c|x) <= 1 is violated
        sample_guided(jax.random.key(0), G.select([0]), G, 2.0, 1.0, 10)
