"""Tests for models/vae.py: ELBO ingredients, reparameterisation statistics, likelihoods."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.models import VAE, decoder_log_prob, reparameterize


def _random_params(shapes, seed, scale=0.5):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes
    )


def test_reparameterize_mean_and_variance():
    n = 200_000
    mean = jnp.array([-1.0, 0.0, 2.5])
    logvar = jnp.array([0.0, math.log(0.25), math.log(4.0)])
    z = jax.jit(reparameterize)(
        jax.random.key(3), jnp.broadcast_to(mean, (n, 3)), jnp.broadcast_to(logvar, (n, 3))
    )
    var = np.exp(np.asarray(logvar))
    # 5 standard errors: the sample mean's is sqrt(var/n), the sample variance's sqrt(2/n) var.
    np.testing.assert_allclose(z.mean(0), mean, atol=5 * np.sqrt(var.max() / n))
    np.testing.assert_array_less(np.abs(z.var(0) - var), 5 * np.sqrt(2 / n) * var)
    # Same key, same sample; the gradient reaches mean and logvar (dz/dμ = 1).
    z2 = reparameterize(jax.random.key(3), mean, logvar)
    g = jax.grad(lambda m: reparameterize(jax.random.key(3), m, logvar).sum())(mean)
    np.testing.assert_array_equal(z2, reparameterize(jax.random.key(3), mean, logvar))
    np.testing.assert_allclose(g, 1.0)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_forward_outputs_and_log_likelihood(likelihood):
    model = VAE(data_shape=(4, 4, 1), latent_dim=3, hidden=(8,), likelihood=likelihood)
    shapes = jax.eval_shape(model.init_params, jax.random.key(0))
    assert shapes["encoder"]["out"]["kernel"].shape == (8, 6)  # mean and logvar
    assert shapes["decoder"]["out"]["kernel"].shape == (8, 16)
    assert ("decoder_logvar" in shapes) == (likelihood == "gaussian")
    params = _random_params(shapes, 0)
    x = jax.random.uniform(jax.random.key(1), (5, 4, 4, 1))

    @jax.jit
    def run(params, key, x):
        out = model.forward(params, key, x)
        return out, model.encode(params, x), model.decode(params, out.z)

    out, (mean, logvar), recon = run(params, jax.random.key(2), x)
    assert out.mean.shape == out.logvar.shape == out.z.shape == (5, 3)
    assert out.recon.shape == out.recon_logvar.shape == x.shape
    assert all(a.dtype == jnp.float32 for a in out)
    np.testing.assert_allclose(out.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(out.logvar, logvar, rtol=1e-6)
    np.testing.assert_allclose(out.recon, recon, rtol=1e-5, atol=1e-6)
    z_expected = mean + jnp.exp(0.5 * logvar) * jax.random.normal(jax.random.key(2), (5, 3))
    np.testing.assert_allclose(out.z, z_expected, rtol=1e-5, atol=1e-6)

    ll = decoder_log_prob(x, out, likelihood, data_ndim=3)
    xs, r, s = (np.asarray(a, np.float64) for a in (x, out.recon, out.recon_logvar))
    if likelihood == "bernoulli":
        expected = xs * -np.logaddexp(0, -r) + (1 - xs) * -np.logaddexp(0, r)
    else:
        expected = -0.5 * (np.log(2 * np.pi) + s + (xs - r) ** 2 / np.exp(s))
    assert ll.shape == (5,)
    np.testing.assert_allclose(ll, expected.sum(axis=(1, 2, 3)), rtol=1e-5)


def test_real_init_is_finite_and_matches_eval_shape():
    model = VAE(data_shape=(3,), latent_dim=2, hidden=(), likelihood="gaussian")
    params = jax.jit(model.init_params)(jax.random.key(1))
    shapes = jax.eval_shape(model.init_params, jax.random.key(0))
    assert jax.tree.structure(params) == jax.tree.structure(shapes)
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(shapes), strict=True):
        assert p.shape == s.shape and p.dtype == s.dtype and bool(jnp.isfinite(p).all())
    assert float(jnp.abs(params["encoder"]["out"]["kernel"]).max()) > 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="likelihood"):
        jax.eval_shape(VAE(data_shape=(2,), likelihood="poisson").init_params, jax.random.key(0))
    model = VAE(data_shape=(2,), latent_dim=1, hidden=(4,))
    shapes = jax.eval_shape(model.init_params, jax.random.key(0))
    with pytest.raises(ValueError, match="data_shape"):
        jax.eval_shape(
            model.forward, shapes, jax.random.key(0), jax.ShapeDtypeStruct((3, 5), jnp.float32)
        )
