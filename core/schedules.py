"""Noise schedules x_t = α_t x_0 + σ_t ε: variance-preserving (VP, σ_t² = 1 − α_t²) and the
rectified-flow path α_t = 1 − t, σ_t = t.

A schedule is a frozen dataclass (a static pytree: it can be closed over or passed to `jit` as a
static argument) with α_t, σ_t, their time derivatives and the coefficients of the forward SDE

    dx = f(t) x dt + g(t) dW,   f(t) = d log α_t / dt = −β(t)/2,   g(t)² = β(t),

with t ∈ [0, 1], t = 0 the data end. Every method checks t against that domain: a concrete t
outside [0, 1] (or NaN) raises a ValueError naming t; under ``jit`` (traced t) the value at an
out-of-domain time is NaN instead of an extrapolation (β(−0.5) of the linear schedule would
be a plausible-looking negative number), which the sampler's non-finite check reports. β(t) = −2 d log α_t/dt is the instantaneous noise rate.
For a general path (α_t, σ_t) the SDE with these marginals has f = d log α_t/dt and
g² = dσ_t²/dt − 2 f σ_t²; every schedule exposes `beta(t)` = g² and `drift_coef(t)` = f, so
solvers written in (α_t, σ_t, f, g²) run on all of them.

References:
  Song et al. (2021), "Score-Based Generative Modeling through Stochastic Differential Equations"
  (the linear VP SDE); Nichol & Dhariwal (2021), "Improved Denoising Diffusion Probabilistic
  Models" (the cosine schedule); Liu, Gong & Liu (2023), "Flow Straight and Fast" and Lipman
  et al. (2023), "Flow Matching for Generative Modeling" (the rectified-flow path); Kingma et al.
  (2021), "Variational Diffusion Models" eq. 11–12 (f and g² of a general path).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from feynkit.core.types import Array, ArrayLike

__all__ = [
    "CosineSchedule",
    "LinearSchedule",
    "RectifiedFlowSchedule",
    "VPSchedule",
    "get_schedule",
]


def _time(t: ArrayLike) -> tuple[Array, Array | None]:
    """(t as an array, in-domain mask or None). Concrete t outside [0, 1] raises."""
    if isinstance(t, jax.core.Tracer):
        t = jnp.asarray(t)
        return t, (t >= 0) & (t <= 1)
    tn = np.asarray(t)
    if tn.size and not np.all((tn >= 0) & (tn <= 1)):
        bad = tn[~((tn >= 0) & (tn <= 1))].ravel()[:3]
        raise ValueError(
            f"t={bad.tolist()} is outside the schedule's time domain [0, 1] (t = 0 is data, "
            "t = 1 noise); pass times in [0, 1], e.g. from diffusion.time_grid."
        )
    return jnp.asarray(t), None


def _masked(value: Array, ok: Array | None) -> Array:
    """NaN where a traced t was outside [0, 1]."""
    return value if ok is None else jnp.where(ok, value, jnp.nan)


class VPSchedule:
    """Shared derived quantities; subclasses define `log_alpha` and `beta`."""

    def log_alpha(self, t: ArrayLike) -> Array:
        raise NotImplementedError

    def beta(self, t: ArrayLike) -> Array:
        """β(t) = −2 d log α_t / dt = g(t)²."""
        raise NotImplementedError

    def alpha(self, t: ArrayLike) -> Array:
        return jnp.exp(self.log_alpha(t))

    def sigma(self, t: ArrayLike) -> Array:
        # −expm1(2 log α) = 1 − α² without cancellation at small t.
        return jnp.sqrt(-jnp.expm1(2.0 * self.log_alpha(t)))

    def dalpha_dt(self, t: ArrayLike) -> Array:
        """dα/dt = −β α / 2."""
        return -0.5 * self.beta(t) * self.alpha(t)

    def dsigma_dt(self, t: ArrayLike) -> Array:
        """dσ/dt = β α² / (2σ), from σ² = 1 − α²."""
        return 0.5 * self.beta(t) * self.alpha(t) ** 2 / self.sigma(t)

    def drift_coef(self, t: ArrayLike) -> Array:
        """f(t) in the forward SDE dx = f(t) x dt + g(t) dW."""
        return -0.5 * self.beta(t)

    def diffusion(self, t: ArrayLike) -> Array:
        """g(t) = sqrt(β(t))."""
        return jnp.sqrt(self.beta(t))

    def log_snr(self, t: ArrayLike) -> Array:
        """λ_t = log(α_t² / σ_t²)."""
        return 2.0 * (self.log_alpha(t) - jnp.log(self.sigma(t)))


@dataclasses.dataclass(frozen=True)
class LinearSchedule(VPSchedule):
    """β(t) = β_min + t (β_max − β_min); log α_t = −(β_min t + (β_max − β_min) t²/2)/2."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def __post_init__(self):
        if not (0 < self.beta_min <= self.beta_max and math.isfinite(self.beta_max)):
            raise ValueError(
                "LinearSchedule needs 0 < beta_min <= beta_max, both finite; got "
                f"{self.beta_min}, {self.beta_max} (beta_min, beta_max)."
            )

    def log_alpha(self, t: ArrayLike) -> Array:
        t, ok = _time(t)
        return _masked(
            -0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2), ok
        )

    def beta(self, t: ArrayLike) -> Array:
        t, ok = _time(t)
        return _masked(self.beta_min + t * (self.beta_max - self.beta_min), ok)


