"""Tests for feynkit.core.schedules: VP identities, derivatives by autodiff, closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.core import (
    CosineSchedule,
    LinearSchedule,
    RectifiedFlowSchedule,
    VPSchedule,
    get_schedule,
)

SCHEDULES = [
    LinearSchedule(),
    LinearSchedule(beta_min=0.5, beta_max=5.0),
    LinearSchedule(beta_min=2.0, beta_max=2.0),
    CosineSchedule(),
    CosineSchedule(s=0.05),
]
IDS = ["linear", "linear-0.5-5", "linear-const", "cosine", "cosine-0.05"]
# t = 0 has sigma = 0 (dsigma/dt infinite); the cosine beta blows up as t -> 1.
T = np.linspace(0.02, 0.95, 32).astype(np.float32)


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
def test_variance_preserving(sched):
    t = jnp.asarray(T)
    np.testing.assert_allclose(sched.alpha(t) ** 2 + sched.sigma(t) ** 2, 1.0, rtol=1e-6)
    np.testing.assert_allclose(sched.alpha(0.0), 1.0, rtol=1e-7)
    assert float(sched.sigma(0.0)) == 0.0


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
def test_derivatives_match_autodiff(sched):
    t = jnp.asarray(T)

    def grad(f):
        return jax.jit(jax.vmap(jax.grad(f)))(t)

    np.testing.assert_allclose(sched.dalpha_dt(t), grad(sched.alpha), rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(sched.dsigma_dt(t), grad(sched.sigma), rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(
        sched.beta(t), grad(lambda s: -2.0 * sched.log_alpha(s)), rtol=2e-4, atol=1e-6
    )
    np.testing.assert_allclose(sched.drift_coef(t), grad(sched.log_alpha), rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
def test_sde_coefficients_and_log_snr(sched):
    t = jnp.asarray(T)
    beta = np.asarray(sched.beta(t), np.float64)
    np.testing.assert_allclose(sched.drift_coef(t), -0.5 * beta, rtol=1e-6)
    np.testing.assert_allclose(sched.diffusion(t), np.sqrt(beta), rtol=1e-6)
    a = np.asarray(sched.alpha(t), np.float64)
    s = np.asarray(sched.sigma(t), np.float64)
    np.testing.assert_allclose(sched.log_snr(t), np.log(a**2 / s**2), rtol=1e-4, atol=1e-5)


def test_linear_closed_form_float64():
    bmin, bmax = 0.1, 20.0
    sched = LinearSchedule(bmin, bmax)
    t = T.astype(np.float64)
    log_alpha = -0.25 * t**2 * (bmax - bmin) - 0.5 * t * bmin
    alpha = np.exp(log_alpha)
    sigma = np.sqrt(1.0 - alpha**2)
    beta = bmin + t * (bmax - bmin)
    np.testing.assert_allclose(sched.log_alpha(T), log_alpha, rtol=1e-6)
    np.testing.assert_allclose(sched.alpha(T), alpha, rtol=1e-6)
    np.testing.assert_allclose(sched.sigma(T), sigma, rtol=1e-6)
    np.testing.assert_allclose(sched.beta(T), beta, rtol=1e-6)
    np.testing.assert_allclose(sched.dalpha_dt(T), -0.5 * beta * alpha, rtol=1e-5)
    np.testing.assert_allclose(sched.dsigma_dt(T), 0.5 * beta * alpha**2 / sigma, rtol=1e-5)
    # Small t: sigma ~ sqrt(bmin t), where 1 - alpha^2 would cancel in float32.
    t_small = np.asarray([1e-6, 1e-5, 1e-4])
    sigma_small = np.sqrt(-np.expm1(-(bmin * t_small + 0.5 * (bmax - bmin) * t_small**2)))
    np.testing.assert_allclose(sched.sigma(t_small.astype(np.float32)), sigma_small, rtol=1e-5)


def test_cosine_closed_form_float64():
    s = 0.008
    sched = CosineSchedule(s)
    t = T.astype(np.float64)
    phi = (t + s) / (1 + s) * np.pi / 2
    alpha = np.cos(phi) / np.cos(s / (1 + s) * np.pi / 2)
    np.testing.assert_allclose(sched.alpha(T), alpha, rtol=1e-5)
    np.testing.assert_allclose(sched.sigma(T), np.sqrt(1 - alpha**2), rtol=1e-5)
    np.testing.assert_allclose(sched.beta(T), np.pi * np.tan(phi) / (1 + s), rtol=1e-5)
    # Small t: sigma must not carry the float32 rounding of cos(phi_0) (it was ~2.4e-4 at t=0).
    t_small = np.asarray([1e-6, 1e-5, 1e-4], np.float32)
    ts = t_small.astype(np.float64)
    phi = (ts + s) / (1 + s) * np.pi / 2
    sigma_small = np.sqrt(1 - (np.cos(phi) / np.cos(s / (1 + s) * np.pi / 2)) ** 2)
    np.testing.assert_allclose(sched.sigma(t_small), sigma_small, rtol=1e-4)


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
def test_monotone(sched):
    t = jnp.asarray(np.linspace(0.0, 0.99, 200).astype(np.float32))
    assert np.all(np.diff(np.asarray(sched.alpha(t))) < 0)
    assert np.all(np.diff(np.asarray(sched.sigma(t))) > 0)
    assert np.all(np.diff(np.asarray(sched.log_snr(t[1:]))) < 0)
    assert np.all(np.diff(np.asarray(sched.beta(t))) >= 0)
    assert np.all(np.asarray(sched.beta(t)) > 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta_min": 0.0}, "0 < beta_min <= beta_max"),
        ({"beta_min": -1.0}, "0 < beta_min <= beta_max"),
        ({"beta_min": 5.0, "beta_max": 1.0}, "got 5.0, 1.0"),
        ({"beta_min": math.nan}, "0 < beta_min <= beta_max"),
    ],
)
def test_linear_invalid_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LinearSchedule(**kwargs)


@pytest.mark.parametrize("s", [0.0, -0.1])
def test_cosine_invalid_parameters(s):
    with pytest.raises(ValueError, match=r"CosineSchedule needs s > 0"):
        CosineSchedule(s=s)


def test_get_schedule():
    sched = get_schedule("linear", beta_min=0.2, beta_max=10.0)
    assert sched == LinearSchedule(0.2, 10.0)
    assert get_schedule("cosine") == CosineSchedule()
    assert isinstance(get_schedule("cosine", s=0.01), VPSchedule)
    with pytest.raises(ValueError, match=r"unknown schedule 'quadratic'.*\['cosine', 'linear', "):
        get_schedule("quadratic")
    with pytest.raises(ValueError, match="beta_min"):
        get_schedule("linear", beta_min=-1.0)


def test_schedule_is_static_under_jit():
    f = jax.jit(lambda t, sched: sched.alpha(t) * sched.sigma(t), static_argnums=1)
    t = jnp.asarray(T)
    for sched in SCHEDULES[:2]:
        np.testing.assert_allclose(f(t, sched), sched.alpha(t) * sched.sigma(t), rtol=1e-6)
    # Frozen dataclasses hash by value: an equal schedule reuses the compiled function.
    assert hash(LinearSchedule()) == hash(LinearSchedule(0.1, 20.0))


# --- rectified flow: α_t = 1 − t, σ_t = t (not variance preserving) ---------------------------


def test_rectified_flow_closed_forms_float64():
    sched = RectifiedFlowSchedule()
    t = T.astype(np.float64)
    with jax.enable_x64(True):
        tt = jnp.asarray(t)
        np.testing.assert_allclose(sched.alpha(tt), 1 - t, rtol=1e-15)
        np.testing.assert_allclose(sched.sigma(tt), t, rtol=1e-15)
        np.testing.assert_allclose(sched.dalpha_dt(tt), -np.ones_like(t))
        np.testing.assert_allclose(sched.dsigma_dt(tt), np.ones_like(t))
        np.testing.assert_allclose(sched.log_alpha(tt), np.log1p(-t), rtol=1e-12)
        np.testing.assert_allclose(sched.drift_coef(tt), -1 / (1 - t), rtol=1e-12)
        np.testing.assert_allclose(sched.beta(tt), 2 * t / (1 - t), rtol=1e-12)
        np.testing.assert_allclose(sched.diffusion(tt), np.sqrt(2 * t / (1 - t)), rtol=1e-12)
        np.testing.assert_allclose(sched.log_snr(tt), np.log((1 - t) ** 2 / t**2), rtol=1e-12)
    assert not isinstance(sched, VPSchedule)
    assert float(sched.alpha(0.0)) == 1.0 and float(sched.sigma(0.0)) == 0.0
    assert float(sched.alpha(1.0)) == 0.0 and float(sched.sigma(1.0)) == 1.0
    assert sched.dalpha_dt(jnp.zeros(3, jnp.bfloat16)).dtype == jnp.bfloat16


def test_rectified_flow_sde_coefficients_by_autodiff():
    """f = d log α/dt and g² = dσ²/dt − 2 f σ² (the SDE with marginals N(α x₀, σ² I))."""
    sched = RectifiedFlowSchedule()
    t = jnp.asarray(T)
    grad = lambda f: jax.vmap(jax.grad(f))(t)  # noqa: E731
    np.testing.assert_allclose(sched.dalpha_dt(t), grad(sched.alpha), rtol=1e-6)
    np.testing.assert_allclose(sched.dsigma_dt(t), grad(sched.sigma), rtol=1e-6)
    f = grad(sched.log_alpha)
    np.testing.assert_allclose(sched.drift_coef(t), f, rtol=1e-5)
    g2 = grad(lambda u: sched.sigma(u) ** 2) - 2 * f * sched.sigma(t) ** 2
    np.testing.assert_allclose(sched.beta(t), g2, rtol=1e-4, atol=1e-6)
    # The same identity holds for the VP schedules (there g² = β).
    for vp in SCHEDULES:
        f = grad(vp.log_alpha)
        g2 = grad(lambda u, vp=vp: vp.sigma(u) ** 2) - 2 * f * vp.sigma(t) ** 2
        np.testing.assert_allclose(vp.beta(t), g2, rtol=2e-3, atol=1e-4)


def test_rectified_flow_monotone_and_registered():
    sched = get_schedule("rectified_flow")
    assert sched == RectifiedFlowSchedule() and hash(sched) == hash(RectifiedFlowSchedule())
    t = jnp.asarray(np.linspace(0.01, 0.99, 100).astype(np.float32))
    assert np.all(np.diff(np.asarray(sched.log_snr(t))) < 0)
    assert np.all(np.diff(np.asarray(sched.beta(t))) > 0)
    f = jax.jit(lambda t, s: s.alpha(t) * s.sigma(t), static_argnums=1)
    np.testing.assert_allclose(f(t, sched), (1 - t) * t, rtol=1e-6)
