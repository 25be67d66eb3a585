"""Tests for feynkit.experiments.metrics: each metric against inputs with a known answer."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from feynkit.experiments import metrics

# --------------------------------------------------------------------------------------------
# Energy distance
# --------------------------------------------------------------------------------------------


def test_energy_distance_matches_scipy_1d_weighted():
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=300), rng.normal(0.5, 1.5, size=200)
    wu, wv = rng.uniform(size=300), rng.uniform(size=200)
    expected = scipy.stats.energy_distance(u, v, wu, wv)
    np.testing.assert_allclose(metrics.energy_distance(u, v, wu, wv), expected, rtol=1e-4)
    np.testing.assert_allclose(
        metrics.energy_distance(u, v), scipy.stats.energy_distance(u, v), rtol=1e-4
    )


def test_energy_distance_zero_translation_and_point_masses():
    x = jax.random.normal(jax.random.key(0), (256, 3))
    y = jax.random.normal(jax.random.key(1), (256, 3)) + 0.3
    assert float(metrics.energy_distance(x, x)) == 0.0
    shift = jnp.array([[1.0, -2.0, 0.5]])
    np.testing.assert_allclose(
        metrics.energy_distance(x + shift, y + shift), metrics.energy_distance(x, y), rtol=1e-4
    )
    # Point masses: D(δ_a, δ_b) = sqrt(2‖a − b‖).
    a, b = jnp.zeros((5, 2)), jnp.full((7, 2), 3.0)
    np.testing.assert_allclose(metrics.energy_distance(a, b), math.sqrt(2 * 3 * math.sqrt(2)))
    # Shifting one sample in 1-D matches scipy, and the distance grows with the shift.
    u = np.asarray(x[:, 0])
    values = [float(metrics.energy_distance(u, u + c)) for c in (0.1, 0.5, 2.0)]
    for c, val in zip((0.1, 0.5, 2.0), values, strict=True):
        np.testing.assert_allclose(val, scipy.stats.energy_distance(u, u + c), rtol=1e-4)
    assert values == sorted(values)


# --------------------------------------------------------------------------------------------
# Wasserstein
# --------------------------------------------------------------------------------------------


def test_wasserstein_1d_matches_scipy_unequal_sizes_and_weights():
    rng = np.random.default_rng(1)
    u, v = rng.normal(size=50), rng.exponential(size=37)
    wu, wv = rng.uniform(size=50), rng.uniform(size=37)
    np.testing.assert_allclose(
        metrics.wasserstein_1d(u, v), scipy.stats.wasserstein_distance(u, v), rtol=1e-4
    )
    np.testing.assert_allclose(
        metrics.wasserstein_1d(u, v, wu, wv),
        scipy.stats.wasserstein_distance(u, v, wu, wv),
        rtol=1e-4,
    )


def test_wasserstein_1d_closed_forms():
    # Quantile functions of {0, 1} and {0, 1/2, 1} differ by 1/2 on t ∈ [1/3, 2/3).
    u, v = jnp.array([1.0, 0.0]), jnp.array([0.5, 1.0, 0.0])
    np.testing.assert_allclose(metrics.wasserstein_1d(u, v, p=1), 1 / 6, rtol=1e-6)
    np.testing.assert_allclose(metrics.wasserstein_1d(u, v, p=2), math.sqrt(1 / 12), rtol=1e-6)
    # A translate is at distance |c| for every p, equal sizes or not.
    x = jax.random.normal(jax.random.key(0), (100,))
    for p in (1.0, 3.0):
        np.testing.assert_allclose(metrics.wasserstein_1d(x, x + 0.7, p=p), 0.7, rtol=1e-5)
    # Integer weights equal repetition.
    counts = np.array([1, 3, 2])
    z = jnp.array([0.0, 2.0, -1.0])
    np.testing.assert_allclose(
        metrics.wasserstein_1d(z, x, u_weights=counts, p=2),
        metrics.wasserstein_1d(jnp.repeat(z, counts), x, p=2),
        rtol=1e-5,
    )


def test_sliced_wasserstein_point_masses_and_shifts():
    key = jax.random.key(0)
    delta = jnp.array([3.0, -4.0])  # ‖Δ‖ = 5
    a, b = jnp.zeros((10, 2)), jnp.broadcast_to(delta, (13, 2))
    # SW_2 of δ_a, δ_b = ‖Δ‖ (E θ_1²)^{1/2} = ‖Δ‖/√d; SW_1 = ‖Δ‖ E|θ_1| = 2‖Δ‖/π in 2-D.
    sw2 = metrics.sliced_wasserstein(key, a, b, num_projections=4096, p=2)
    np.testing.assert_allclose(sw2, 5 / math.sqrt(2), rtol=0.02)
    sw1 = metrics.sliced_wasserstein(key, a, b, num_projections=4096, p=1)
    np.testing.assert_allclose(sw1, 2 * 5 / math.pi, rtol=0.02)
    x = jax.random.normal(jax.random.key(1), (500, 3))
    shift = jnp.array([[1.0, 2.0, -2.0]])  # ‖·‖ = 3
    sw = metrics.sliced_wasserstein(key, x, x + shift, num_projections=4096)
    np.testing.assert_allclose(sw, 3 / math.sqrt(3), rtol=0.02)
    assert float(metrics.sliced_wasserstein(key, x, x)) == 0.0


def test_sliced_wasserstein_1d_is_exact_and_weighted():
    rng = np.random.default_rng(2)
    u, v = rng.normal(size=64), rng.normal(1.0, 2.0, size=80)
    sw = metrics.sliced_wasserstein(jax.random.key(0), u, v, num_projections=3, p=1)
    np.testing.assert_allclose(sw, scipy.stats.wasserstein_distance(u, v), rtol=1e-4)
    counts = np.array([2, 1, 4])
    z = rng.normal(size=(3, 2))
    y = rng.normal(size=(40, 2))
    key = jax.random.key(9)
    np.testing.assert_allclose(
        metrics.sliced_wasserstein(key, z, y, x_weights=counts),
        metrics.sliced_wasserstein(key, np.repeat(z, counts, axis=0), y),
        rtol=1e-5,
    )


def test_sliced_wasserstein_jit_compiles_once():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def sw(key, x, y):
        return metrics.sliced_wasserstein(key, x, y, num_projections=32)

    x = jax.random.normal(jax.random.key(0), (64, 2))
    first = sw(jax.random.key(1), x, x + 1.0)
    second = sw(jax.random.key(1), x + 0.5, x + 1.5)
    np.testing.assert_allclose(first, second, rtol=1e-5)
    np.testing.assert_allclose(first, metrics.sliced_wasserstein(jax.random.key(1), x, x + 1.0, 32))


# --------------------------------------------------------------------------------------------
# Language-model baselines and conversions
# --------------------------------------------------------------------------------------------


def test_bigram_perplexity_periodic_sequence_near_one():
    seq = np.tile(np.arange(10, dtype=np.uint8), 10_000)
    ppl = metrics.bigram_perplexity(seq, seq)
    assert 1.0 < ppl < 1.05
    # Each context is seen ~10^4 times followed by one successor: p = (c + 1)/(c + 256).
    np.testing.assert_allclose(ppl, (10_000 + 256) / (10_000 + 1), rtol=1e-3)
    np.testing.assert_allclose(metrics.unigram_perplexity(seq, seq), 10.0, rtol=0.01)
    assert metrics.bigram_perplexity(seq, seq, alpha=1e-3) < 1.0001


def test_ngram_perplexity_uniform_bytes_near_256():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=2**21, dtype=np.uint8)
    test = rng.integers(0, 256, size=2**16, dtype=np.uint8)
    np.testing.assert_allclose(metrics.unigram_perplexity(train, test), 256, rtol=0.01)
    bigram = metrics.bigram_perplexity(train, test)
    assert 256 * 0.99 < bigram < 256 * 1.05


def test_ngram_on_python_source_beats_uniform():
    from feynkit.experiments.data import load_stdlib_corpus

    corpus = load_stdlib_corpus(max_bytes=500_000, fractions=(0.8, 0.1, 0.1))
    held_out = np.concatenate([corpus.validation, corpus.test])
    uni = metrics.unigram_perplexity(corpus.train, held_out)
    bi = metrics.bigram_perplexity(corpus.train, held_out)
    assert bi < uni < 256


def test_ngram_validation():
    with pytest.raises(ValueError):
        metrics.ngram_nll([0, 1, 256], [0, 1])
    with pytest.raises(ValueError):
        metrics.ngram_nll([0, 1], [0, 1], order=3)
    with pytest.raises(ValueError):
        metrics.ngram_nll([0, 1], [0, 1], alpha=0.0)


def test_nll_conversions():
    np.testing.assert_allclose(metrics.bits_per_byte(math.log(2.0)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(metrics.bits_per_byte(math.log(256.0)), 8.0, rtol=1e-6)
    np.testing.assert_allclose(metrics.bits_per_byte(math.log(16.0), bytes_per_token=4), 1.0)
    np.testing.assert_allclose(metrics.perplexity_from_nll(math.log(256.0)), 256.0, rtol=1e-5)
    nll = jnp.array([0.0, 1.0])
    np.testing.assert_allclose(metrics.perplexity_from_nll(nll), np.exp([0.0, 1.0]), rtol=1e-6)
    # Uniform over 256 bytes: perplexity 256, 8 bits per byte, from the same NLL.
    nll = metrics.ngram_nll(np.arange(256), np.arange(256), order=1)
    np.testing.assert_allclose(metrics.bits_per_byte(nll), 8.0, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------


def _fd_reference(mu_a, cov_a, mu_b, cov_b):
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * covmean)


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_gaussians_closed_forms():
    rng = np.random.default_rng(0)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    cov_a, cov_b = _random_spd(rng, 6), _random_spd(rng, 6)
    np.testing.assert_allclose(
        metrics.frechet_distance_gaussians(mu_a, cov_a, mu_b, cov_b),
        _fd_reference(mu_a, cov_a, mu_b, cov_b),
        rtol=1e-8,
    )
    # Commuting (diagonal) covariances: Σ (√a_i − √b_i)².
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    np.testing.assert_allclose(
        metrics.frechet_distance_gaussians(np.zeros(3), np.diag(a), np.ones(3), np.diag(b)),
        3.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2),
        rtol=1e-12,
    )


def test_frechet_distance_from_samples_matches_closed_form():
    rng = np.random.default_rng(1)
    mu_a, mu_b = np.array([0.0, 1.0, -1.0]), np.array([1.5, 0.0, 0.5])
    cov_a = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 0.5]])
    cov_b = np.array([[1.0, -0.2, 0.1], [-0.2, 3.0, 0.0], [0.1, 0.0, 1.5]])
    fa = rng.multivariate_normal(mu_a, cov_a, size=200_000)
    fb = rng.multivariate_normal(mu_b, cov_b, size=200_000)
    expected = _fd_reference(mu_a, cov_a, mu_b, cov_b)
    got = metrics.frechet_distance(fa, fb)
    np.testing.assert_allclose(got, expected, rtol=0.02)
    np.testing.assert_allclose(metrics.frechet_distance(fb, fa), got, rtol=1e-8)


def test_frechet_distance_identical_and_degenerate_features():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(500, 8)).astype(np.float32)
    assert metrics.frechet_distance(f, f) == 0.0
    assert metrics.frechet_distance(f, f.copy()) == 0.0
    nearly = metrics.frechet_distance(f, f + 1e-7)
    assert 0.0 <= nearly < 1e-6
    # Fewer samples than dimensions: singular covariances stay finite and nonnegative.
    few_a, few_b = rng.normal(size=(5, 16)), rng.normal(size=(6, 16))
    value = metrics.frechet_distance(few_a, few_b)
    assert np.isfinite(value) and value >= 0.0
    with pytest.raises(ValueError):
        metrics.frechet_distance(f[:1], f)
