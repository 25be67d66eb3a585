"""DARE / Super Mario merging / DAREx-q: unbiasedness, exact zeros, merging, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.compression.prune.dare import (
    dare,
    dare_delta,
    dare_merge,
    darex_q_search,
    merge_deltas,
    task_vector,
)


def _trees(key):
    k1, k2 = jax.random.split(key)
    base = {"a": {"kernel": jax.random.normal(k1, (8, 6))}, "b": jnp.arange(5.0)}
    ft = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(k2, x.shape), base)
    return base, ft


def test_dare_expectation_preserved(key):
    # E[δ̂] = δ: the mean over 2000 independent masks is within 5 standard errors of δ, where
    # sd(δ̂_i) = |δ_i| sqrt(p / (1 − p)).
    base, ft = _trees(key)
    delta = task_vector(base, ft)
    p, n = 0.7, 2000
    keys = jax.random.split(jax.random.key(1), n)
    draws = jax.jit(jax.vmap(lambda k: dare_delta(k, delta, p)))(keys)
    for mean, d in zip(
        jax.tree.leaves(jax.tree.map(lambda x: x.mean(0), draws)),
        jax.tree.leaves(delta),
        strict=True,
    ):
        se = np.abs(np.asarray(d)) * np.sqrt(p / (1 - p)) / np.sqrt(n)
        np.testing.assert_array_less(np.abs(np.asarray(mean - d)), 5 * se + 1e-12)


def test_dare_exact_zeros_and_rescale(key):
    base, ft = _trees(key)
    delta = task_vector(base, ft)
    p = 0.9
    out = dare(jax.random.key(3), base, ft, p)
    sparse = task_vector(base, out)
    d = np.asarray(delta["a"]["kernel"])
    # kept entries are δ / (1 − p) (up to the add/subtract of the base), dropped ones exactly θ_0
    s = np.asarray(dare_delta(jax.random.key(3), delta, p)["a"]["kernel"])
    kept = s != 0
    assert np.array_equal(
        np.asarray(out["a"]["kernel"])[~kept], np.asarray(base["a"]["kernel"])[~kept]
    )
    np.testing.assert_allclose(s[kept], d[kept] / (1 - p), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sparse["a"]["kernel"]), s, atol=1e-6)
    # drop fraction: binomial test on a large leaf (n = 20000, 5 sd)
    big = {"w": jnp.ones((200, 100))}
    frac = float(jnp.mean(dare_delta(jax.random.key(4), big, p)["w"] == 0))
    assert abs(frac - p) < 5 * np.sqrt(p * (1 - p) / 20000)
    # no rescale: survivors are δ itself
    s0 = np.asarray(dare_delta(jax.random.key(3), delta, p, rescale=False)["a"]["kernel"])
    np.testing.assert_array_equal(s0[kept], d[kept])
    # p = 0 keeps the fine-tune exactly
    np.testing.assert_allclose(
        np.asarray(dare(key, base, ft, 0.0)["b"]), np.asarray(ft["b"]), rtol=1e-6
    )


def test_dare_where_and_jit(key):
    base, ft = _trees(key)
    out = dare(key, base, ft, 0.5, where=r"a/kernel")
    np.testing.assert_array_equal(np.asarray(out["b"]), np.asarray(ft["b"]))
    f = jax.jit(lambda k, b, f: dare(k, b, f, 0.5))
    np.testing.assert_array_equal(
        np.asarray(f(key, base, ft)["a"]["kernel"]),
        np.asarray(dare(key, base, ft, 0.5)["a"]["kernel"]),
    )


def test_merge_deltas_closed_form(key):
    base, ft = _trees(key)
    _, ft2 = _trees(jax.random.key(7))
    d1, d2 = task_vector(base, ft), task_vector(base, ft2)
    m = merge_deltas(base, [d1, d2], [1.0, 0.5])
    np.testing.assert_allclose(
        np.asarray(m["b"]), np.asarray(base["b"] + d1["b"] + 0.5 * d2["b"]), rtol=1e-6
    )
    avg = merge_deltas(base, [d1, d2])  # averaging = mean of the fine-tuned models
    np.testing.assert_allclose(
        np.asarray(avg["a"]["kernel"]),
        np.asarray((ft["a"]["kernel"] + ft2["a"]["kernel"]) / 2),
        atol=1e-6,
    )
    # dare_merge with p = 0 is plain merging
    np.testing.assert_allclose(
        np.asarray(dare_merge(key, base, [ft, ft2], 0.0)["b"]), np.asarray(avg["b"]), atol=1e-6
    )


def test_darex_q_search_finds_the_grid_minimum():
    best, values = darex_q_search(lambda q: (q - 0.3) ** 2, 0.9, np.linspace(0.1, 1.0, 10))
    assert best == pytest.approx(0.3) and len(values) == 10


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan")])
def test_bad_drop_rate(key, p):
    base, ft = _trees(key)
    with pytest.raises(ValueError, match="drop_rate"):
        dare(key, base, ft, p)


def test_bad_input(key):
    base, ft = _trees(key)
    with pytest.raises(ValueError, match="shape"):
        dare(key, base, {"a": {"kernel": jnp.zeros((8, 5))}, "b": ft["b"]}, 0.5)
    with pytest.raises(ValueError, match="structure"):
        dare(key, base, {"a": ft["a"]}, 0.5)
    with pytest.raises(ValueError, match="q must lie"):
        dare(key, base, ft, 0.5, q=1.5)
    with pytest.raises(ValueError, match="matches no parameter"):
        dare(key, base, ft, 0.5, where="nothing")
    with pytest.raises(ValueError, match="static"):
        jax.jit(lambda p: dare(key, base, ft, p))(0.5)
    with pytest.raises(ValueError, match="qs must lie"):
        darex_q_search(lambda q: q, 0.9, [0.05])
    with pytest.raises(ValueError, match="weights"):
        merge_deltas(base, [task_vector(base, ft)], [1.0, 2.0])
