"""Inference-time scaling for flow models: interpolant conversion and rollover budget forcing.

**Interpolant conversion.** Two schedules (α_t, σ_t) and (α'_s, σ'_s) describe the same family
of noisy marginals up to scale: a point x' = α'_s x₀ + σ'_s ε of the second is (α'_s/α_t) times a
point of the first at the time t with the same signal-to-noise ratio α_t/σ_t = α'_s/σ'_s. So a
model trained on one (a rectified flow, α = 1 − t, σ = t) predicts (x̂₀, ε̂) on the other (VP)
by evaluating it at x = (α_t/α'_s) x' and t(s), and the same (x̂₀, ε̂) hold — which turns a
deterministic flow into a VP-SDE sampler with particles (`euler_maruyama`, `ddim(η > 0)`).

**Rollover budget forcing (RBF).** With a budget of network evaluations spread over the steps,
each step proposes stochastic moves x_{t_{k+1}} ~ SDE(x_{t_k}) one at a time and scores the
denoised estimate of each (one evaluation, reused by the next step); it accepts the first
proposal whose reward beats the current one, and hands the unused evaluations of its share to
the next step. When a step's share runs out without improvement, the best proposal is taken.

References:
  Kim, Yoon, Lee & Sung (2025), "Inference-Time Scaling for Flow Models via Stochastic Generation
  and Rollover Budget Forcing", §3–4.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from feynkit.core.numerics import bisect
from feynkit.core.types import Array, ArrayLike, Key, ModelFn, RewardFn, Schedule
from feynkit.core.validation import check_reward_shape, check_time_grid
from feynkit.inference.diffusion.prediction import Prediction, as_denoiser
from feynkit.inference.diffusion.sampler import (
    Solver,
    guided_predict_fn,
    reuse_first_prediction,
)

__all__ = [
    "RBFResult",
    "RBFSampler",
    "convert_interpolant",
    "matching_time",
    "rbf_sampler",
    "rollover_budget_forcing",
]


def matching_time(schedule: Schedule, snr_ratio: Array, t_min: float = 0.0, t_max: float = 1.0):
    """The time t of `schedule` with α_t/σ_t = `snr_ratio` (bisection; α/σ decreases in t)."""
    ratio = jnp.asarray(snr_ratio)
    lo, hi = jnp.full_like(ratio, t_min), jnp.full_like(ratio, t_max)
    return bisect(lambda t: schedule.alpha(t) - ratio * schedule.sigma(t), lo, hi, increasing=False)


def convert_interpolant(
    model_fn: ModelFn, kind: str, source: Schedule, target: Schedule
) -> Callable[..., Prediction]:
    """A model of the `source` schedule (output `kind`) as a `Prediction` model on `target`.

    Use the result with ``prediction="prediction"`` and a solver on `target`; it takes t as a
    scalar (what `sample` passes to "prediction" models) or broadcast over the batch.
    """
    denoise = as_denoiser(model_fn, source, kind)
    eps = 1e-6

    def converted(x: Array, t: Array, **cond: Any) -> Prediction:
        s = jnp.reshape(t, (-1,))[0]  # a scalar, or one time broadcast over the batch
        ratio = target.alpha(s) / jnp.maximum(target.sigma(s), eps)
        t_src = matching_time(source, ratio, eps, 1.0 - eps)
        scale = source.alpha(t_src) / target.alpha(s)
        return denoise(x * scale, t_src, **cond)

    return converted


class RBFResult(NamedTuple):
    """Final x̂₀, its reward, evaluations used per chain, and accepted improvements per step."""

    x0: Array
    reward: Array
    nfe: Array
    accepted: Array


class _Chain(NamedTuple):
    x: Array
    pred: Prediction
    reward: Array
    rollover: Array
    nfe: Array  # evaluations so far, per chain (chains spend their budgets differently)
    accepted: Array  # (b, num_steps): whether step k accepted an improvement


class RBFSampler(NamedTuple):
    """RBF as an `smc.base` kernel over independent chains (no reweighting, no resampling):
    ``init(x_init) -> SMCState``, ``kernel(key, state)`` for `smc.run` /
    `smc.run_checkpointed`, ``num_steps``, ``output(state) -> RBFResult``."""

    init: Callable[[ArrayLike], Any]
    kernel: Callable[..., Any]
    num_steps: int
    output: Callable[[Any], RBFResult]


def rbf_sampler(
    solver: Solver,
    model_fn: ModelFn,
    timesteps: ArrayLike,
    reward_fn: RewardFn,
    budget: int,
    *,
    prediction: str = "eps",
    cond: dict[str, Any] | None = None,
) -> RBFSampler:
    """The (init, kernel) tiers of `rollover_budget_forcing` (arguments as there)."""
    from feynkit.inference.smc import base  # smc imports this package

    ts = check_time_grid(timesteps)
    num_steps = ts.shape[0] - 1
    share = (budget - 1) // num_steps
    if share < 1:
        raise ValueError(
            f"budget={budget} is too small for {num_steps} steps: RBF needs at least "
            f"{num_steps + 1} evaluations per chain."
        )
    predict = guided_predict_fn(as_denoiser(model_fn, solver.schedule, prediction), None, cond)
    nfe0 = jnp.zeros((), jnp.int32)

    def rewards(pred: Prediction, b: int) -> Array:
        return check_reward_shape(reward_fn(pred.x0), b)

    def propose(k, chain: _Chain, t, t_next):
        cached = reuse_first_prediction(predict, chain.pred)
        carry = (None, nfe0)
        x_new, _, carry = solver.step(k, chain.x, solver.init(chain.x), cached, carry, t, t_next)
        pred, (_, used) = predict(x_new, t_next, carry)
        return x_new, pred, rewards(pred, chain.x.shape[0]), used

    def propagate(k_step: Key, chain: _Chain, step: Array):
        b = chain.x.shape[0]
        t, t_next = ts[step].astype(chain.x.dtype), ts[step + 1].astype(chain.x.dtype)
        avail = chain.rollover + share  # this step's evaluations, per chain

        def keep_going(c):
            return jnp.any(~c[1])

        def body(c):
            j, done, used, best, first, accepted = c
            x_c, pred_c, r_c, cost = propose(jax.random.fold_in(k_step, j), chain, t, t_next)
            cand = chain._replace(x=x_c, pred=pred_c, reward=r_c)
            live = ~done
            used = used + jnp.where(live, cost, 0)
            best = _select(live & (r_c > best.reward), cand, best)
            improved = live & (r_c > chain.reward)
            first = _select(improved, cand, first)
            done = done | improved | (used >= avail)
            return j + 1, done, used, best, first, accepted | improved

        none = chain._replace(reward=jnp.full_like(chain.reward, -jnp.inf))
        no = jnp.zeros((b,), bool)
        init = (jnp.asarray(0), no, jnp.zeros((b,), jnp.int32), none, none, no)
        _, _, used, best, first, accepted = jax.lax.while_loop(keep_going, body, init)
        chosen = _select(accepted, first, best)
        chosen = chosen._replace(
            rollover=avail - used,
            nfe=chain.nfe + used,
            accepted=chain.accepted.at[:, step].set(accepted),
        )
        return chosen, jnp.zeros((b,), chain.x.dtype)

    def init(x_init: ArrayLike):
        x = jnp.asarray(x_init)
        b = x.shape[0]
        pred0, _ = predict(x, ts[0].astype(x.dtype), (None, nfe0))
        ones = jnp.ones((b,), jnp.int32)
        chain = _Chain(x, pred0, rewards(pred0, b), 0 * ones, ones, jnp.zeros((b, num_steps), bool))
        return base.init(chain)

    def output(state) -> RBFResult:
        c = state.particles
        return RBFResult(c.pred.x0, c.reward, c.nfe, c.accepted.T)

    kernel = base.build_kernel(propagate, ess_threshold=0.0, keep_ancestry=False)
    return RBFSampler(init, kernel, num_steps, output)


def rollover_budget_forcing(
    key: Key,
    solver: Solver,
    model_fn: ModelFn,
    x_init: ArrayLike,
    timesteps: ArrayLike,
    reward_fn: RewardFn,
    budget: int,
    *,
    prediction: str = "eps",
    cond: dict[str, Any] | None = None,
) -> RBFResult:
    """RBF search over a batch of independent chains (each with its own budget).

    Runs `rbf_sampler`'s kernel with `smc.run` (so `smc.run_checkpointed` can resume it).

    Args:
      key: PRNG key.
      solver: a stochastic solver (e.g. ``euler_maruyama`` or ``ddim(schedule, 1.0)``): its
        step's first evaluation is the (cached) prediction at the current point.
      model_fn, prediction, cond: as in `sample`.
      x_init: (b, ...) chains at ``timesteps[0]``.
      reward_fn: ``r(x̂₀) -> (b,)``.
      budget: network evaluations per chain, including the one at the start; at least one per
        step. Its share per step is ``(budget − 1) // num_steps`` plus what earlier steps left.

    Returns:
      `RBFResult` (the chains' x̂₀ at the last time and their rewards).
    """
    from feynkit.inference.smc import base

    loop = rbf_sampler(
        solver, model_fn, timesteps, reward_fn, budget, prediction=prediction, cond=cond
    )
    state, _ = base.run(key, loop.kernel, loop.init(x_init), loop.num_steps)
    return loop.output(state)


def _select(mask: Array, a: Any, b: Any) -> Any:
    """Per chain: a where mask else b, over every leaf (leading axis = chain)."""
    return jax.tree.map(
        lambda u, v: jnp.where(mask.reshape(mask.shape + (1,) * (u.ndim - 1)), u, v), a, b
    )
