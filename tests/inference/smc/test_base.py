"""The generic SMC loop: log-normaliser against closed form, resampling policy, transformations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.core import multinomial_resample
from feynkit.inference import smc

A_TOTAL = 3.0
NUM_STEPS = 6


def _gaussian_tilt(key, x, step):
    """No move; potential exp(−a x²/2) split over the steps. With x ~ N(0, 1):
    Z = ∫ N(x; 0, 1) exp(−A x²/2) dx = (1 + A)^(−1/2)."""
    del key, step
    return x, -0.5 * (A_TOTAL / NUM_STEPS) * jnp.sum(x**2, -1)


def _run(key, n, threshold, resample_fn=multinomial_resample):
    x = jax.random.normal(jax.random.fold_in(key, 1), (n, 1))
    kernel = smc.build_kernel(_gaussian_tilt, resample_fn, threshold)
    return smc.run(key, kernel, smc.init(x), NUM_STEPS)


def test_log_normalizer_closed_form():
    # Ẑ is unbiased; over 64 runs of 4096 particles the relative error of mean Ẑ is ~0.2%.
    states, _ = jax.jit(jax.vmap(lambda k: _run(k, 4096, 0.5)))(
        jax.random.split(jax.random.key(0), 64)
    )
    z_hat = np.mean(np.exp(np.asarray(states.log_normalizer, np.float64)))
    np.testing.assert_allclose(z_hat, (1 + A_TOTAL) ** -0.5, rtol=0.01)


@pytest.mark.parametrize("threshold,expect", [(0.0, 0), (1.0, NUM_STEPS)])
def test_resampling_policy(threshold, expect):
    state, info = jax.jit(lambda k: _run(k, 256, threshold))(jax.random.key(1))
    assert int(info.resampled.sum()) == expect
    assert info.ess.shape == (NUM_STEPS,) and info.ancestors.shape == (NUM_STEPS, 256)
    np.testing.assert_allclose(jax.scipy.special.logsumexp(state.log_weights), 0.0, atol=1e-5)
    if threshold == 0.0:  # pure importance sampling: ancestors are the identity
        np.testing.assert_array_equal(info.ancestors, np.tile(np.arange(256), (NUM_STEPS, 1)))
        # log Ẑ is exactly the log-mean of the accumulated weights
        x = jax.random.normal(jax.random.fold_in(jax.random.key(1), 1), (256, 1))
        lw = -0.5 * A_TOTAL * np.asarray(x[:, 0], np.float64) ** 2
        ref = np.log(np.mean(np.exp(lw)))
        np.testing.assert_allclose(state.log_normalizer, ref, rtol=1e-4, atol=1e-4)


def test_ess_in_info_matches_weights():
    _, info = _run(jax.random.key(2), 128, 0.0)
    x = jax.random.normal(jax.random.fold_in(jax.random.key(2), 1), (128,))
    lw = -0.5 * (A_TOTAL / NUM_STEPS) * np.asarray(x, np.float64) ** 2
    w = np.exp(lw)
    np.testing.assert_allclose(info.ess[0], w.sum() ** 2 / (w**2).sum(), rtol=1e-4)


def test_state_structure_stable_and_vmappable():
    def move(key, p, step):
        x = p["x"] + jax.random.normal(key, p["x"].shape)
        return {"x": x, "aux": p["aux"] + 1}, -0.5 * jnp.sum(x**2, -1)

    kernel = smc.build_kernel(move, ess_threshold=1.0)
    state = smc.init({"x": jnp.zeros((8, 2)), "aux": jnp.ones((8,), jnp.int32)})
    new, _ = jax.jit(kernel)(jax.random.key(0), state)
    assert jax.tree.structure(new) == jax.tree.structure(state)
    assert jax.tree.map(lambda a: a.dtype, new) == jax.tree.map(lambda a: a.dtype, state)
    batched = jax.vmap(lambda k: _run(k, 16, 0.5)[0].log_normalizer)(
        jax.random.split(jax.random.key(0), 3)
    )
    assert batched.shape == (3,)


def test_key_depends_on_absolute_step():
    """Two half runs equal one full run: keys come from the step count in the state."""
    x = jax.random.normal(jax.random.key(9), (64, 1))

    def move(key, x, step):
        return x + 0.1 * jax.random.normal(key, x.shape), -0.5 * jnp.sum(x**2, -1)

    kernel = smc.build_kernel(move)
    full, _ = smc.run(jax.random.key(3), kernel, smc.init(x), 6)
    half, _ = smc.run(jax.random.key(3), kernel, smc.init(x), 3)
    half, _ = smc.run(jax.random.key(3), kernel, half, 3)
    np.testing.assert_allclose(full.particles, half.particles, rtol=1e-6)
    np.testing.assert_allclose(full.log_normalizer, half.log_normalizer, rtol=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match="shape \\(4,\\)"):
        smc.init(jnp.zeros((4, 2)), jnp.zeros((5,)))
    with pytest.raises(ValueError, match="leading axis"):
        smc.init({"a": jnp.zeros((4, 2)), "b": jnp.zeros((3,))})
    with pytest.raises(ValueError, match="ess_threshold"):
        smc.build_kernel(_gaussian_tilt, ess_threshold=1.5)


def test_run_checkpointed_reports_weight_collapse(tmp_path):
    def collapse(key, x, step):
        return x, jnp.full(x.shape[:1], -jnp.inf)

    kernel = smc.build_kernel(collapse)
    with pytest.raises(ValueError, match="broke down by step"):
        smc.run_checkpointed(
            jax.random.key(0), kernel, smc.init(jnp.zeros((8, 1))), 4, directory=None, every=2
        )


def test_infinite_increment_puts_all_mass_on_those_particles():
    # A potential of +inf on particles 2 and 5 (of 8): the weights become uniform over them
    # (log W = −log 2), resampling draws only them, log Ẑ is +inf, and nothing is NaN.
    def spike(key, x, step):
        g = jnp.zeros(x.shape[:1]).at[jnp.array([2, 5])].set(jnp.inf)
        return x, g

    x0 = jnp.arange(8.0)[:, None]
    kernel = jax.jit(smc.build_kernel(spike, ess_threshold=0.5))
    state, info = kernel(jax.random.key(0), smc.init(x0))
    assert bool(info.resampled) and bool(info.weights_ok)
    assert set(np.asarray(state.particles[:, 0]).tolist()) <= {2.0, 5.0}
    assert np.isposinf(float(state.log_normalizer))
    np.testing.assert_allclose(np.asarray(state.log_weights), np.full(8, -np.log(8.0)), rtol=1e-6)
    assert not np.isnan(np.asarray(info.ancestors)).any()
