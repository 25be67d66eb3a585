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

`fk_steering_corrector` is the potential as a `Corrector` of the one sampler loop
(``diffusion.sample(..., corrector=fk_steering_corrector(r))``), so it runs with every solver
and every guidance method: its weights do not depend on the dynamics. The particles carry the
model's prediction at their current point; a step reuses it for the move and evaluates the
model once at the new point (which the next step needs anyway): a run costs the solver's
evaluations plus one, as a plain `diffusion.sample` run with ``denoise_final`` does.
`fk_steering` is the same run returning a `SteeringResult`.

References:
  Singhal, Horvitz, Teehan, Ren, Yu, Cho & Ranganath (2025), "A General Framework for
  Inference-time Scaling and Steering of Diffusion Models"; Wu et al. (2023), "Practical and
  Asymptotically Exact Conditional Sampling in Diffusion Models" (twisted SMC).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp

from feynkit.core import systematic_resample
from feynkit.core.types import Array, ArrayLike, Key
from feynkit.core.validation import check_reward_shape
from feynkit.inference.diffusion.prediction import Prediction
from feynkit.inference.diffusion.sampler import Guidance, Solver
from feynkit.inference.smc import base
from feynkit.inference.smc.corrector import Corrector, corrected_sampler, resolve_resampler

__all__ = ["POTENTIALS", "SteeringResult", "best_of_n", "fk_steering", "fk_steering_corrector"]

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


class _Rewards(NamedTuple):
    reward: Array  # r at the current point
    best: Array  # running max of r ("max" potential)


def fk_steering_corrector(
    reward_fn: Callable[[Array], Array],
    lam: float = 1.0,
    potential: str = "difference",
    *,
    ess_threshold: float = 0.5,
    resample: str | Callable[..., Array] = "systematic",
) -> Corrector:
    """FK steering towards p(x₀) exp(λ r(x₀)) as a corrector (see the module docstring).

    Args:
      reward_fn: ``r(x̂₀) -> (n,)`` rewards of a batch of denoised estimates (of the guided
        prediction when the run has guidance).
      lam: inverse temperature λ of the tilt.
      potential: "difference", "max" or "sum".
      ess_threshold: resample when ESS < threshold · n (1: at every step; 0: never, which is
        importance sampling / best-of-N with weights).
      resample: a resampler name ("systematic", ...) or a `feynkit.core` resampling function.

    Returns:
      A `Corrector`; with a deterministic solver and ``ess_threshold > 0`` it warns that
      resampled copies never separate.
    """
    if potential not in POTENTIALS:
        raise ValueError(f"unknown potential {potential!r}; choose one of {POTENTIALS}.")
    if isinstance(ess_threshold, int | float) and not 0.0 <= ess_threshold <= 1.0:
        raise ValueError(f"ess_threshold must be in [0, 1], got {ess_threshold}.")

    def prepare(solver: Solver, guidance: Guidance | None) -> Guidance | None:
        resamples = not (isinstance(ess_threshold, int | float) and ess_threshold == 0)
        if solver.stochastic is False and resamples:
            warnings.warn(
                f"fk_steering with the deterministic solver {solver.name!r}: copies made by "
                "resampling follow the same path and never separate, so resampling only "
                "loses diversity. Use a stochastic solver (ddpm, euler_maruyama, ddim with "
                "eta > 0) or ess_threshold=0 (importance weights only).",
                UserWarning,
                stacklevel=4,
            )
        return guidance

    def observe(x, t, pc, pu, pred: Prediction, schedule) -> _Rewards:
        r = check_reward_shape(reward_fn(pred.x0), x.shape[0])
        return _Rewards(r, r)

    def increment(prev: _Rewards, new: _Rewards, t, t_next):
        best = jnp.maximum(prev.best, new.reward)
        log_g = {
            "difference": new.reward - prev.reward,
            "max": best - prev.best,
            "sum": new.reward,
        }[potential]
        return lam * log_g, _Rewards(new.reward, best)

    # Intermediate targets p_t(x) exp(λ r(x̂₀(x))): the starting particles carry exp(λ r_0).
    return Corrector(
        "fk_steering",
        prepare,
        observe,
        increment,
        lambda stats: lam * stats.reward,
        ess_threshold,
        resolve_resampler(resample),
        True,
    )


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
    keep_ancestry: bool = False,
) -> SteeringResult:
    """Sample p(x₀) exp(λ r(x₀)) approximately with FK steering (see the module docstring):
    ``diffusion.sample(..., corrector=fk_steering_corrector(...))`` with the rewards kept.

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
      keep_ancestry: keep every step's ancestor indices in ``info.ancestors``.
    """
    corrector = fk_steering_corrector(
        reward_fn, lam, potential, ess_threshold=ess_threshold, resample=resample_fn
    )
    loop = corrected_sampler(
        solver,
        model_fn,
        timesteps,
        corrector,
        prediction=prediction,
        guidance=guidance,
        cond=cond,
        uncond=uncond,
        keep_ancestry=keep_ancestry,
    )
    state, info = base.run(key, loop.kernel, loop.init(x_init), loop.num_steps)
    x, sample_info = loop.output(state, info, denoise_final)
    return SteeringResult(x, state.log_weights, state.particles.stats.reward, info, sample_info.nfe)


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
