"""WINA vs magnitude-only activation sparsity: optimality on orthogonal rows (brute force),
exact sparsity, the forward-pass transform, bad input."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.compression.prune.wina import (
    activation_mask,
    activation_scores,
    sparse_activation_apply,
    sparsify_activations,
)


def _orthogonal_rows(key, d_in, d_out, norms):
    q, _ = jnp.linalg.qr(jax.random.normal(key, (d_out, d_in)))  # (d_out, d_in), orthonormal cols
    return q.T * jnp.asarray(norms)[:, None]  # rows orthogonal with the given norms


def test_wina_is_optimal_on_orthogonal_rows_and_beats_magnitude(key):
    d_in, d_out, s = 8, 12, 0.5
    norms = np.array([0.1, 3.0, 0.5, 2.0, 0.2, 1.5, 4.0, 0.05])
    W = np.asarray(_orthogonal_rows(key, d_in, d_out, norms), np.float64)
    x = np.asarray(jax.random.normal(jax.random.key(1), (64, d_in)), np.float64)
    y = x @ W

    def err(xs):
        return np.linalg.norm(xs @ W - y, axis=-1)

    e_wina = err(np.asarray(sparsify_activations(x, W, s, "wina"), np.float64))
    e_mag = err(np.asarray(sparsify_activations(x, W, s, "magnitude"), np.float64))
    # brute force over every kept set of size 4, per token (float64)
    keep = d_in - int(round(s * d_in))
    best = np.full(len(x), np.inf)
    for kept in itertools.combinations(range(d_in), keep):
        m = np.zeros(d_in, bool)
        m[list(kept)] = True
        best = np.minimum(best, err(np.where(m, x, 0.0)))
    np.testing.assert_allclose(e_wina, best, rtol=1e-5, atol=1e-6)
    assert np.all(e_wina <= e_mag + 1e-6)
    assert np.mean(e_wina) < 0.8 * np.mean(e_mag)


@pytest.mark.parametrize("s", [0.0, 0.5, 0.65, 0.9])
def test_achieved_sparsity_equals_target(key, s):
    x = jax.random.normal(key, (5, 7, 40))
    x = x.at[0, 0, :10].set(1.0)  # ties keep exactly k too
    W = jax.random.normal(jax.random.key(2), (40, 16))
    for method in ("wina", "magnitude"):
        xs = sparsify_activations(x, W, s, method)
        zeros = np.sum(np.asarray(xs) == 0, axis=-1)
        assert np.all(zeros == round(s * 40))
    mask = activation_mask(activation_scores(x, W), s)
    assert mask.dtype == jnp.bool_ and mask.shape == x.shape


class _TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(32, name="up")(x))
        return nn.Dense(8, use_bias=False, name="down")(h)


def test_sparse_forward_pass_matches_manual_gating(key):
    model = _TwoLayer()
    x = jax.random.normal(key, (6, 16))
    params = model.init(jax.random.key(1), x)["params"]

    def forward(p, x):
        return model.apply({"params": p}, x)

    sparse = jax.jit(sparse_activation_apply(forward, 0.5, "wina", where=r"down"))
    h = nn.relu(x @ params["up"]["kernel"] + params["up"]["bias"][None])
    manual = sparsify_activations(h, params["down"]["kernel"], 0.5) @ params["down"]["kernel"]
    np.testing.assert_allclose(np.asarray(sparse(params, x)), np.asarray(manual), rtol=1e-5)
    # sparsity 0 is the dense model; per-layer table
    dense = sparse_activation_apply(forward, {"down": 0.0, "up": 0.0}, where=[r"up", r"down"])
    np.testing.assert_allclose(
        np.asarray(dense(params, x)), np.asarray(forward(params, x)), rtol=1e-6
    )
    # return_gated: the same output and, per gated module, the fraction of inputs zeroed —
    # round(0.7 * 32) / 32 of "down"'s (its inputs are relu outputs: the gate, not relu, counts)
    gated_fn = jax.jit(sparse_activation_apply(forward, 0.7, where=r"down", return_gated=True))
    out, gated = gated_fn(params, x)
    np.testing.assert_array_equal(
        np.asarray(out),
        np.asarray(sparse_activation_apply(forward, 0.7, where=r"down")(params, x)),
    )
    assert list(gated) == ["down"] and float(gated["down"]) == round(0.7 * 32) / 32


def test_bad_input(key):
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match="sparsity"):
        sparsify_activations(x, jnp.ones((4, 3)), 1.0)
    with pytest.raises(ValueError, match="sparsity"):
        sparse_activation_apply(lambda p, x: x, -0.1)
    with pytest.raises(ValueError, match="method"):
        activation_scores(x, jnp.ones((4, 3)), "teal")
    with pytest.raises(ValueError, match="kernel"):
        activation_scores(x, jnp.ones((5, 3)))
    model = _TwoLayer()
    params = model.init(key, x)["params"]
    f = sparse_activation_apply(lambda p, x: model.apply({"params": p}, x), 0.5, where="nothing")
    with pytest.raises(ValueError, match="matched no Dense"):
        f(params, jnp.ones((2, 4)))
