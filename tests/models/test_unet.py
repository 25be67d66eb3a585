"""Tests for models/unet.py: (B, 8, 8, 1) in and out, jit, label conditioning with a null label."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.models import UNet

MODEL = UNet(channels=4, num_classes=3, time_features=8)


def _random_params(shapes, seed, scale=0.5):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes
    )


@pytest.fixture(scope="module")
def params():
    return _random_params(jax.eval_shape(MODEL.init_params, jax.random.key(0)), 0)


@jax.jit
@chex.assert_max_traces(n=1)
def unet_forward(params, x, t, label):
    return MODEL.forward(params, x, t, label)


@pytest.fixture(scope="module")
def fwd():
    return unet_forward


def test_param_shapes_and_dtypes():
    shapes = jax.eval_shape(MODEL.init_params, jax.random.key(0))
    assert shapes["conv_in"]["kernel"].shape == (3, 3, 1, 4)
    assert shapes["conv_out"]["kernel"].shape == (3, 3, 4, 1)
    assert shapes["downsample"]["kernel"].shape == (3, 3, 4, 8)
    assert shapes["embed"]["label"]["embedding"].shape == (4, 16)  # 3 classes + null label
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(shapes))


def test_forward_shape_dtype_jit_and_labels(params, fwd):
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    t = jnp.array([0.1, 0.5, 0.9], jnp.float32)
    outs = [fwd(params, x, t, jnp.full((3,), y, jnp.int32)) for y in range(4)]
    assert outs[0].shape == (3, 8, 8, 1) and outs[0].dtype == jnp.float32
    assert all(bool(jnp.isfinite(o).all()) for o in outs)
    for a in range(4):
        for b in range(a + 1, 4):
            assert not np.allclose(outs[a], outs[b])
    # label=None is the null label (index num_classes).
    uncond = jax.jit(MODEL.forward)(params, x, t)
    np.testing.assert_allclose(uncond, outs[3], rtol=1e-6, atol=1e-6)


def test_time_changes_output(params, fwd):
    x = jax.random.normal(jax.random.key(2), (3, 8, 8, 1))
    label = jnp.zeros((3,), jnp.int32)
    a = fwd(params, x, jnp.full((3,), 0.2, jnp.float32), label)
    b = fwd(params, x, jnp.full((3,), 0.7, jnp.float32), label)
    assert not np.allclose(a, b)


def test_bad_shapes_and_unconditional_label():
    shapes = jax.eval_shape(MODEL.init_params, jax.random.key(0))
    with pytest.raises(ValueError, match="H and W even"):
        jax.eval_shape(MODEL.forward, shapes, jax.ShapeDtypeStruct((2, 7, 7, 1), jnp.float32), 0.5)
    uncond = UNet(channels=4, time_features=8)
    ushapes = jax.eval_shape(uncond.init_params, jax.random.key(0))
    x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
    assert jax.eval_shape(uncond.forward, ushapes, x, 0.5).shape == (2, 8, 8, 1)
    with pytest.raises(ValueError, match="unconditional"):
        jax.eval_shape(uncond.forward, ushapes, x, 0.5, 0)
