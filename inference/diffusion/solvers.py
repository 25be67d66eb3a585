"""Diffusion solvers as `Solver(init, step, schedule)` for the one loop in `sampler.sample`.

Every solver reads the schedule's α_t, σ_t (and, for SDE/ODE forms, f = d log α/dt and
g² = dσ²/dt − 2 f σ², or α' and σ') and the `Prediction` (x̂₀, ε̂) the guided model gives, so any
schedule (VP, rectified flow) and any guidance combine with any solver.

**Pair form.** Each update is written in terms of the pair only: wherever a textbook update uses
the current point x_t it uses x̂_t = α_t x̂₀ + σ_t ε̂ instead, which equals x_t for a consistent
prediction (an unguided or CFG-guided model), so the solvers are exactly the published ones
there. A guidance method that returns an inconsistent pair on purpose (CFG++ keeps the guided x̂₀
and re-noises with the unconditional ε̂) then acts through every solver, as
`feynkit.inference.diffusion.guidance` expects. A step t → s (s < t) of each one-evaluation
solver is ``x_s = a · x̂₀ + b · ε̂ (+ c z)``:

    ddim(η)           a = α_s,            b = sqrt(σ_s² − c²),        c = η σ_s sqrt(1 − ρ)
    ddpm              a = α_s,            b = σ_s sqrt(ρ),            c = σ_s sqrt(1 − ρ)
    euler_maruyama    a = (1 + f Δ) α_t,  b = (1 + f Δ) σ_t + g² Δ/σ_t,   c = g sqrt(−Δ)
    probability_flow  a = (1 + f Δ) α_t,  b = (1 + f Δ) σ_t + ½ g² Δ/σ_t
    flow_euler        a = α_t + α'_t Δ,   b = σ_t + σ'_t Δ

with ρ = SNR_t/SNR_s (SNR = α²/σ²), Δ = s − t < 0 and f, g², α', σ' at t. probability_flow
and flow_euler are the same Euler step (the PF-ODE and the velocity ODE coincide); on α = 1 − t,
σ = t flow_euler is DDIM.
Second-order solvers (heun, dpm_solver_pp_2m, ...) are in `solvers_second_order` and re-exported
here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from feynkit.core.types import Array, Key
from feynkit.inference.diffusion.prediction import Prediction
from feynkit.inference.diffusion.sampler import PredictFn, Solver
from feynkit.inference.diffusion.solvers_second_order import (
    DPMSolverState,
    dpm_solver_pp_2m,
    flow_heun,
    heun,
    probability_flow_heun,
)

__all__ = [
    "DPMSolverState",
    "ddim",
    "ddpm",
    "dpm_solver_pp_2m",
    "euler_maruyama",
    "flow_euler",
    "flow_heun",
    "heun",
    "probability_flow",
    "probability_flow_heun",
]


def _no_state(x: Array) -> None:
    return None


def _snr_ratio_complement(schedule: Any, t: Array, t_next: Array) -> Array:
    """1 − SNR_t / SNR_s ∈ [0, 1] for s = t_next < t."""
    snr_ratio = (schedule.alpha(t) / schedule.sigma(t)) ** 2 / (
        schedule.alpha(t_next) / schedule.sigma(t_next)
    ) ** 2
    return jnp.clip(1.0 - snr_ratio, 0.0, 1.0)


def _point(schedule: Any, pred: Prediction, t: Array) -> Array:
    """x̂_t = α_t x̂₀ + σ_t ε̂ (= x_t for a consistent prediction)."""
    return schedule.alpha(t) * pred.x0 + schedule.sigma(t) * pred.eps


def ddim(schedule: Any, eta: float = 0.0) -> Solver:
    """DDIM with stochasticity η (η = 0: deterministic DDIM; η = 1: DDPM ancestral sampling).

        x_{s} = α_s x̂₀ + sqrt(σ_s² − c²) ε̂ + c z,   c = η σ_s sqrt(1 − SNR_t / SNR_s),

    for a step t → s < t with SNR = α²/σ², z ~ N(0, I). For a VP schedule c equals DDIM's
    σ_t(η) = η sqrt((1 − ᾱ_s)/(1 − ᾱ_t)) sqrt(1 − ᾱ_t/ᾱ_s) with ᾱ = α². η = 0 is the exact
    solution of the probability-flow ODE with x̂₀ frozen over the step: first order in the step.

    References:
      Song, Meng & Ermon (2021), "Denoising Diffusion Implicit Models", eq. 12 and 16.
    """
    if eta < 0:
        raise ValueError(f"ddim needs eta ≥ 0, got {eta}.")

    def step(key: Key, x: Array, state: None, predict: PredictFn, carry, t, t_next):
        pred, carry = predict(x, t, carry)
        a_s, s_s = schedule.alpha(t_next), schedule.sigma(t_next)
        c = eta * s_s * jnp.sqrt(_snr_ratio_complement(schedule, t, t_next))
        x_next = a_s * pred.x0 + jnp.sqrt(jnp.maximum(s_s**2 - c**2, 0.0)) * pred.eps
        if eta > 0:
            x_next = x_next + c * jax.random.normal(key, x.shape, x.dtype)
        return x_next, state, carry

    return Solver(_no_state, step, schedule, name="ddim", stochastic=bool(eta > 0))


def ddpm(schedule: Any) -> Solver:
    """DDPM ancestral sampling: x_s ~ q(x_s | x_t, x̂₀), the forward-process posterior.

        μ̃ = (α_{t|s} σ_s² / σ_t²) x_t + (α_s σ_{t|s}² / σ_t²) x̂₀,   β̃ = σ_{t|s}² σ_s² / σ_t²,
        α_{t|s} = α_t / α_s,   σ_{t|s}² = σ_t² − α_{t|s}² σ_s² = σ_t² (1 − SNR_t / SNR_s),

    x_s = μ̃ + sqrt(β̃) z, with x_t read as α_t x̂₀ + σ_t ε̂ (pair form). Substituting,
    μ̃ = α_s x̂₀ + σ_s sqrt(SNR_t/SNR_s) ε̂ and sqrt(β̃) = σ_s sqrt(1 − SNR_t/SNR_s): the update
    is `ddim` with η = 1, and with the same key it draws the same z (identical samples). For a
    VP schedule on the discrete grid this is Ho et al.'s eq. 6–7 with ᾱ = α², σ² = β̃.

    References:
      Ho, Jain & Abbeel (2020), "Denoising Diffusion Probabilistic Models", eq. 6–7 and Alg. 2;
      Kingma et al. (2021), "Variational Diffusion Models", eq. 33 (general α, σ).
    """

    def step(key: Key, x: Array, state: None, predict: PredictFn, carry, t, t_next):
        pred, carry = predict(x, t, carry)
        a_t, s_t = schedule.alpha(t), schedule.sigma(t)
        a_s, s_s = schedule.alpha(t_next), schedule.sigma(t_next)
        one_minus_r = _snr_ratio_complement(schedule, t, t_next)  # σ_{t|s}² / σ_t²
        x_t = a_t * pred.x0 + s_t * pred.eps
        mean = (a_t / a_s) * (s_s / s_t) ** 2 * x_t + a_s * one_minus_r * pred.x0
        std = s_s * jnp.sqrt(one_minus_r)
        x_next = mean + std * jax.random.normal(key, x.shape, x.dtype)
        return x_next, state, carry

    return Solver(_no_state, step, schedule, name="ddpm", stochastic=True)


def euler_maruyama(schedule: Any) -> Solver:
    """Euler–Maruyama on the reverse-time SDE, backwards from t to s = t + Δ (Δ < 0).

        dx = [f(t) x − g(t)² ∇log p_t(x)] dt + g(t) dW̄,   ∇log p_t = −ε̂ / σ_t,
        x_s = x̂_t + (f x̂_t + g² ε̂ / σ_t) Δ + g sqrt(−Δ) z,   x̂_t = α_t x̂₀ + σ_t ε̂,

    f = d log α/dt and g² = dσ²/dt − 2 f σ² from the schedule (`drift_coef`, `beta`).
    Strong order ½, weak order 1 in the step. Needs α_t > 0 where f is finite (t_max < 1 on
    rectified flow).

    References:
      Anderson (1982), "Reverse-time diffusion equation models"; Song et al. (2021),
      "Score-Based Generative Modeling through Stochastic Differential Equations", eq. 6;
      Kloeden & Platen (1992), "Numerical Solution of Stochastic Differential Equations" §10.2.
    """

    def step(key: Key, x: Array, state: None, predict: PredictFn, carry, t, t_next):
        pred, carry = predict(x, t, carry)
        dt = t_next - t
        f, g2 = schedule.drift_coef(t), schedule.beta(t)
        x_t = _point(schedule, pred, t)
        drift = f * x_t + g2 / schedule.sigma(t) * pred.eps
        noise = jnp.sqrt(g2 * -dt) * jax.random.normal(key, x.shape, x.dtype)
        return x_t + dt * drift + noise, state, carry

    return Solver(_no_state, step, schedule, name="euler_maruyama", stochastic=True)


def probability_flow(schedule: Any) -> Solver:
    """Euler on the probability-flow ODE (deterministic, first order).

        dx/dt = f(t) x − ½ g(t)² ∇log p_t(x) = f x + ½ g² ε̂ / σ_t,
        x_s = x̂_t + Δ (f x̂_t + ½ g² ε̂ / σ_t),   x̂_t = α_t x̂₀ + σ_t ε̂,   Δ = s − t.

    For a consistent pair the right-hand side equals α' x̂₀ + σ' ε̂: the step is `flow_euler`.

    References:
      Song et al. (2021), "Score-Based Generative Modeling through Stochastic Differential
      Equations", eq. 13.
    """

    def step(key: Key, x: Array, state: None, predict: PredictFn, carry, t, t_next):
        pred, carry = predict(x, t, carry)
        x_t = _point(schedule, pred, t)
        drift = schedule.drift_coef(t) * x_t + 0.5 * schedule.beta(t) / schedule.sigma(t) * pred.eps
        return x_t + (t_next - t) * drift, state, carry

    return Solver(_no_state, step, schedule, name="probability_flow", stochastic=False)


def flow_euler(schedule: Any) -> Solver:
    """Euler on the velocity ODE of the path x_t = α_t x₀ + σ_t ε (flow matching).

        dx/dt = u(x, t) = α'_t x̂₀ + σ'_t ε̂,     x_s = x̂_t + (s − t) u,

    with x̂_t = α_t x̂₀ + σ_t ε̂. On `RectifiedFlowSchedule` (α = 1 − t, σ = t) u = ε̂ − x̂₀, the
    step is exactly DDIM (x_s = (1 − s) x̂₀ + s ε̂), and it may start at t = 1 with a
    "velocity" model. On a VP schedule it is the probability-flow ODE (the same ODE in x).

    References:
      Lipman et al. (2023), "Flow Matching for Generative Modeling" §4; Liu, Gong & Liu (2023),
      "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow".
    """

    def step(key: Key, x: Array, state: None, predict: PredictFn, carry, t, t_next):
        pred, carry = predict(x, t, carry)
        u = schedule.dalpha_dt(t) * pred.x0 + schedule.dsigma_dt(t) * pred.eps
        return _point(schedule, pred, t) + (t_next - t) * u, state, carry

    return Solver(_no_state, step, schedule, name="flow_euler", stochastic=False)
