"""Tweedie's formula against the closed-form posterior of a Gaussian-mixture prior."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.core import LinearSchedule
from feynkit.inference.diffusion.tweedie import (
    dae_score,
    score_jacobian,
    tweedie_covariance,
    tweedie_covariance_diag_hutchinson,
    tweedie_mean,
    tweedie_trace_hutchinson,
)
from feynkit.models import GaussianMixture


def gmm_posterior_moments(weights, means, covs, alpha, sigma, x):
    """Mean and covariance of x₀ | x_t for x₀ ~ Σ π_k N(μ_k, Σ_k), x_t = α x₀ + σ ε (float64).

    Component k: precision P_k = Σ_k⁻¹ + α²/σ² I, mean m_k = P_k⁻¹ (Σ_k⁻¹ μ_k + α/σ² x_t),
    responsibility ∝ π_k N(x_t; α μ_k, α² Σ_k + σ² I); then the mixture's moments.
    """
    w, mu, cov = (np.asarray(a, np.float64) for a in (weights, means, covs))
    x = np.asarray(x, np.float64)
    k, d = mu.shape
    a2, s2 = alpha**2, sigma**2
    out_m, out_c = [], []
    for xi in x:
        logr, ms, cs = np.zeros(k), [], []
        for j in range(k):
            marg = a2 * cov[j] + s2 * np.eye(d)
            diff = xi - alpha * mu[j]
            _, logdet = np.linalg.slogdet(marg)
            logr[j] = np.log(w[j]) - 0.5 * (diff @ np.linalg.solve(marg, diff) + logdet)
            prec = np.linalg.inv(cov[j]) + a2 / s2 * np.eye(d)
            c = np.linalg.inv(prec)
            ms.append(c @ (np.linalg.solve(cov[j], mu[j]) + alpha / s2 * xi))
            cs.append(c)
        r = np.exp(logr - logr.max())
        r /= r.sum()
        m = sum(r[j] * ms[j] for j in range(k))
        second = sum(r[j] * (cs[j] + np.outer(ms[j], ms[j])) for j in range(k))
        out_m.append(m)
        out_c.append(second - np.outer(m, m))
    return np.stack(out_m), np.stack(out_c)


def _mixture(d=3, k=3, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=2.0, size=(k, d))
    a = rng.normal(size=(k, d, d))
    covs = 0.3 * np.einsum("kij,klj->kil", a, a) + 0.2 * np.eye(d)
    weights = rng.uniform(0.2, 1.0, size=k)
    return GaussianMixture.create(weights, means, covs=covs), weights / weights.sum(), means, covs


def _points(gmm, alpha, sigma, n, seed):
    """Draws of x_t (NumPy: no per-op compilation in the test)."""
    rng = np.random.default_rng(seed)
    w, mu, cov = np.asarray(gmm.weights), np.asarray(gmm.means), np.asarray(gmm.covs)
    comp = rng.choice(len(w), size=n, p=w / w.sum())
    x0 = np.stack([rng.multivariate_normal(mu[c], cov[c]) for c in comp])
    return jnp.asarray(alpha * x0 + sigma * rng.normal(size=x0.shape), jnp.float32)


@pytest.mark.parametrize("t", [0.05, 0.3, 0.6])
def test_first_and_second_order_tweedie_match_closed_form(t):
    gmm, w, mu, cov = _mixture()
    sch = LinearSchedule()
    alpha, sigma = float(sch.alpha(t)), float(sch.sigma(t))
    x = _points(gmm, alpha, sigma, 16, seed=1)
    m_ref, c_ref = gmm_posterior_moments(w, mu, cov, alpha, sigma, x)

    @jax.jit
    def moments(gmm, x):
        score = gmm.noised(alpha, sigma).score
        return tweedie_mean(score, x, alpha, sigma), tweedie_covariance(score, x, alpha, sigma)

    mean, cov_hat = moments(gmm, x)
    assert mean.shape == x.shape and cov_hat.shape == (16, 3, 3)
    # float32: the mean divides by α; the covariance cancels I + σ²H, ~(σ²/α²)/|Cov| digits lost.
    scale_m = np.abs(m_ref).max()
    np.testing.assert_allclose(mean, m_ref, atol=2e-5 * scale_m / alpha)
    amplification = sigma**2 / alpha**2 / np.abs(c_ref).max()
    np.testing.assert_allclose(
        cov_hat, c_ref, atol=1e-5 * np.abs(c_ref).max() * max(1.0, amplification)
    )


def test_score_jacobian_keeps_event_shape_and_batches_rowwise():
    gmm, *_ = _mixture(d=4, k=2)
    x = _points(gmm, 1.0, 0.1, 5, seed=0)

    def img_score(z):  # images (n, 2, 2, 1): flattened row-major, same numbers
        return gmm.score(z.reshape(z.shape[0], 4)).reshape(z.shape)

    @jax.jit
    def jacobians(x):
        one = jax.jacfwd(lambda v: gmm.score(v[None])[0])(x[2])
        return score_jacobian(gmm.score, x), one, score_jacobian(img_score, x.reshape(5, 2, 2, 1))

    jac, jac_one, jac_img = jacobians(x)
    np.testing.assert_allclose(jac[2], jac_one, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jac_img, jac, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="batch"):
        tweedie_mean(gmm.score, x[0], 1.0, 0.5)


def _marginal_score(w, mu, cov, alpha, sigma):
    """The score of Σ π_k N(α μ_k, α² Σ_k + σ² I) with precisions precomputed in NumPy (the
    same function as GaussianMixture.score, cheaper to compile under jvp/vmap)."""
    d = mu.shape[1]
    marg = alpha**2 * cov + sigma**2 * np.eye(d)[None]
    prec = jnp.asarray(np.linalg.inv(marg), jnp.float32)
    logc = jnp.asarray(np.log(w) - 0.5 * np.linalg.slogdet(marg)[1], jnp.float32)
    means = jnp.asarray(alpha * mu, jnp.float32)

    def score(x):
        diff = means[None] - x[:, None, :]  # (n, K, d)
        pd = jnp.einsum("kij,nkj->nki", prec, diff)
        logr = logc[None] - 0.5 * jnp.sum(diff * pd, -1)
        r = jax.nn.softmax(logr, axis=-1)
        return jnp.sum(r[..., None] * pd, axis=1)

    return score


def test_hutchinson_diagonal_converges_within_probe_variance():
    gmm, w, mu, cov = _mixture(d=6, k=3, seed=2)
    alpha, sigma, k, reps = 0.8, 0.6, 16, 64
    x = _points(gmm, alpha, sigma, 8, seed=3)
    score = _marginal_score(w, mu, cov, alpha, sigma)
    np.testing.assert_allclose(score(x), gmm.noised(alpha, sigma).score(x), rtol=1e-4, atol=1e-5)

    @jax.jit
    def run(x):
        keys = jax.random.split(jax.random.key(0), reps)
        est = jax.vmap(
            lambda kk: tweedie_covariance_diag_hutchinson(kk, score, x, alpha, sigma, k)
        )(keys)
        tr = tweedie_trace_hutchinson(jax.random.key(5), score, x, alpha, sigma, 1024)
        return est, tr, tweedie_covariance(score, x, alpha, sigma), score_jacobian(score, x)

    est, tr, exact, h = (np.asarray(a, np.float64) for a in run(x))
    diag = np.diagonal(exact, axis1=1, axis2=2)
    off2 = np.sum(h**2, axis=2) - np.diagonal(h, axis1=1, axis2=2) ** 2  # Σ_{j≠i} H_ij²
    # per-entry std of the estimator: (σ⁴/α²) sqrt(Σ_{j≠i} H_ij² / K)
    std = sigma**4 / alpha**2 * np.sqrt(off2 / k)
    # 64 estimates with K = 16: the empirical spread matches the predicted std (±25%) ...
    ratio = np.sqrt(np.mean((est - diag) ** 2, axis=0)) / std
    assert 0.75 < np.sqrt(np.mean(ratio**2)) < 1.25
    # ... and their average (K = 1024) is within 5 std of the exact diagonal, 8× tighter.
    assert np.all(np.abs(est.mean(0) - diag) <= 5 * std / np.sqrt(reps) + 1e-5)
    tr_std = sigma**4 / alpha**2 * np.sqrt(2 * off2.sum(1) / 1024)
    assert np.all(np.abs(tr - np.trace(exact, axis1=1, axis2=2)) <= 5 * tr_std + 1e-4)


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    # Independent coordinates: the Hessian is diagonal, every Rademacher probe gives it exactly.
    gmm = GaussianMixture.create([1.0], np.zeros((1, 4)), covs=np.diag(np.arange(1.0, 5.0))[None])
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)
    alpha, sigma = 0.9, 0.4

    @jax.jit
    def run(x):
        score = gmm.noised(alpha, sigma).score
        exact = jnp.diagonal(tweedie_covariance(score, x, alpha, sigma), axis1=1, axis2=2)
        return exact, tweedie_covariance_diag_hutchinson(
            jax.random.key(1), score, x, alpha, sigma, 1
        )

    exact, est = run(x)
    np.testing.assert_allclose(est, exact, rtol=1e-5)
    with pytest.raises(ValueError, match="num_probes"):
        tweedie_trace_hutchinson(jax.random.key(1), gmm.score, x, alpha, sigma, 0)


def test_dae_score_of_the_optimal_denoiser_is_the_noised_score():
    gmm, w, mu, cov = _mixture(d=2, k=3, seed=4)
    sigma = 0.7
    y = _points(gmm, 1.0, sigma, 32, seed=0)

    def optimal_denoiser(z):  # r*(z) = E[x | z] for z = x + σ ε
        return jnp.asarray(gmm_posterior_moments(w, mu, cov, 1.0, sigma, z)[0], jnp.float32)

    np.testing.assert_allclose(
        dae_score(optimal_denoiser, y, sigma),
        jax.jit(gmm.noised(1.0, sigma).score)(y),
        rtol=1e-4,
        atol=1e-4,
    )
