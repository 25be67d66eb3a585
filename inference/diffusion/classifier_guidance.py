"""Classifier guidance, naive and calibrated (off-the-shelf classifiers), and calibration tools.

Classifier guidance samples p(x | y) ∝ p(x) p(y | x)^s by adding the classifier's gradient to
the score, which in ε-form is

    ε̂ ← ε̂ − s(t) σ_t g,   x̂₀ ← x̂₀ + s(t) (σ_t²/α_t) g,   g ≈ ∇_{x_t} log p_φ(y | ·).

It modifies the model, not a cond/uncond pair, so it wraps the denoiser:
`classifier_guided_model` returns ``guided(x, t, **cond) -> Prediction`` for
``sample(..., model_fn=guided, prediction="prediction", cond={"label": y})`` (or as the
conditional branch of a CFG run). Design choices of Ma et al. (2024) for classifiers that were
not trained on noisy inputs, each an option:

- ``on_x0``: classify the denoised estimate x̂₀(x_t) at t = 0 instead of x_t; the gradient is
  taken with respect to x̂₀ and used for x_t (``through_denoiser=False``, the paper's cheap
  choice), or through the denoiser, ∇_{x_t} log p(y | x̂₀(x_t)) (``through_denoiser=True``, one
  backward pass of the network per step);
- calibrated logits: a joint temperature T_j and a marginal temperature T_m,

      log p̃(y | x) = f_y(x)/T_j − log Σ_k exp(f_k(x)/T_m),

  (T_j = T_m = T: temperature scaling; `fit_temperature` fits T on held-out data by NLL, `ece`
  measures the calibration);
- a time schedule of the scale, e.g. `sine_scale_schedule`: s(t) = s (1 + γ sin(π t)), more
  guidance mid-trajectory where the classifier's gradient is informative.

Smoothness (the paper's Softplus in place of ReLU) is a property of the classifier network:
use smooth activations (feynkit's classifiers use SiLU).

References:
  Dhariwal & Nichol (2021), "Diffusion Models Beat GANs on Image Synthesis", §4;
  Ma, Hu, Wang & Sun (2024), "Elucidating The Design Space of Classifier-Guided Diffusion
  Generation" (ICLR); Guo, Pleiss, Sun & Weinberger (2017), "On Calibration of Modern Neural
  Networks" (temperature scaling, ECE).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from feynkit.core.numerics import bisect
from feynkit.core.types import Array, ArrayLike, Float, Int, Schedule
from feynkit.inference.diffusion.prediction import Prediction

__all__ = [
    "calibrated_log_prob",
    "classifier_guided_model",
    "ece",
    "fit_temperature",
    "sine_scale_schedule",
]


def calibrated_log_prob(
    logits: Float[ArrayLike, "b k"],
    labels: Int[ArrayLike, " b"],
    temperature: float = 1.0,
    marginal_temperature: float | None = None,
) -> Float[Array, " b"]:
    """log p̃(y | x) = f_y/T_j − logsumexp(f/T_m) (T_m = T_j: log softmax(f/T)_y).

    Args:
      logits: f, shape (batch, classes).
      labels: y, shape (batch,).
      temperature: T_j (joint temperature).
      marginal_temperature: T_m; defaults to T_j.

    References:
      Ma et al. (2024), "Elucidating The Design Space of Classifier-Guided Diffusion
      Generation" (joint and marginal temperatures; their reference code).
    """
    f = jnp.asarray(logits)
    tm = temperature if marginal_temperature is None else marginal_temperature
    fy = jnp.take_along_axis(f, jnp.asarray(labels)[:, None], axis=1)[:, 0]
    return fy / temperature - jax.nn.logsumexp(f / tm, axis=1)


def sine_scale_schedule(gamma: float, t_max: float = 1.0) -> Callable[[Array], Array]:
    """s(t)/s = 1 + γ sin(π t / t_max): the sine-shaped boost of the guidance scale.

    References:
      Ma et al. (2024) (guidance schedule; their code adds γ sin(π t/T) times the largest
      step variance to each step's variance).
    """
    return lambda t: 1.0 + gamma * jnp.sin(jnp.pi * t / t_max)


def classifier_guided_model(
    denoise_fn: Callable[..., Prediction],
    logits_fn: Callable[[Array, Array], Array],
    scale: float,
    *,
    schedule: Schedule,
    label_key: str = "label",
    on_x0: bool = False,
    through_denoiser: bool = False,
    temperature: float = 1.0,
    marginal_temperature: float | None = None,
    scale_schedule: Callable[[Array], Array] | None = None,
) -> Callable[..., Prediction]:
    """Wrap a denoiser with classifier guidance: ``guided(x, t, **cond) -> Prediction``.

        g = ∇_{x_t} log p̃(y | x_t, t)                       (on_x0=False: noise-aware classifier)
        g = ∇_u log p̃(y | u, 0) at u = x̂₀(x_t)              (on_x0=True, through_denoiser=False)
        g = ∇_{x_t} log p̃(y | x̂₀(x_t), 0)                   (on_x0=True, through_denoiser=True)
        ε̂_g = ε̂ − s(t) σ_t g,   x̂₀,g = (x_t − σ_t ε̂_g)/α_t,   s(t) = scale · scale_schedule(t).

    Args:
      denoise_fn: ``denoise_fn(x, t, **cond) -> Prediction`` with t a scalar, e.g.
        ``as_denoiser(model_fn, schedule, "eps")``; it receives all of ``cond`` (an
        unconditional model should accept and ignore the label).
      logits_fn: ``logits_fn(x, t) -> logits (batch, classes)`` with t of shape (batch,).
      scale: s (0 leaves the model unchanged).
      schedule: gives α_t, σ_t.
      label_key: the keyword of ``cond`` holding the class labels y, shape (batch,).
      on_x0, through_denoiser: where the classifier is applied (see above).
      temperature, marginal_temperature: T_j, T_m of `calibrated_log_prob`.
      scale_schedule: t ↦ multiplier of the scale (e.g. `sine_scale_schedule`); None: 1.

    Returns:
      The guided denoiser, for ``sample(..., prediction="prediction")``.

    References:
      Dhariwal & Nichol (2021), §4.2 (ε-form of classifier guidance); Ma et al. (2024),
      "Elucidating The Design Space of Classifier-Guided Diffusion Generation", and its
      reference code (EluCD).
    """
    if through_denoiser and not on_x0:
        raise ValueError("through_denoiser=True needs on_x0=True (it differentiates x̂₀(x_t)).")
    if temperature <= 0 or (marginal_temperature is not None and marginal_temperature <= 0):
        raise ValueError("temperatures must be > 0.")

    def log_prob(u: Array, t_cls: Array, labels: Array) -> Array:
        tb = jnp.full((u.shape[0],), t_cls, u.dtype)
        logits = logits_fn(u, tb)
        return calibrated_log_prob(logits, labels, temperature, marginal_temperature)

    def grad_log_prob(u: Array, t_cls: Array, labels: Array) -> Array:
        # Samples are independent: the gradient of the sum is the per-sample gradient.
        return jax.grad(lambda v: jnp.sum(log_prob(v, t_cls, labels)))(u)

    def guided(x: Array, t: ArrayLike, **cond: Any) -> Prediction:
        if label_key not in cond:
            raise ValueError(f"classifier guidance needs the labels as cond[{label_key!r}].")
        labels = jnp.asarray(cond[label_key])
        t = jnp.asarray(t, x.dtype)
        if through_denoiser:

            def objective(v):
                p = denoise_fn(v, t, **cond)
                return jnp.sum(log_prob(p.x0, jnp.zeros_like(t), labels)), p

            g, pred = jax.grad(objective, has_aux=True)(x)
        else:
            pred = denoise_fn(x, t, **cond)
            if on_x0:
                g = grad_log_prob(jax.lax.stop_gradient(pred.x0), jnp.zeros_like(t), labels)
            else:
                g = grad_log_prob(x, t, labels)
        s = scale if scale_schedule is None else scale * scale_schedule(t)
        a, sig = schedule.alpha(t), schedule.sigma(t)
        eps = pred.eps - s * sig * g
        return Prediction((x - sig * eps) / a, eps)

    return guided


@functools.partial(jax.jit, static_argnames="iterations")
def fit_temperature(
    logits: Float[ArrayLike, "n k"],
    labels: Int[ArrayLike, " n"],
    t_min: float = 1e-3,
    t_max: float = 1e3,
    iterations: int = 100,
) -> Array:
    """The NLL-minimising temperature T of softmax(f/T) on held-out (logits, labels).

        T* = argmin_T  −(1/n) Σ_i log softmax(f_i/T)_{y_i}.

    The NLL is convex in β = 1/T with derivative E_i[E_{softmax(βf_i)}[f] − f_{i,y_i}],
    increasing in β, so bisection on log β finds the root; T is clipped to [t_min, t_max]
    (a perfectly separable set drives T → 0).

    Returns:
      T, a scalar.

    References:
      Guo et al. (2017), "On Calibration of Modern Neural Networks", §4.2.
    """
    f = jnp.asarray(logits, jnp.result_type(float))
    y = jnp.asarray(labels)
    if f.ndim != 2 or y.shape != f.shape[:1]:
        raise ValueError(f"need logits (n, k) and labels (n,), got {f.shape} and {y.shape}.")
    fy = jnp.take_along_axis(f, y[:, None], axis=1)[:, 0]

    def dnll(log_beta):
        p = jax.nn.softmax(jnp.exp(log_beta) * f, axis=1)
        return jnp.mean(jnp.sum(p * f, axis=1) - fy)

    log_beta = bisect(
        dnll, jnp.log(1.0 / t_max), jnp.log(1.0 / t_min), increasing=True, iterations=iterations
    )
    return jnp.exp(-log_beta)


@functools.partial(jax.jit, static_argnames="num_bins")
def ece(probs: Float[ArrayLike, "n k"], labels: Int[ArrayLike, " n"], num_bins: int = 15) -> Array:
    """Expected calibration error of the top-class confidence, equal-width bins on [0, 1].

        ECE = Σ_b (|B_b|/n) |acc(B_b) − conf(B_b)|,
        conf_i = max_k p_ik,   acc_i = [argmax_k p_ik = y_i].

    References:
      Guo et al. (2017), "On Calibration of Modern Neural Networks", eq. 3.
    """
    p = jnp.asarray(probs)
    y = jnp.asarray(labels)
    if p.ndim != 2 or y.shape != p.shape[:1]:
        raise ValueError(f"need probs (n, k) and labels (n,), got {p.shape} and {y.shape}.")
    conf = jnp.max(p, axis=1)
    acc = (jnp.argmax(p, axis=1) == y).astype(p.dtype)
    bins = jnp.clip(jnp.ceil(conf * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
    gap = jax.ops.segment_sum(acc - conf, bins, num_segments=num_bins)
    return jnp.sum(jnp.abs(gap)) / p.shape[0]
