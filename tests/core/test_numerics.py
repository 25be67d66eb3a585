"""bisect against closed-form roots; jit, vmap and a compile-once check; the shared checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.core import LinearSchedule, bisect, check_reward_shape, check_time_grid


def test_bisect_finds_cube_roots_elementwise():
    targets = jnp.asarray([0.001, 0.2, 0.5, 0.9, 7.9])
    root = bisect(lambda x: x**3 - targets, 0.0, 2.0)
    np.testing.assert_allclose(root, np.cbrt(np.asarray(targets)), rtol=2e-6)
    assert root.shape == targets.shape and root.dtype == jnp.float32


def test_bisect_decreasing_function_matches_closed_form_log_snr_inverse():
    # LinearSchedule: log SNR decreases in t; invert it at λ values of known times.
    sched = LinearSchedule()
    t_true = jnp.linspace(0.01, 0.99, 9)
    lam = sched.log_snr(t_true)
    t = bisect(lambda t: sched.log_snr(t) - lam, jnp.zeros(9), jnp.ones(9), increasing=False)
    np.testing.assert_allclose(t, t_true, atol=1e-5)


def test_bisect_root_outside_bracket_gives_nearer_end_and_float64():
    assert float(bisect(lambda x: x - 5.0, 0.0, 1.0)) == pytest.approx(1.0, abs=1e-6)
    assert float(bisect(lambda x: x + 5.0, 0.0, 1.0)) == pytest.approx(0.0, abs=1e-6)
    with jax.enable_x64(True):
        r = bisect(lambda x: x * x - 2.0, jnp.float64(0.0), jnp.float64(2.0), iterations=80)
        assert r.dtype == jnp.float64 and abs(float(r) - 2**0.5) < 1e-15


def test_bisect_jit_vmap_and_compiles_once():
    traces = []

    @jax.jit
    def sqrt_by_bisection(a):
        traces.append(1)
        return bisect(lambda x: x * x - a, 0.0, 10.0)

    for a in (2.0, 3.0, 50.0):
        assert float(sqrt_by_bisection(jnp.float32(a))) == pytest.approx(a**0.5, rel=1e-6)
    assert len(traces) == 1
    batch = jnp.asarray([1.0, 4.0, 9.0])
    np.testing.assert_allclose(jax.vmap(sqrt_by_bisection)(batch), [1.0, 2.0, 3.0], rtol=1e-6)


def test_bisect_bad_input():
    with pytest.raises(ValueError, match="iterations"):
        bisect(lambda x: x, 0.0, 1.0, iterations=0)
    with pytest.raises(ValueError, match="one root per element"):
        bisect(lambda x: jnp.sum(x), jnp.zeros(3), jnp.ones(3))


def test_check_time_grid_and_reward_shape():
    ts = check_time_grid([1.0, 0.5, 0.0], jnp.float32)
    assert ts.dtype == jnp.float32 and ts.shape == (3,)
    with pytest.raises(ValueError, match="timesteps must be a 1-D grid of ≥ 2"):
        check_time_grid([1.0])
    with pytest.raises(ValueError, match="grid of ≥ 3"):
        check_time_grid([1.0, 0.0], min_times=3)
    assert check_reward_shape(jnp.ones(4), 4).shape == (4,)
    with pytest.raises(ValueError, match=r"reward_fn must return shape \(4,\)"):
        check_reward_shape(jnp.ones((4, 1)), 4)
