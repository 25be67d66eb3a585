"""What a diffusion network predicts, and the conversions between parameterisations.

Every sampler and guidance method in `feynkit.inference.diffusion` works on a `Prediction`: the
pair (x̂₀, ε̂) at a point x_t = α_t x₀ + σ_t ε of a schedule with coefficients (α_t, σ_t). A
network may be trained to output any of

    "eps"       ε̂                                     (Ho et al. 2020)
    "x0"        x̂₀                                    (data prediction)
    "v"         v̂ = α ε̂ − σ x̂₀                        (Salimans & Ho 2022)
    "score"     ŝ = ∇ log p_t(x) = −ε̂ / σ             (Song et al. 2021)
    "velocity"  û = dx_t/dt = α' x̂₀ + σ' ε̂           (flow matching; û = ε̂ − x̂₀ when
                                                    α = 1 − t, σ = t)

and `to_prediction` solves the 2×2 linear system {x = α x̂₀ + σ ε̂, output} for (x̂₀, ε̂); it does
not assume α² + σ² = 1, so VP, VE and rectified-flow schedules share it. Guidance methods may
return a pair that is *not* consistent with x (CFG++ keeps the guided x̂₀ and the unconditional
ε̂); samplers then use x̂₀ and ε̂ as given.

References:
  Karras et al. (2022), "Elucidating the Design Space of Diffusion-Based Generative Models" §2;
  Salimans & Ho (2022), "Progressive Distillation for Fast Sampling of Diffusion Models" App. D;
  Lipman et al. (2023), "Flow Matching for Generative Modeling".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp

from feynkit.core.types import Array, ArrayLike, ModelFn, Schedule

__all__ = [
    "PREDICTION_KINDS",
    "Prediction",
    "as_denoiser",
    "from_prediction",
    "to_prediction",
]

PREDICTION_KINDS = ("eps", "x0", "v", "score", "velocity")


class Prediction(NamedTuple):
    """Denoised estimate x̂₀ = E[x₀ | x_t] and noise estimate ε̂ = E[ε | x_t] at one time."""

    x0: Array
    eps: Array


def _check_kind(kind: str) -> None:
    if kind not in PREDICTION_KINDS:
        raise ValueError(f"unknown prediction kind {kind!r}; choose one of {PREDICTION_KINDS}.")


def _coefs(schedule: Schedule, t: ArrayLike, kind: str) -> tuple[Array, ...]:
    a, s = schedule.alpha(t), schedule.sigma(t)
    if kind == "velocity":
        return a, s, schedule.dalpha_dt(t), schedule.dsigma_dt(t)
    return a, s, None, None


def to_prediction(
    kind: str, output: ArrayLike, x: ArrayLike, schedule: Schedule, t: ArrayLike
) -> Prediction:
    """(x̂₀, ε̂) from a network output of the given kind at x_t, time t (a scalar).

    Args:
      kind: one of `PREDICTION_KINDS`.
      output: the network output, shaped like x.
      x: the current point x_t.
      schedule: anything with ``alpha(t)``, ``sigma(t)`` (and ``dalpha_dt``/``dsigma_dt`` for
        "velocity"), e.g. `feynkit.core.LinearSchedule`.
      t: the time, a scalar.
    """
    _check_kind(kind)
    out, x = jnp.asarray(output), jnp.asarray(x)
    a, s, da, ds = _coefs(schedule, t, kind)
    if kind == "eps":
        return Prediction((x - s * out) / a, out)
    if kind == "x0":
        return Prediction(out, (x - a * out) / s)
    if kind == "score":
        eps = -s * out
        return Prediction((x - s * eps) / a, eps)
    if kind == "v":  # x = a x0 + s e, v = a e − s x0
        norm = a * a + s * s
        return Prediction((a * x - s * out) / norm, (s * x + a * out) / norm)
    det = a * ds - s * da  # velocity: x = a x0 + s e, u = a' x0 + s' e
    return Prediction((ds * x - s * out) / det, (a * out - da * x) / det)


def from_prediction(kind: str, pred: Prediction, schedule: Schedule, t: ArrayLike) -> Array:
    """The network output of the given kind that `pred` corresponds to (inverse of
    `to_prediction` for a consistent pair)."""
    _check_kind(kind)
    a, s, da, ds = _coefs(schedule, t, kind)
    if kind == "eps":
        return pred.eps
    if kind == "x0":
        return pred.x0
    if kind == "score":
        return -pred.eps / s
    if kind == "v":
        return a * pred.eps - s * pred.x0
    return da * pred.x0 + ds * pred.eps


def as_denoiser(
    model_fn: ModelFn, schedule: Schedule, kind: str = "eps"
) -> Callable[..., Prediction]:
    """Wrap ``model_fn(x, t, **cond) -> output`` into ``denoise(x, t, **cond) -> Prediction``.

    `t` is a scalar; the model receives it broadcast to ``(batch,)``, the shape Flax score
    networks in `feynkit.models` take. A model that already returns a `Prediction` passes
    through when ``kind == "prediction"``.
    """
    if kind == "prediction":
        return lambda x, t, **cond: model_fn(x, t, **cond)
    _check_kind(kind)

    def denoise(x: Array, t: ArrayLike, **cond: Any) -> Prediction:
        tb = jnp.full((x.shape[0],), t, dtype=x.dtype)
        return to_prediction(kind, model_fn(x, tb, **cond), x, schedule, t)

    return denoise
