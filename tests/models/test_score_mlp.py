"""Tests for models/score_mlp.py: shapes, dtypes, jit, label conditioning with a null label."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.models import ScoreMLP, sinusoidal_embedding

MODEL = ScoreMLP(hidden=16, num_layers=2, num_classes=3, time_features=8)
DIM = 2


def _random_params(shapes, seed, scale=0.5):
    # eval_shape + numpy fill: random parameters without compiling the initialisers.
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes
    )


def _shapes(model):
    return jax.eval_shape(lambda key: model.init_params(key, DIM), jax.random.key(0))


@pytest.fixture(scope="module")
def params():
    return _random_params(_shapes(MODEL), 0)


@jax.jit
@chex.assert_max_traces(n=1)
def score_mlp_forward(params, x, t, label):
    return MODEL.forward(params, x, t, label)


@pytest.fixture(scope="module")
def fwd():
    return score_mlp_forward


def test_sinusoidal_embedding():
    e = sinusoidal_embedding(jnp.array([0.0, 0.5, 1.0]), 8)
    assert e.shape == (3, 8) and e.dtype == jnp.float32
    np.testing.assert_allclose(e[0], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(e[1, 0], np.cos(500.0), rtol=1e-5)
    np.testing.assert_allclose(e[2, 4], np.sin(1000.0), rtol=1e-4)
    assert sinusoidal_embedding(jnp.zeros((2, 5)), 4).shape == (2, 5, 4)
    with pytest.raises(ValueError, match="even"):
        sinusoidal_embedding(0.0, 5)


def test_init_params_shapes_and_dtypes():
    shapes = _shapes(MODEL)
    assert shapes["input"]["kernel"].shape == (DIM, 16)
    assert shapes["output"]["kernel"].shape == (16, DIM)
    assert shapes["embed"]["label"]["embedding"].shape == (4, 16)  # 3 classes + null label
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(shapes))
    bf16 = ScoreMLP(hidden=16, num_layers=1, param_dtype=jnp.bfloat16)
    assert all(s.dtype == jnp.bfloat16 for s in jax.tree.leaves(_shapes(bf16)))


def test_forward_shape_dtype_and_jit_compiles_once(params, fwd):
    x = jax.random.normal(jax.random.key(1), (5, DIM))
    t = jnp.linspace(0.1, 0.9, 5)
    label = jnp.array([0, 1, 2, 3, 0])
    out = fwd(params, x, t, label)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert bool(jnp.isfinite(out).all())
    out2 = fwd(params, x + 1.0, t * 0.5, label[::-1])  # new values, same shapes: no retrace
    assert not np.allclose(out, out2)


def test_labels_change_output_and_null_label_is_unconditional(params, fwd):
    x = jax.random.normal(jax.random.key(2), (5, DIM))
    t = jnp.full((5,), 0.3, jnp.float32)
    outs = [fwd(params, x, t, jnp.full((5,), y, jnp.int32)) for y in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not np.allclose(outs[a], outs[b])
    # label=None means the null label num_classes; a scalar t broadcasts.
    uncond = jax.jit(MODEL.forward)(params, x, 0.3)
    np.testing.assert_allclose(uncond, outs[3], rtol=1e-6, atol=1e-7)


def test_vmap_over_particles(params, fwd):
    x = jax.random.normal(jax.random.key(3), (5, DIM))
    t = jnp.linspace(0.1, 0.9, 5, dtype=jnp.float32)
    label = jnp.array([0, 1, 2, 3, 0], jnp.int32)
    out = jax.jit(jax.vmap(lambda xi, ti, li: MODEL.forward(params, xi, ti, li)))(x, t, label)
    assert out.shape == x.shape
    np.testing.assert_allclose(out, fwd(params, x, t, label), rtol=1e-5, atol=1e-6)


def test_unconditional_model_refuses_labels():
    model = ScoreMLP(hidden=8, num_layers=1)
    shapes = _shapes(model)
    x = jax.ShapeDtypeStruct((3, DIM), jnp.float32)
    assert jax.eval_shape(model.forward, shapes, x, 0.5).shape == (3, DIM)
    x16 = jax.ShapeDtypeStruct((3, DIM), jnp.bfloat16)
    assert jax.eval_shape(model.forward, shapes, x16, 0.5).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="unconditional"):
        jax.eval_shape(model.forward, shapes, x, 0.5, 1)
