"""Tests for classifier guidance and calibration (inference/diffusion/classifier_guidance.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.core import LinearSchedule
from feynkit.inference.diffusion import Prediction
from feynkit.inference.diffusion.classifier_guidance import (
    calibrated_log_prob,
    classifier_guided_model,
    ece,
    fit_temperature,
    sine_scale_schedule,
)

SCHEDULE = LinearSchedule()
K, D, B = 4, 3, 5
WEIGHTS = jax.random.normal(jax.random.key(0), (K, D))
BIAS = jnp.array([0.1, -0.2, 0.3, 0.0])
SHRINK = 0.6  # the toy denoiser: x̂₀ = SHRINK · x / α


def logits_fn(x, t):
    """Linear logits f(x) = W x + b (a Gaussian class-conditional model): analytic gradients."""
    return x @ WEIGHTS.T + BIAS[None] + 0.0 * t[:, None]


def denoise_fn(x, t, **cond):
    a, s = SCHEDULE.alpha(t), SCHEDULE.sigma(t)
    x0 = SHRINK * x / a
    return Prediction(x0, (x - a * x0) / s)


def _grad_closed_form(u, labels, tj=1.0, tm=1.0):
    """∇_u [f_y/T_j − logsumexp(f/T_m)] = W_y/T_j − Σ_k softmax(f/T_m)_k W_k / T_m."""
    p = jax.nn.softmax(logits_fn(u, jnp.zeros(u.shape[0])) / tm, axis=1)
    return WEIGHTS[labels] / tj - p @ WEIGHTS / tm


def _inputs():
    x = jax.random.normal(jax.random.key(1), (B, D))
    labels = jnp.array([0, 1, 2, 3, 1])
    return x, labels, jnp.asarray(0.4)


@pytest.mark.parametrize("tj,tm", [(1.0, None), (2.0, None), (1.5, 0.75)])
def test_noisy_classifier_guidance_matches_closed_form(tj, tm):
    x, labels, t = _inputs()
    scale = 2.5
    guided = classifier_guided_model(
        denoise_fn, logits_fn, scale, schedule=SCHEDULE, temperature=tj, marginal_temperature=tm
    )
    out = guided(x, t, label=labels)
    base = denoise_fn(x, t)
    g = _grad_closed_form(x, labels, tj, tj if tm is None else tm)
    np.testing.assert_allclose(out.eps, base.eps - scale * SCHEDULE.sigma(t) * g, rtol=1e-5)
    # A consistent pair: x = α x̂₀ + σ ε̂.
    np.testing.assert_allclose(
        SCHEDULE.alpha(t) * out.x0 + SCHEDULE.sigma(t) * out.eps, x, rtol=1e-5, atol=1e-5
    )


def test_gradient_matches_finite_differences():
    x, labels, t = _inputs()
    guided = classifier_guided_model(denoise_fn, logits_fn, 1.0, schedule=SCHEDULE)
    g = (denoise_fn(x, t).eps - guided(x, t, label=labels).eps) / SCHEDULE.sigma(t)
    x64 = np.asarray(x, np.float64)
    w64, b64 = np.asarray(WEIGHTS, np.float64), np.asarray(BIAS, np.float64)

    def lp(u):
        f = u @ w64.T + b64
        return f[np.arange(B), labels] - np.log(np.exp(f).sum(1))

    h = 1e-6
    fd = np.stack(
        [(lp(x64 + h * np.eye(D)[j]) - lp(x64 - h * np.eye(D)[j])) / (2 * h) for j in range(D)],
        axis=1,
    )
    np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-5)


def test_on_x0_with_and_without_the_denoiser_jacobian():
    x, labels, t = _inputs()
    a, s = SCHEDULE.alpha(t), SCHEDULE.sigma(t)
    x0 = SHRINK * x / a
    g0 = _grad_closed_form(x0, labels)
    base = denoise_fn(x, t)
    detached = classifier_guided_model(denoise_fn, logits_fn, 1.0, schedule=SCHEDULE, on_x0=True)
    np.testing.assert_allclose(detached(x, t, label=labels).eps, base.eps - s * g0, rtol=1e-5)
    through = classifier_guided_model(
        denoise_fn, logits_fn, 1.0, schedule=SCHEDULE, on_x0=True, through_denoiser=True
    )
    # Chain rule through x̂₀ = (SHRINK/α) x.
    np.testing.assert_allclose(
        through(x, t, label=labels).eps, base.eps - s * (SHRINK / a) * g0, rtol=1e-5
    )


def test_scale_zero_is_the_model_and_schedule_multiplies():
    x, labels, t = _inputs()
    out = classifier_guided_model(denoise_fn, logits_fn, 0.0, schedule=SCHEDULE)(x, t, label=labels)
    base = denoise_fn(x, t)
    np.testing.assert_allclose(out.eps, base.eps, rtol=1e-6)
    np.testing.assert_allclose(out.x0, base.x0, rtol=1e-5)
    sched = sine_scale_schedule(0.3)
    np.testing.assert_allclose(sched(jnp.asarray(0.5)), 1.3, rtol=1e-6)
    plain = classifier_guided_model(denoise_fn, logits_fn, 1.3, schedule=SCHEDULE)
    sine = classifier_guided_model(
        denoise_fn, logits_fn, 1.0, schedule=SCHEDULE, scale_schedule=sched
    )
    t5 = jnp.asarray(0.5)
    np.testing.assert_allclose(
        sine(x, t5, label=labels).eps, plain(x, t5, label=labels).eps, rtol=1e-5
    )


def test_jit_and_vmap():
    x, labels, t = _inputs()
    guided = classifier_guided_model(denoise_fn, logits_fn, 2.0, schedule=SCHEDULE, on_x0=True)
    eager = guided(x, t, label=labels)
    jitted = jax.jit(lambda x, t, y: guided(x, t, label=y))(x, t, labels)
    np.testing.assert_allclose(jitted.eps, eager.eps, rtol=1e-5)
    ts = jnp.array([0.2, 0.5, 0.9])
    many = jax.vmap(lambda tt: guided(x, tt, label=labels).eps)(ts)
    np.testing.assert_allclose(many[1], guided(x, ts[1], label=labels).eps, rtol=1e-5)


def test_calibrated_log_prob_is_log_softmax_at_equal_temperatures():
    f = jax.random.normal(jax.random.key(2), (6, 5)) * 3
    y = jnp.arange(6) % 5
    np.testing.assert_allclose(
        calibrated_log_prob(f, y, 2.0),
        jax.nn.log_softmax(f / 2.0, axis=1)[jnp.arange(6), y],
        rtol=1e-5,
    )


def test_fit_temperature_recovers_a_known_temperature():
    # Labels drawn from softmax(g); the observed logits are g·T, so the best temperature is T.
    # n = 20000: the NLL-optimal T has a standard error of about 1% here.
    key = jax.random.key(4)
    n, k, t_true = 20000, 10, 2.5
    g = 2.0 * jax.random.normal(key, (n, k))
    y = jax.random.categorical(jax.random.fold_in(key, 1), g)
    t_hat = float(fit_temperature(g * t_true, y))
    assert abs(t_hat - t_true) / t_true < 0.05, t_hat
    assert abs(float(fit_temperature(g, y)) - 1.0) < 0.05
    # Temperature scaling lowers the ECE of the miscalibrated logits.
    assert float(ece(jax.nn.softmax(g * t_true / t_hat), y)) < 0.5 * float(
        ece(jax.nn.softmax(g * t_true), y)
    )


def test_ece_of_calibrated_and_overconfident_probabilities():
    # Binary probabilities whose labels are drawn from themselves: ECE → 0 (sampling error of
    # ~0.005 per bin with n = 1e5 and 15 bins); the same probabilities sharpened are not.
    key = jax.random.key(5)
    n = 100_000
    c = jax.random.uniform(key, (n,), minval=0.5, maxval=1.0)
    probs = jnp.stack([c, 1 - c], axis=1)
    y = (jax.random.uniform(jax.random.fold_in(key, 1), (n,)) > c).astype(jnp.int32)
    assert float(ece(probs, y)) < 0.01
    sharp = jax.nn.softmax(3.0 * jnp.log(probs), axis=1)
    assert float(ece(sharp, y)) > 0.1
    # Brute-force reference (float64 NumPy) with the same bins.
    p, yy = np.asarray(sharp, np.float64), np.asarray(y)
    conf, acc = p.max(1), (p.argmax(1) == yy)
    bins = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)
    ref = sum(abs(acc[bins == b].sum() - conf[bins == b].sum()) for b in range(15)) / n
    np.testing.assert_allclose(float(ece(sharp, y)), ref, rtol=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="on_x0"):
        classifier_guided_model(
            denoise_fn, logits_fn, 1.0, schedule=SCHEDULE, through_denoiser=True
        )
    with pytest.raises(ValueError, match="temperatures"):
        classifier_guided_model(denoise_fn, logits_fn, 1.0, schedule=SCHEDULE, temperature=0.0)
    guided = classifier_guided_model(denoise_fn, logits_fn, 1.0, schedule=SCHEDULE)
    with pytest.raises(ValueError, match="label"):
        guided(jnp.zeros((2, D)), jnp.asarray(0.5))
    with pytest.raises(ValueError, match="logits"):
        fit_temperature(jnp.zeros(3), jnp.zeros(3, jnp.int32))
