"""Rejuvenation: Langevin / MALA moves on the corrector's target π̃_t after a resampling.

Resampling duplicates the particles that the weights favour; when the dynamics seldom visit a
mode that π̃_t = Π p_i,t^{a_i} favours (strong annealing of a multimodal target), weighting
alone cannot fill it at an affordable particle count. A move that leaves π̃_t invariant — here
K steps of the Langevin proposal with the corrector's combined score S = Σ a_i S_i,

    x' = x + h S(x, t) + sqrt(2h) z,   z ~ N(0, I),

accepted always (unadjusted Langevin, ULA: invariant up to O(h)) or with the Metropolis–
Hastings probability (MALA, exact, when log π̃_t is known up to a constant)

    a = min(1, π̃_t(x') q(x | x') / (π̃_t(x) q(x' | x))),   q(x' | x) = N(x'; x + h S(x), 2h I)

— separates the copies and moves mass between modes through the bridges that exist at time t,
without changing the weighted approximation (an invariant move applied to every particle keeps
E[w φ(x)] unchanged). Each proposal costs one evaluation of the model's branches (the score at
x'), which also serves the next move or the next solver step.

References:
  Gilks & Berzuini (2001), "Following a moving target — Monte Carlo inference for dynamic
  Bayesian models" (resample-move); Roberts & Tweedie (1996), "Exponential convergence of
  Langevin distributions and their discrete approximations" (ULA, MALA).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from feynkit.core.types import Array, Key
from feynkit.inference.smc.corrector import Rejuvenation
from feynkit.inference.smc.moves import mala_log_proposal_ratio

__all__ = ["langevin_rejuvenation", "rejuvenation_move"]


def langevin_rejuvenation(
    num_steps: int = 1,
    step_size: float | Callable[[Array], Array] = 0.1,
    log_density: Callable[[Array, Array], Array] | None = None,
) -> Rejuvenation:
    """K Langevin moves on π̃_t after each resampling: MALA with `log_density`, else ULA.

    Args:
      num_steps: K ≥ 1 moves per resampling.
      step_size: h_t = step_size · σ_t² for a float (σ_t² is the spread of π̃_t at high noise;
        for π̃ = p^β use ≲ 1/β), or a function ``h(t)``.
      log_density: ``log π̃_t(x)`` up to a constant, ``(x, t) -> (n,)``, e.g. for an analytic
        mixture ``lambda x, t: beta * p.marginal(schedule, t).log_prob(x)``.

    Returns:
      A `Rejuvenation` for the FKC correctors' ``rejuvenation=`` argument.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"rejuvenation num_steps must be an integer ≥ 1, got {num_steps!r}.")
    if isinstance(step_size, int | float) and not step_size > 0:
        raise ValueError(f"rejuvenation step_size must be > 0, got {step_size}.")
    return Rejuvenation(num_steps, step_size, log_density)


def _select(mask: Array, a: Any, b: Any) -> Any:
    def pick(u, v):
        return jnp.where(mask.reshape(mask.shape + (1,) * (u.ndim - 1)), u, v)

    return jax.tree.map(pick, a, b)


def rejuvenation_move(
    rejuv: Rejuvenation,
    timesteps: Array,
    schedule: Any,
    evaluate: Callable[..., tuple[Any, Any, Array]],
    cache_prediction: bool,
) -> Callable[..., tuple[Any, Any]]:
    """The `smc.base` ``move_fn`` of the corrected loop.

    Args:
      rejuv: the moves.
      timesteps: the run's grid; the move after kernel step k acts at ``timesteps[k]`` (the
        step count after the step).
      schedule: α_t, σ_t (the score is S = −ε̂/σ_t of the combined prediction).
      evaluate: ``evaluate(particles, shared, x, t) -> (prediction, stats, nfe)``.
      cache_prediction: whether the particles carry the prediction at x (else it is evaluated
        once before the first move: K + 1 evaluations instead of K).
    """
    step_size = rejuv.step_size
    if not callable(step_size):
        c = step_size
        step_size = lambda t: c * schedule.sigma(t) ** 2  # noqa: E731

    def move(key: Key, p: Any, step: Array, shared: Any) -> tuple[Any, Any]:
        x = p.x
        n = x.shape[0]
        t = timesteps[step].astype(x.dtype)
        h = jnp.asarray(step_size(t), x.dtype)
        sigma = schedule.sigma(t)
        if cache_prediction:
            pred, stats = p.pred, p.stats
        else:
            pred, stats, nfe = evaluate(p, shared, x, t)
            shared = shared._replace(nfe=nfe)

        def one(k, carry):
            x, pred, stats, shared = carry
            k_z, k_u = jax.random.split(jax.random.fold_in(key, k))
            mean = x - h / sigma * pred.eps  # x + h S(x)
            z = jax.random.normal(k_z, x.shape, x.dtype)
            x_prop = mean + jnp.sqrt(2.0 * h) * z
            pred_p, stats_p, nfe = evaluate(p, shared, x_prop, t)
            if rejuv.log_density is None:
                accept = jnp.ones((n,), bool)
            else:
                log_q_ratio = mala_log_proposal_ratio(
                    x, x_prop, -pred.eps / sigma, -pred_p.eps / sigma, h, batched=True
                )
                log_pi = rejuv.log_density(x_prop, t) - rejuv.log_density(x, t)
                log_u = jnp.log(jax.random.uniform(k_u, (n,), x.dtype))
                accept = log_u < log_pi + log_q_ratio
            x, pred, stats = _select(accept, (x_prop, pred_p, stats_p), (x, pred, stats))
            shared = shared._replace(
                nfe=nfe,
                accepted=shared.accepted + jnp.sum(accept).astype(shared.accepted.dtype),
                proposed=shared.proposed + n,
            )
            return x, pred, stats, shared

        x, pred, stats, shared = jax.lax.fori_loop(
            0, rejuv.num_steps, one, (x, pred, stats, shared)
        )
        if cache_prediction:
            return p._replace(x=x, pred=pred, stats=stats), shared
        return p._replace(x=x), shared

    return move
