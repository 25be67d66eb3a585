"""Diffusion solvers as `Solver(init, step, schedule)` for the one loop in `sampler.sample`.

Every solver reads the schedule's α_t, σ_t (and, for SDE/ODE forms, f = d log α/dt and
g² = dσ²/dt − 2 f σ²) and the `Prediction` (x̂₀, ε̂) the guided model gives, so any schedule
(VP, rectified flow) and any guidance combine with any solver.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from feynkit.core.types import Array, Key
from feynkit.inference.diffusion.sampler import PredictFn, Solver

__all__ = ["ddim"]


def _no_state(x: Array) -> None:
    return None


def ddim(schedule: Any, eta: float = 0.0) -> Solver:
    """DDIM with stochasticity η (η = 0: deterministic DDIM; η = 1: DDPM ancestral sampling).

        x_{s} = α_s x̂₀ + sqrt(σ_s² − c²) ε̂ + c z,   c = η σ_s sqrt(1 − SNR_t / SNR_s),

    for a step t → s < t with SNR = α²/σ², z ~ N(0, I). For a VP schedule c equals DDIM's
    σ_t(η) = η sqrt((1 − ᾱ_s)/(1 − ᾱ_t)) sqrt(1 − ᾱ_t/ᾱ_s) with ᾱ = α².

    References:
      Song, Meng & Ermon (2021), "Denoising Diffusion Implicit Models", eq. 12 and 16.
    """
    if eta < 0:
        raise ValueError(f"ddim needs eta ≥ 0, got {eta}.")

    def step(key: Key, x: Array, state: None, predict: PredictFn, carry, t, t_next):
        pred, carry = predict(x, t, carry)
        a_s, s_s = schedule.alpha(t_next), schedule.sigma(t_next)
        snr_ratio = (schedule.alpha(t) / schedule.sigma(t)) ** 2 / (a_s / s_s) ** 2
        c = eta * s_s * jnp.sqrt(jnp.clip(1.0 - snr_ratio, 0.0, 1.0))
        x_next = a_s * pred.x0 + jnp.sqrt(jnp.maximum(s_s**2 - c**2, 0.0)) * pred.eps
        if eta > 0:
            x_next = x_next + c * jax.random.normal(key, x.shape, x.dtype)
        return x_next, state, carry

    return Solver(_no_state, step, schedule)
