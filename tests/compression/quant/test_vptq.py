"""VPTQ: k-means against closed forms and brute force, VQ exactness, 2-bit error vs RTN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.compression.quant.qarray import fake_quantize
from feynkit.compression.quant.vptq import (
    VQArray,
    kmeans,
    vptq_quantize,
    vq_assign,
    vq_bits_per_weight,
    vq_dequantize,
)


def test_kmeans_recovers_separated_clusters_and_is_deterministic():
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 5.0, 5.0], [-5.0, 5.0, 0.0]])
    x = np.repeat(centers, 50, axis=0) + 0.05 * rng.normal(size=(200, 3))
    res = kmeans(jax.random.key(0), x, 4, num_iters=10)
    got = np.asarray(res.centroids)
    order = [int(np.argmin(np.sum((got - c) ** 2, 1))) for c in centers]
    assert sorted(order) == [0, 1, 2, 3]
    np.testing.assert_allclose(got[order], centers, atol=0.03)
    # inertia is the within-cluster sum of squares of the returned labelling
    lab = np.asarray(res.labels)
    assert float(res.inertia) == pytest.approx(np.sum((x - got[lab]) ** 2), rel=1e-4)
    again = kmeans(jax.random.key(0), x, 4, num_iters=10)
    np.testing.assert_array_equal(again.centroids, res.centroids)


def test_weighted_single_centroid_is_the_weighted_mean():
    rng = np.random.default_rng(1)
    x, h = rng.normal(size=(64, 5)), rng.uniform(0.1, 3.0, 64)
    for init in ("kmeans++", "random"):
        res = kmeans(jax.random.key(1), x, 1, weights=h, num_iters=2, init=init)
        np.testing.assert_allclose(res.centroids[0], h @ x / h.sum(), rtol=1e-5, atol=1e-6)


def test_lloyd_iterations_do_not_increase_the_objective():
    x = np.random.default_rng(2).normal(size=(400, 4))
    inertia = [float(kmeans(jax.random.key(3), x, 16, num_iters=t).inertia) for t in (0, 1, 5, 20)]
    assert all(a >= b - 1e-4 for a, b in zip(inertia, inertia[1:], strict=False))
    assert inertia[-1] < 0.9 * inertia[0]


def test_vq_assign_is_brute_force_nearest():
    rng = np.random.default_rng(3)
    x, c = rng.normal(size=(300, 4)), rng.normal(size=(17, 4))
    brute = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(vq_assign(x, c), brute)


def test_vq_is_exact_when_the_codebook_covers_all_vectors():
    rng = np.random.default_rng(4)
    atoms = np.round(rng.normal(size=(8, 4)), 2)  # 8 distinct vectors, fp16-representable enough
    w = atoms[rng.integers(0, 8, size=(32, 16))].reshape(32, 64).astype(np.float32)
    q = vptq_quantize(jax.random.key(0), w, vector_len=4, num_centroids=8, kmeans_iters=10)
    assert isinstance(q, VQArray) and q.shape == (32, 64) and q.indices.shape == (32, 16)
    np.testing.assert_allclose(vq_dequantize(q), w, atol=2e-3)


def _layer(seed=5, d_in=64, d_out=64, n=1024):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, d_in)) * np.exp(rng.normal(size=d_in))[None]).astype(np.float32)
    w = (rng.standard_t(5, size=(d_in, d_out)) / np.sqrt(d_in)).astype(np.float32)
    return w, (2.0 / n * x.T @ x).astype(np.float32)


def _proxy(w, wh, H):
    d = np.asarray(w, np.float64) - np.asarray(wh, np.float64)
    return float(np.trace(d.T @ H @ d) / np.trace(w.T @ H @ w))


def test_vptq_residual_stage_and_bits():
    w, H = _layer(6, d_in=32, d_out=32, n=256)
    q = vptq_quantize(jax.random.key(0), w, H, vector_len=4, num_centroids=16, num_res_centroids=8)
    assert q.res_indices.shape == q.indices.shape == (32, 8) and q.codebook.dtype == jnp.float16
    assert vq_bits_per_weight(q) == pytest.approx(7 / 4 + 16 * 24 * 4 / w.size)
    first = VQArray(q.indices, q.codebook, dtype=q.dtype)
    assert _proxy(w, vq_dequantize(q), H) < _proxy(w, vq_dequantize(first), H)


@pytest.mark.slow
def test_vptq_two_bits_beats_rtn_and_residual_helps():
    w, H = _layer()
    key = jax.random.key(0)
    q = vptq_quantize(key, w, H, vector_len=4, num_centroids=64)  # 1.5 + 1.0 codebook bits
    qr = vptq_quantize(key, w, H, vector_len=4, num_centroids=64, num_res_centroids=16)
    plain = vptq_quantize(key, w, vector_len=4, num_centroids=64)
    bits = vq_bits_per_weight(q)
    assert bits == pytest.approx(6 / 4 + 16 * 64 * 4 / w.size)
    assert vq_bits_per_weight(qr) == pytest.approx(10 / 4 + 16 * 80 * 4 / w.size)
    rtn2 = _proxy(w, fake_quantize(w, 2, group_size=32, axis=0, symmetric=False), H)
    e_plain, e_vq, e_res = (_proxy(w, vq_dequantize(a), H) for a in (plain, q, qr))
    assert e_vq < e_plain  # Hessian weighting + OBS feedback lower the proxy loss
    assert e_vq < 0.6 * rtn2  # 2.5 bits (incl. a per-matrix codebook) vs RTN at 2 + 32/32 bits
    assert e_res < 0.7 * e_vq


def test_bad_inputs():
    w, H = _layer()
    with pytest.raises(ValueError, match="vector_len"):
        vptq_quantize(jax.random.key(0), w, H, vector_len=5)
    with pytest.raises(ValueError, match="num_centroids"):
        vptq_quantize(jax.random.key(0), w[:2, :8], vector_len=4, num_centroids=8)
    with pytest.raises(ValueError, match="H must be"):
        vptq_quantize(jax.random.key(0), w, H[:5, :5])
    with pytest.raises(ValueError, match="k="):
        kmeans(jax.random.key(0), jnp.ones((3, 2)), 4)
