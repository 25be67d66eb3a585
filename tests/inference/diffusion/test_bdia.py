"""BDIA-DDIM: the update against a hand-written recursion, exact round trips, DDIM's failure."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.core import LinearSchedule
from feynkit.inference.diffusion import ddim, sample, time_grid
from feynkit.inference.diffusion.bdia import bdia, bdia_invert, bdia_sample
from feynkit.inference.diffusion.guidance import cfg
from feynkit.models import GaussianMixture

SCH = LinearSchedule()


def _gmm(dtype=None):
    means = np.array([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]])
    return GaussianMixture.create([0.3, 0.5, 0.2], means, scales=[0.5, 0.8, 0.3])


def _eps_model(gmm):
    """The exact ε-model of the mixture: ε(x, t) = −σ_t ∇log p_t(x) (nonlinear in x)."""
    return lambda x, t: -SCH.sigma(t[0]) * gmm.marginal(SCH, t[0]).score(x)


def test_update_matches_the_hand_written_recursion_float64():
    with jax.enable_x64(True):
        gmm = _gmm()
        eps = _eps_model(gmm)
        ts = np.linspace(1.0, 0.2, 6)
        gamma = 0.7
        x_init = np.asarray(jax.random.normal(jax.random.key(0), (4, 2), jnp.float64))
        out, out_prev, info = bdia_sample(eps, SCH, x_init, ts, gamma)

        def phi(z, t, s):  # DDIM map with ε̂ from (z, t), towards time s
            e = np.asarray(eps(jnp.asarray(z), jnp.full((z.shape[0],), t)))
            a_t, s_t = float(SCH.alpha(t)), float(SCH.sigma(t))
            return float(SCH.alpha(s)) * (z - s_t * e) / a_t + float(SCH.sigma(s)) * e

        z = [x_init, phi(x_init, ts[0], ts[1])]  # first step: DDIM
        for k in range(1, len(ts) - 1):
            z.append(
                gamma * z[k - 1] + phi(z[k], ts[k], ts[k + 1]) - gamma * phi(z[k], ts[k], ts[k - 1])
            )
        np.testing.assert_allclose(out, z[-1], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(out_prev, z[-2], rtol=1e-12, atol=1e-12)
        assert int(info.nfe) == len(ts) - 1  # one network evaluation per step


def test_gamma_zero_is_ddim():
    eps = _eps_model(_gmm())
    ts = time_grid(10)
    x = jax.random.normal(jax.random.key(1), (8, 2))
    ref, _ = sample(jax.random.key(0), ddim(SCH), eps, x, ts)
    out, _, _ = bdia_sample(eps, SCH, x, ts, 0.0)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def _round_trips(eps, x_T, data, ts, gamma=1.0):
    x0, x1, _ = bdia_sample(eps, SCH, x_T, ts, gamma)
    back, _, _ = bdia_invert(eps, SCH, x0, ts, gamma, x_next=x1)  # invert(sample(x_T))
    z0, z1, _ = bdia_invert(eps, SCH, data, ts, gamma)  # sample(invert(data))
    regen, _, _ = bdia_sample(eps, SCH, z0, ts, gamma, x_next=z1)
    d_lat, _ = sample(jax.random.key(0), ddim(SCH), eps, data, ts[::-1])  # DDIM inversion
    d_regen, _ = sample(jax.random.key(0), ddim(SCH), eps, d_lat, ts)
    err = lambda a, b: jnp.max(jnp.abs(a - b))
    return err(back, x_T), err(regen, data), err(d_regen, data)


@pytest.mark.slow
def test_round_trips_are_exact_in_float64_where_ddim_inversion_is_not():
    with jax.enable_x64(True):
        gmm = _gmm()
        ts = time_grid(25, 1.0, 1e-3).astype(jnp.float64)
        x_T = jax.random.normal(jax.random.key(2), (64, 2), jnp.float64)
        data = gmm.sample(jax.random.key(3), 64)
        e_sample, e_data, e_ddim = jax.jit(_round_trips, static_argnums=0)(
            _eps_model(gmm), x_T, data, ts
        )
        e_sample, e_data, e_ddim = float(e_sample), float(e_data), float(e_ddim)
    assert e_sample < 1e-11 and e_data < 1e-11
    assert e_ddim > 1e-2 and e_ddim > 1e8 * max(e_sample, e_data)


def test_round_trips_float32_jit_compiles_once():
    gmm = _gmm()
    traces = []

    def trips(x_T, data, ts):
        traces.append(1)
        return _round_trips(_eps_model(gmm), x_T, data, ts)

    run = jax.jit(trips)
    ts = time_grid(50)
    for seed in (4, 5):
        k1, k2 = jax.random.split(jax.random.key(seed))
        e_sample, e_data, e_ddim = run(jax.random.normal(k1, (64, 2)), gmm.sample(k2, 64), ts)
        # float32 round-off over 50 steps of a unit-scale state: ~1e-6 measured
        assert e_sample < 1e-4 and e_data < 1e-4
        assert e_ddim > 100 * max(e_sample, e_data)
    assert len(traces) == 1


@pytest.mark.slow
def test_exact_round_trip_with_classifier_free_guidance_float64():
    with jax.enable_x64(True):
        # label 0: components {0, 1}; label 1 (the null label): all components
        full = _gmm()
        parts = [full.select(jnp.array([0, 1])), full]

        def eps(x, t, label):
            e = [-SCH.sigma(t[0]) * g.marginal(SCH, t[0]).score(x) for g in parts]
            return jnp.where((label == 0)[:, None], e[0], e[1])

        ts = time_grid(30).astype(jnp.float64)
        data = parts[0].sample(jax.random.key(6), 32)
        kw = dict(
            guidance=cfg(3.0),
            cond={"label": jnp.zeros(32, jnp.int32)},
            uncond={"label": jnp.ones(32, jnp.int32)},
        )

        @jax.jit
        def trip(data):
            z0, z1, info = bdia_invert(eps, SCH, data, ts, **kw)
            regen, _, _ = bdia_sample(eps, SCH, z0, ts, x_next=z1, **kw)
            return jnp.max(jnp.abs(regen - data)), info.nfe

        err, nfe = trip(data)
        err = float(err)
    assert err < 1e-10
    assert int(nfe) == 2 * 30  # conditional and unconditional branch per step


def test_invalid_arguments_are_clear_errors():
    eps = _eps_model(_gmm())
    x = jnp.zeros((2, 2))
    with pytest.raises(ValueError, match="gamma > 0"):
        bdia_invert(eps, SCH, x, time_grid(5), 0.0)
    with pytest.raises(ValueError, match="1-D grid"):
        bdia_sample(eps, SCH, x, jnp.ones(1))
    with pytest.raises(ValueError, match="≥ 3 times"):
        bdia_sample(eps, SCH, x, time_grid(1), x_next=x)
    with pytest.raises(ValueError, match="both"):
        bdia(SCH, 1.0, x_prev=x)
