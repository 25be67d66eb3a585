"""Second-order diffusion ODE solvers: EDM Heun, Heun on the PF/velocity ODE, DPM-Solver++(2M).

Same `Solver(init, step, schedule)` shape and the same pair form as `solvers` (x_t read as
x̂_t = α_t x̂₀ + σ_t ε̂ so that guidance returning an inconsistent pair acts through the solver;
identical to the published updates for a consistent pair). The Heun solvers evaluate the model
twice per step, except a step that ends at σ_s = 0, which is an Euler step (EDM Alg. 1, line 7);
DPM-Solver++(2M) evaluates it once per step and carries the previous x̂₀ in its state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from feynkit.core.types import Array, Key
from feynkit.inference.diffusion.prediction import Prediction
from feynkit.inference.diffusion.sampler import PredictFn, Solver

__all__ = ["DPMSolverState", "dpm_solver_pp_2m", "flow_heun", "heun", "probability_flow_heun"]


def _no_state(x: Array) -> None:
    return None


def heun(schedule: Any) -> Solver:
    """EDM's deterministic Heun sampler, in the scaled coordinates x̃ = x/α, σ̃ = σ/α.

        dx̃/dσ̃ = d(x̃, σ̃) = (x̃ − x̂₀)/σ̃ = ε̂                        (EDM eq. 1 with s = 1)
        Euler:     x̃' = x̃ + (σ̃_s − σ̃_t) d₁ = x̂₀ + σ̃_s ε̂           (= DDIM)
        corrector: x̃_s = x̃ + (σ̃_s − σ̃_t)(d₁ + d₂)/2 = x̃' + (σ̃_s − σ̃_t)(ε̂₂ − ε̂₁)/2,

    with (x̂₀, ε̂₁) at (x, t) and ε̂₂ at (α_s x̃', s); x_s = α_s x̃_s. The slope is read as ε̂
    (pair form), which equals EDM's (x̃ − D)/σ̃ for a consistent pair and avoids its cancellation
    at small σ̃. The corrector is skipped (Euler, one evaluation) when σ̃_s = 0. Any VP (or
    other) schedule maps to this variance-exploding form, so it is Karras et al.'s sampler on
    σ̃ = exp(−λ/2) for the grid the caller gives (e.g. `time_grid(..., spacing="edm")`). Second
    order; two evaluations per step. Needs α_t > 0 (t_max < 1 on rectified flow).

    References:
      Karras, Aittala, Aila & Laine (2022), "Elucidating the Design Space of Diffusion-Based
      Generative Models", Alg. 1 (and Alg. 2 with S_churn = 0), §4.
    """

    def step(key: Key, x: Array, state: None, predict: PredictFn, carry, t, t_next):
        p1, carry = predict(x, t, carry)
        a_s = schedule.alpha(t_next)
        st_t = schedule.sigma(t) / schedule.alpha(t)
        st_s = schedule.sigma(t_next) / a_s
        xt_euler = p1.x0 + st_s * p1.eps

        def correct(carry):
            p2, carry = predict(a_s * xt_euler, t_next, carry)
            return xt_euler + 0.5 * (st_s - st_t) * (p2.eps - p1.eps), carry

        xt_next, carry = jax.lax.cond(st_s > 0, correct, lambda c: (xt_euler, c), carry)
        return a_s * xt_next, state, carry

    return Solver(_no_state, step, schedule, name="heun", stochastic=False)


def _heun_in_t(
    schedule: Any, rhs: Callable[[Prediction, Array, Array], Array], name: str
) -> Solver:
    """Heun (explicit trapezoid) in t on dx/dt = rhs(pred, x̂, t), x̂ = α x̂₀ + σ ε̂."""

    def point(pred, t):
        return schedule.alpha(t) * pred.x0 + schedule.sigma(t) * pred.eps

    def step(key: Key, x: Array, state: None, predict: PredictFn, carry, t, t_next):
        p1, carry = predict(x, t, carry)
        dt = t_next - t
        v1 = rhs(p1, point(p1, t), t)
        x_euler = point(p1, t) + dt * v1

        def correct(carry):
            p2, carry = predict(x_euler, t_next, carry)
            return x_euler + 0.5 * dt * (rhs(p2, point(p2, t_next), t_next) - v1), carry

        x_next, carry = jax.lax.cond(
            schedule.sigma(t_next) > 0, correct, lambda c: (x_euler, c), carry
        )
        return x_next, state, carry

    return Solver(_no_state, step, schedule, name=name, stochastic=False)


def probability_flow_heun(schedule: Any) -> Solver:
    """Heun's method in t on the probability-flow ODE dx/dt = f x + ½ g² ε̂/σ.

        v = f(t) x̂_t + ½ g(t)² ε̂ / σ_t,   x' = x̂_t + Δ v₁,   x_s = x' + ½ Δ (v₂ − v₁),

    Δ = s − t, v₂ at (x', s); Euler when σ_s = 0. Second order; two evaluations per step.

    References:
      Song et al. (2021), "Score-Based Generative Modeling through Stochastic Differential
      Equations", eq. 13; Karras et al. (2022), "Elucidating the Design Space of
      Diffusion-Based Generative Models", Alg. 1 (Heun).
    """

    def rhs(pred, x, t):
        return schedule.drift_coef(t) * x + 0.5 * schedule.beta(t) / schedule.sigma(t) * pred.eps

    return _heun_in_t(schedule, rhs, "probability_flow_heun")


def flow_heun(schedule: Any) -> Solver:
    """Heun's method in t on the velocity ODE dx/dt = α' x̂₀ + σ' ε̂ (flow matching).

        u = α'_t x̂₀ + σ'_t ε̂,   x' = x̂_t + Δ u₁,   x_s = x' + ½ Δ (u₂ − u₁),

    Δ = s − t, u₂ at (x', s); Euler when σ_s = 0. On `RectifiedFlowSchedule` it may start at
    t = 1 with a "velocity" model. Second order; two evaluations per step.

    References:
      Lipman et al. (2023), "Flow Matching for Generative Modeling"; Karras et al. (2022),
      "Elucidating the Design Space of Diffusion-Based Generative Models", Alg. 1 (Heun).
    """

    def rhs(pred, x, t):
        return schedule.dalpha_dt(t) * pred.x0 + schedule.dsigma_dt(t) * pred.eps

    return _heun_in_t(schedule, rhs, "flow_heun")


class DPMSolverState(NamedTuple):
    """The multistep memory of DPM-Solver++(2M): the previous x̂₀, the previous step
    h = λ_s − λ_t in λ = log(α/σ), and whether there is a previous step."""

    x0_prev: Array
    h_prev: Array
    has_prev: Array


def dpm_solver_pp_2m(schedule: Any) -> Solver:
    """DPM-Solver++(2M): second-order multistep exponential integrator in data prediction.

    In λ = log(α/σ), with h = λ_s − λ_t > 0 and r = h_prev / h,

        D = (1 + 1/(2r)) x̂₀ − 1/(2r) x̂₀_prev          (first step, or σ_s = 0: D = x̂₀)
        x_s = (σ_s/σ_t) x_t − α_s (e^{−h} − 1) D                            (Lu et al. Alg. 2)
            = α_s x̂₀ + σ_s ε̂ + α_s (1 − e^{−h}) (D − x̂₀)                    (pair form),

    the DDIM step plus a linear extrapolation of x̂₀ in λ. One evaluation per step; the state
    (`DPMSolverState`) holds the previous x̂₀ and h. Second order for smooth grids.

    References:
      Lu, Zhou, Bao, Chen, Li & Zhu (2022), "DPM-Solver++: Fast Solver for Guided Sampling of
      Diffusion Probabilistic Models", Alg. 2.
    """

    def init(x: Array) -> DPMSolverState:
        return DPMSolverState(jnp.zeros_like(x), jnp.zeros((), x.dtype), jnp.asarray(False))

    def step(key: Key, x: Array, state: DPMSolverState, predict: PredictFn, carry, t, t_next):
        pred, carry = predict(x, t, carry)
        a_s, s_s = schedule.alpha(t_next), schedule.sigma(t_next)
        h = 0.5 * (schedule.log_snr(t_next) - schedule.log_snr(t))
        one_minus_exp = (1.0 - (s_s / a_s) / (schedule.sigma(t) / schedule.alpha(t))).astype(
            x.dtype
        )  # 1 − e^{−h} = 1 − σ̃_s/σ̃_t, finite at σ_s = 0
        second = state.has_prev & (s_s > 0)
        half_inv_r = jnp.where(second, h / (2.0 * jnp.where(second, state.h_prev, 1.0)), 0.0)
        d_minus_x0 = half_inv_r.astype(x.dtype) * (pred.x0 - state.x0_prev)
        x_next = a_s * pred.x0 + s_s * pred.eps + a_s * one_minus_exp * d_minus_x0
        new_state = DPMSolverState(pred.x0, h.astype(x.dtype), jnp.asarray(True))
        return x_next, new_state, carry

    return Solver(init, step, schedule, name="dpm_solver_pp_2m", stochastic=False)