@dataclasses.dataclass(frozen=True)
class CosineSchedule(VPSchedule):
    """α_t = cos(φ_t)/cos(φ_0), φ_t = (t + s)/(1 + s) · π/2; β(t) = π tan(φ_t)/(1 + s).

    α_1 = 0 and β(t) → ∞ as t → 1: samplers start at t_max < 1 (e.g. 1 − 1e-3).
    """

    s: float = 0.008

    def __post_init__(self):
        if not (self.s > 0 and math.isfinite(self.s)):
            raise ValueError(f"CosineSchedule needs s > 0 (finite), got s={self.s}.")

    def _phi(self, t: ArrayLike) -> Array:
        return (jnp.asarray(t) + self.s) / (1.0 + self.s) * (math.pi / 2)

    def log_alpha(self, t: ArrayLike) -> Array:
        # With φ_t = φ_0 + δ: α_t = cos δ − tan φ_0 sin δ = 1 − 2 sin²(δ/2) − tan φ_0 sin δ.
        # log1p of that keeps σ_t accurate at small t, where log cos φ_t − log cos φ_0 in
        # float32 is off by an ulp of cos (σ_0 came out as 2.4e-4 instead of 0).
        # At t = 1 the argument is −1 up to rounding: clamp so α_1 = 0 (log α = −inf), not NaN.
        t, ok = _time(t)
        delta = t / (1.0 + self.s) * (math.pi / 2)
        tan_phi0 = math.tan(self.s / (1.0 + self.s) * math.pi / 2)
        arg = -2.0 * jnp.sin(0.5 * delta) ** 2 - tan_phi0 * jnp.sin(delta)
        return _masked(jnp.log1p(jnp.maximum(arg, -1.0)), ok)

    def beta(self, t: ArrayLike) -> Array:
        t, ok = _time(t)
        return _masked(math.pi * jnp.tan(self._phi(t)) / (1.0 + self.s), ok)


@dataclasses.dataclass(frozen=True)
class RectifiedFlowSchedule:
    """The rectified-flow / flow-matching path α_t = 1 − t, σ_t = t (not variance preserving).

        α' = −1,  σ' = 1,  f = d log α/dt = −1/(1 − t),
        g² = dσ²/dt − 2 f σ² = 2t + 2t²/(1 − t) = 2t/(1 − t),  λ_t = 2 log((1 − t)/t).

    The velocity ODE dx/dt = α' x̂₀ + σ' ε̂ = ε̂ − x̂₀ is regular on [0, 1]; f and g² blow up as
    t → 1 (α_1 = 0), so SDE and ε-parameterised solvers start at t_max < 1 (e.g. 1 − 1e-3),
    while `flow_euler` with a "velocity" model may start at t = 1. It has the same methods as
    `VPSchedule`, so samplers, `time_grid` and `to_prediction` take either.

    References:
      Liu, Gong & Liu (2023), "Flow Straight and Fast: Learning to Generate and Transfer Data
      with Rectified Flow"; Lipman et al. (2023), "Flow Matching for Generative Modeling".
    """

    def log_alpha(self, t: ArrayLike) -> Array:
        t, ok = _time(t)
        return _masked(jnp.log1p(-t), ok)

    def alpha(self, t: ArrayLike) -> Array:
        t, ok = _time(t)
        return _masked(1.0 - t, ok)

    def sigma(self, t: ArrayLike) -> Array:
        t, ok = _time(t)
        return _masked(1.0 * t, ok)

    def dalpha_dt(self, t: ArrayLike) -> Array:
        """dα/dt = −1."""
        return -jnp.ones_like(self.sigma(t))

    def dsigma_dt(self, t: ArrayLike) -> Array:
        """dσ/dt = 1."""
        return jnp.ones_like(self.sigma(t))

    def drift_coef(self, t: ArrayLike) -> Array:
        """f(t) = d log α_t / dt = −1/(1 − t)."""
        t, ok = _time(t)
        return _masked(-1.0 / (1.0 - t), ok)

    def beta(self, t: ArrayLike) -> Array:
        """g(t)² = dσ²/dt − 2 f σ² = 2t/(1 − t)."""
        t, ok = _time(t)
        return _masked(2.0 * t / (1.0 - t), ok)

    def diffusion(self, t: ArrayLike) -> Array:
        """g(t) = sqrt(2t/(1 − t))."""
        return jnp.sqrt(self.beta(t))

    def log_snr(self, t: ArrayLike) -> Array:
        """λ_t = log(α_t² / σ_t²) = 2 (log(1 − t) − log t)."""
        return 2.0 * (self.log_alpha(t) - jnp.log(self.sigma(t)))


def get_schedule(name: str, **kwargs) -> VPSchedule | RectifiedFlowSchedule:
    """Construct a schedule by name: "linear", "cosine" or "rectified_flow"."""
    table = {
        "linear": LinearSchedule,
        "cosine": CosineSchedule,
        "rectified_flow": RectifiedFlowSchedule,
    }
    if name not in table:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(table)}.")
    return table[name](**kwargs)
