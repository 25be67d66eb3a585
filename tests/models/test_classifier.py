"""Tests for models/classifier.py: logits shapes, jit, t-dependence, guidance gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.models import ImageClassifier, PointClassifier


def _random_params(shapes, seed, scale=0.5):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes
    )


@pytest.mark.parametrize(
    "model, x_shape",
    [
        (PointClassifier(num_classes=3, hidden=16, time_features=8), (5, 2)),
        (ImageClassifier(num_classes=4, channels=4, time_features=8), (5, 8, 8, 1)),
    ],
    ids=["points", "images"],
)
def test_logits_time_dependence_and_guidance_gradient(model, x_shape):
    init = (lambda k: model.init_params(k, x_shape[-1])) if len(x_shape) == 2 else model.init_params
    shapes = jax.eval_shape(init, jax.random.key(0))
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(shapes))
    params = _random_params(shapes, 0)
    x = jax.random.normal(jax.random.key(1), x_shape)
    y = jnp.arange(5) % model.num_classes

    @jax.jit
    def logits_and_grad(params, x, t):
        def log_p(x):
            logp = jax.nn.log_softmax(model.forward(params, x, t), axis=-1)
            return jnp.take_along_axis(logp, y[:, None], axis=-1).sum()

        return model.forward(params, x, t), jax.grad(log_p)(x)

    logits, grad = logits_and_grad(params, x, jnp.full((5,), 0.2, jnp.float32))
    assert logits.shape == (5, model.num_classes) and logits.dtype == jnp.float32
    assert grad.shape == x.shape and bool(jnp.isfinite(grad).all())
    assert float(jnp.abs(grad).max()) > 0
    later, _ = logits_and_grad(params, x, jnp.full((5,), 0.8, jnp.float32))
    assert not np.allclose(logits, later)  # noise-aware: the time enters the logits


def test_image_classifier_rejects_flat_input():
    model = ImageClassifier(num_classes=2, channels=4)
    shapes = jax.eval_shape(model.init_params, jax.random.key(0))
    with pytest.raises(ValueError, match="B, H, W, C"):
        jax.eval_shape(model.forward, shapes, jax.ShapeDtypeStruct((3, 64), jnp.float32), 0.5)
