"""Feynman–Kac steering of diffusion samplers with a reward, and best-of-N.

FK steering runs n diffusion samples as SMC particles: each step moves them with any
`feynkit.inference.diffusion` solver and reweights them by a potential built from a reward r
evaluated on the denoised estimate x̂₀(x_t), so that the final weighted particles target the
tilted distribution

    p_λ(x₀) ∝ p(x₀) exp(λ r(x₀)).

Potentials (Singhal et al. 2025, §3): with r_k = r(x̂₀(x_{t_k})),

    "difference"  G_k = exp(λ (r_k − r_{k−1}))   (the product telescopes to exp(λ r_K));
    "max"         G_k = exp(λ (max_{j≤k} r_j − max_{j<k} r_j));
    "sum"         G_k = exp(λ r_k)               (favours paths that were good all along);

with initial weights exp(λ r_0). Only "difference" has intermediate targets p_t(x) exp(λ r(x̂₀))
whose last one is the tilt; "max" and "sum" are the paper's heuristics and end at other
distributions (exp(λ max_k r_k), exp(λ Σ_k r_k) tilts of the path).

The loop is `smc.base`'s kernel (mutate → reweight → adaptive resample). Each particle carries
the model's prediction at its current point, so a step reuses it for the move and evaluates the
model once at the new point (which the next step needs anyway): a run costs the solver's
evaluations plus one, as a plain `diffusion.sample` run with ``denoise_final`` does.

References:
  Singhal, Horvitz, Teehan, Ren, Yu, Cho & Ranganath (2025), "A General Framework for
  Inference-time Scaling and Steering of Diffusion Models"; Wu et al. (2023), "Practical and
  Asymptotically Exact Conditional Sampling in Diffusion Models" (twisted SMC).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from feynkit.core import systematic_resample
from feynkit.core.types import Array, ArrayLike, Key
from feynkit.inference.diffusion.prediction import Prediction, as_denoiser
from feynkit.inference.diffusion.sampler import (
    Guidance,
    Solver,
    guided_predict_fn,
    reuse_first_prediction,
)
from feynkit.inference.smc import base

__all__ = ["POTENTIALS", "SteeringResult", "best_of_n", "fk_steering"]

POTENTIALS = ("difference", "max", "sum")


class SteeringResult(NamedTuple):
    """Final particles (x̂₀ at the last time when ``denoise_final``), their normalised
    log-weights, their rewards, and the per-step `SMCInfo`; ``nfe`` counts network evaluations
    per particle."""

    x: Array
    log_weights: Array
    rewards: Array
    info: base.SMCInfo
    nfe: Array


class _Particle(NamedTuple):
    x: Array
    pred: Prediction
    reward: Array  # r at the current point
    best: Array  # running max of r ("max" potential)
    solver_state: Any
    guidance_state: Any  # broadcast over particles; identical across them
    nfe: Array  # network evaluations so far, broadcast over particles


def _broadcast(tree: Any, n: int) -> Any:
    return jax.tree.map(lambda s: jnp.broadcast_to(s, (n, *jnp.shape(s))), tree)


def fk_steering(
    key: Key,
    solver: Solver,
    model_fn: Callable[..., Array],
    x_init: ArrayLike,
    timesteps: ArrayLike,
    reward_fn: Callable[[Array], Array],
    *,
    lam: float = 1.0,
    potential: str = "difference",
    ess_threshold: float = 0.5,
    resample_fn: Callable[..., Array] = systematic_resample,
    prediction: str = "eps",
    guidance: Guidance | None = None,
    cond: dict[str, Any] | None = None,
    uncond: dict[str, Any] | None = None,
    denoise_final: bool = True,
) -> SteeringResult:
    """Sample p(x₀) exp(λ r(x₀)) approximately with FK steering (see the module docstring).

    Args:
      key: PRNG key.
      solver, model_fn, timesteps, prediction, guidance, cond, uncond: as in
        `feynkit.inference.diffusion.sample`; ``cond``/``uncond`` must not vary over particles
        (resampling permutes particles, not the conditioning).
      x_init: (n, ...) starting particles at ``timesteps[0]``.
      reward_fn: ``r(x̂₀) -> (n,)`` rewards of a batch of denoised estimates.
      lam: inverse temperature λ of the tilt.
      potential: "difference", "max" or "sum".
      ess_threshold: resample when ESS < threshold · n (1: at every step; 0: never, which is
        importance sampling / best-of-N with weights).
      denoise_final: return x̂₀ at the last time instead of x.
    """
    if potential not in POTENTIALS:
        raise ValueError(f"unknown potential {potential!r}; choose one of {POTENTIALS}.")
    x = jnp.asarray(x_init)
    ts = jnp.asarray(timesteps, x.dtype)
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"timesteps must be a 1-D grid of ≥ 2 times, got shape {ts.shape}.")
    n = x.shape[0]
    denoise = as_denoiser(model_fn, solver.schedule, prediction)
    predict = guided_predict_fn(denoise, guidance, cond, uncond)
    nfe0 = jnp.zeros((), jnp.int32)

    def reward(pred: Prediction) -> Array:
        r = jnp.asarray(reward_fn(pred.x0))
        if r.shape != (n,):
            raise ValueError(f"reward_fn must return shape ({n},), got {r.shape}.")
        return r

    gstate0 = None if guidance is None else guidance.init(x)
    pred0, (gstate0, nfe_init) = predict(x, ts[0], (gstate0, nfe0))
    r0 = reward(pred0)
    init = _Particle(
        x, pred0, r0, r0, solver.init(x), _broadcast(gstate0, n), _broadcast(nfe_init, n)
    )

    def propagate(k: Key, p: _Particle, step: Array):
        t, t_next = ts[step], ts[step + 1]
        gstate = jax.tree.map(lambda s: s[0], p.guidance_state)
        cached_predict = reuse_first_prediction(predict, p.pred)

        carry = (gstate, p.nfe[0])
        x_new, sstate, carry = solver.step(k, p.x, p.solver_state, cached_predict, carry, t, t_next)
        pred, (gstate, nfe) = predict(x_new, t_next, carry)
        r = reward(pred)
        best = jnp.maximum(p.best, r)
        log_g = {"difference": r - p.reward, "max": best - p.best, "sum": r}[potential]
        new = _Particle(x_new, pred, r, best, sstate, _broadcast(gstate, n), _broadcast(nfe, n))
        return new, lam * log_g

    kernel = base.build_kernel(propagate, resample_fn, ess_threshold)
    # Intermediate targets p_t(x) exp(λ r(x̂₀(x))): the starting particles carry exp(λ r_0).
    state = base.init(init, lam * r0)
    state, info = base.run(key, kernel, state, ts.shape[0] - 1)
    p = state.particles
    x_out = p.pred.x0 if denoise_final else p.x
    return SteeringResult(x_out, state.log_weights, p.reward, info, p.nfe[0])


def best_of_n(samples: Array, rewards: ArrayLike, group_size: int) -> tuple[Array, Array]:
    """Best-of-N: split n samples into groups of ``group_size`` and keep each group's
    highest-reward sample. Returns (selected samples (n // group_size, ...), their rewards)."""
    rewards = jnp.asarray(rewards)
    n = rewards.shape[0]
    if group_size < 1 or n % group_size:
        raise ValueError(f"group_size must divide the {n} samples, got {group_size}.")
    r = rewards.reshape(n // group_size, group_size)
    idx = jnp.argmax(r, axis=1) + jnp.arange(n // group_size) * group_size
    return samples[idx], rewards[idx]
