"""BDIA-DDIM: a time-reversible DDIM, so that diffusion inversion is exact.

With the DDIM map φ(z; t → s) = α_s x̂₀(z, t) + σ_s ε̂(z, t) (one network evaluation at (z, t),
usable towards any time s), BDIA updates a *pair* of consecutive states on the grid
t_0 > t_1 > … > t_N:

    z_{k+1} = γ z_{k−1} + φ(z_k; t_k → t_{k+1}) − γ φ(z_k; t_k → t_{k−1}),

i.e. z_k plus the forward DDIM increment over [t_k, t_{k+1}], plus γ times a correction of the
previous increment by the backward DDIM integration from z_k over [t_k, t_{k−1}]. γ = 0 is DDIM;
γ = 1 is the symmetric (leapfrog-like) scheme. The first step, with no previous state, is a plain
DDIM step. Given (z_k, z_{k+1}) the update solves for z_{k−1}:

    z_{k−1} = (1/γ) z_{k+1} + φ(z_k; t_k → t_{k−1}) − (1/γ) φ(z_k; t_k → t_{k+1}),

which is the same update run on the reversed grid with γ ↦ 1/γ. So `bdia_invert` is `bdia_sample`
backwards, and the round trips sample → invert and invert → sample reproduce their starting pair
up to floating-point round-off — where DDIM inversion (ε̂ evaluated at the wrong end of each
step) is only first-order accurate. Perturbations of the inverse recursion grow like γ^(−N/2),
so exact inversion wants γ close to 1 (default 1).

Why a `Solver` with a state: the update needs the previous state and time, so `bdia` keeps
(z_{k−1}, t_{k−1}) in the solver state and runs in the one loop `sampler.sample` (guidance,
conditioning and NFE counting included). The functions here return the final *pair*, which the
other direction needs to be exact. Stateful guidance (a guidance state that evolves along the
run) breaks exactness of the inversion; stateless guidance (CFG) keeps it.

References:
  Zhang, Lewis & Kleijn (2024), "Exact Diffusion Inversion via Bi-directional Integration
  Approximation" (ECCV), eq. for BDIA-DDIM and §4; Song, Meng & Ermon (2021), "Denoising
  Diffusion Implicit Models" (the DDIM map).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from feynkit.core.types import Array, ArrayLike, Float, Key, ModelFn, Schedule
from feynkit.core.validation import check_time_grid
from feynkit.inference.diffusion.prediction import Prediction
from feynkit.inference.diffusion.sampler import Guidance, PredictFn, SampleInfo, Solver, sample
from feynkit.inference.diffusion.solvers import ddim

__all__ = ["BDIAState", "bdia", "bdia_invert", "bdia_sample"]


class BDIAState(NamedTuple):
    """The previous state z_{k−1}, its time, and whether it exists (false before the first
    step, which is then a DDIM step)."""

    x_prev: Array
    t_prev: Array
    started: Array


def _ddim_map(schedule: Schedule) -> Callable[[Array, Prediction, Array, Array], Array]:
    """φ(z; t → s) from a fixed prediction, through the DDIM step of `solvers.ddim` (η = 0)."""
    step = ddim(schedule, 0.0).step

    def phi(x: Array, pred: Prediction, t: Array, s: Array) -> Array:
        return step(None, x, None, lambda x, t, carry: (pred, carry), None, t, s)[0]

    return phi


def bdia(
    schedule: Schedule,
    gamma: float = 1.0,
    x_prev: ArrayLike | None = None,
    t_prev: ArrayLike | None = None,
) -> Solver:
    """The BDIA-DDIM solver (η = 0) for `sampler.sample`.

        x_next = γ x_prev + φ(x; t → t_next) − γ φ(x; t → t_prev),   φ = DDIM map,

    with one network evaluation per step; the first step is DDIM unless a previous state is
    given. Run on a decreasing grid it samples; on the reversed grid with γ ↦ 1/γ it inverts.

    Args:
      schedule: the diffusion schedule (α_t, σ_t).
      gamma: γ ∈ (0, 1] for sampling (γ = 0 is DDIM but cannot be inverted); values > 1
        appear when inverting.
      x_prev, t_prev: the state one grid step *before* the run's first point and its time, to
        continue a pair (from `bdia_invert`); both or neither.

    Returns:
      A `Solver` whose state is a `BDIAState`.

    References:
      Zhang, Lewis & Kleijn (2024), "Exact Diffusion Inversion via Bi-directional Integration
      Approximation", BDIA-DDIM update.
    """
    if not gamma >= 0:
        raise ValueError(f"bdia needs gamma ≥ 0, got {gamma}.")
    if (x_prev is None) != (t_prev is None):
        raise ValueError("give both x_prev and t_prev (a previous state and its time) or neither.")
    phi = _ddim_map(schedule)

    def init(x: Array) -> BDIAState:
        if x_prev is None:
            return BDIAState(x, jnp.zeros((), x.dtype), jnp.asarray(False))
        xp = jnp.asarray(x_prev, x.dtype)
        if xp.shape != x.shape:
            raise ValueError(f"x_prev has shape {xp.shape}, the run's x has shape {x.shape}.")
        return BDIAState(xp, jnp.asarray(t_prev, x.dtype), jnp.asarray(True))

    def step(key: Key, x: Array, state: BDIAState, predict: PredictFn, carry, t, t_next):
        pred, carry = predict(x, t, carry)
        forward = phi(x, pred, t, t_next)
        # Before the first step t_prev is a placeholder; the BDIA branch is discarded then.
        t_back = jnp.where(state.started, state.t_prev, t)
        backward = phi(x, pred, t, t_back)
        x_bdia = gamma * state.x_prev + forward - gamma * backward
        x_next = jnp.where(state.started, x_bdia, forward).astype(x.dtype)
        return x_next, BDIAState(x, jnp.asarray(t, x.dtype), jnp.asarray(True)), carry

    return Solver(init, step, schedule)


def _check_grid(timesteps: ArrayLike, gamma: float, x_next, invert: bool) -> Array:
    ts = check_time_grid(timesteps)
    if invert and not gamma > 0:
        raise ValueError(f"BDIA inversion divides by gamma: need gamma > 0, got {gamma}.")
    if not gamma >= 0:
        raise ValueError(f"BDIA needs gamma ≥ 0, got {gamma}.")
    if x_next is not None and ts.shape[0] < 3:
        raise ValueError("continuing from a pair (x_next given) needs a grid of ≥ 3 times.")
    return ts


def _run(solver_gamma, schedule, model_fn, x, x_next, ts, kwargs):
    x = jnp.asarray(x)
    if x_next is None:
        solver, start, grid = bdia(schedule, solver_gamma), x, ts
    else:  # continue the pair: x is the previous state, x_next the first point of the run
        solver, start, grid = bdia(schedule, solver_gamma, x, ts[0]), jnp.asarray(x_next), ts[1:]
    out, info = sample(
        jax.random.key(0), solver, model_fn, start, grid, return_trajectory=True, **kwargs
    )
    return out, info.trajectory[-2], SampleInfo(info.nfe)


def bdia_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x_init: Float[ArrayLike, "batch ..."],
    timesteps: Float[ArrayLike, " steps_plus_1"],
    gamma: float = 1.0,
    *,
    x_next: Float[ArrayLike, "batch ..."] | None = None,
    prediction: str = "eps",
    guidance: Guidance | None = None,
    cond: dict[str, Any] | None = None,
    uncond: dict[str, Any] | None = None,
) -> tuple[Float[Array, "batch ..."], Float[Array, "batch ..."], SampleInfo]:
    """Sample with BDIA-DDIM from ``timesteps[0]`` to ``timesteps[-1]`` (a decreasing grid).

    z_0 = x_init; z_1 = DDIM step (or ``x_next``); z_{k+1} = γ z_{k−1} + φ(z_k; t_k → t_{k+1})
    − γ φ(z_k; t_k → t_{k−1}) for k = 1 … N−1.

    Args:
      model_fn: ``model_fn(x, t, **cond) -> output`` with t of shape (batch,).
      schedule: the diffusion schedule.
      x_init: z_0 at ``timesteps[0]``.
      timesteps: decreasing times t_0 > … > t_N, e.g. `sampler.time_grid`.
      gamma: γ ∈ [0, 1] (0: DDIM, not invertible); 1 (the default) keeps the inversion well
        conditioned.
      x_next: z_1 at ``timesteps[1]`` (the second output of `bdia_invert`) to regenerate a pair
        exactly; default: one DDIM step from x_init.
      prediction, guidance, cond, uncond: as in `sampler.sample`.

    Returns:
      (z_N, z_{N−1}, SampleInfo(nfe)): the sample at ``timesteps[-1]`` and the state one step
      before it, the pair `bdia_invert` needs to recover x_init exactly.

    References:
      Zhang, Lewis & Kleijn (2024), "Exact Diffusion Inversion via Bi-directional Integration
      Approximation".
    """
    ts = _check_grid(timesteps, gamma, x_next, invert=False)
    kwargs = dict(prediction=prediction, guidance=guidance, cond=cond, uncond=uncond)
    return _run(gamma, schedule, model_fn, x_init, x_next, ts, kwargs)


def bdia_invert(
    model_fn: ModelFn,
    schedule: Schedule,
    x_final: Float[ArrayLike, "batch ..."],
    timesteps: Float[ArrayLike, " steps_plus_1"],
    gamma: float = 1.0,
    *,
    x_next: Float[ArrayLike, "batch ..."] | None = None,
    prediction: str = "eps",
    guidance: Guidance | None = None,
    cond: dict[str, Any] | None = None,
    uncond: dict[str, Any] | None = None,
) -> tuple[Float[Array, "batch ..."], Float[Array, "batch ..."], SampleInfo]:
    """Invert BDIA-DDIM: from data at ``timesteps[-1]`` back to ``timesteps[0]``, exactly.

    The same decreasing grid and γ as `bdia_sample`; internally BDIA with 1/γ runs on the
    reversed grid: z_{k−1} = (1/γ) z_{k+1} + φ(z_k; t_k → t_{k−1}) − (1/γ) φ(z_k; t_k → t_{k+1}).

    Args:
      model_fn: ``model_fn(x, t, **cond) -> output`` with t of shape (batch,).
      schedule: the diffusion schedule.
      x_final: z_N at ``timesteps[-1]`` (e.g. a data point, or a `bdia_sample` output).
      timesteps: the decreasing grid t_0 > … > t_N of the sampling direction.
      gamma: the γ of the sampling run to invert (> 0).
      x_next: z_{N−1} at ``timesteps[-2]`` (the second output of `bdia_sample`) for an exact
        round trip of a sample; default: one DDIM inversion step from x_final (a new pair, which
        `bdia_sample` with ``x_next`` then regenerates exactly).
      prediction, guidance, cond, uncond: as in `sampler.sample`.

    Returns:
      (z_0, z_1, SampleInfo(nfe)): the latent at ``timesteps[0]`` and the state at
      ``timesteps[1]``; ``bdia_sample(..., z_0, timesteps, gamma, x_next=z_1)`` returns
      (x_final, z_{N−1}) up to round-off.

    References:
      Zhang, Lewis & Kleijn (2024), "Exact Diffusion Inversion via Bi-directional Integration
      Approximation", §4 (round-trip BDIA-DDIM).
    """
    ts = _check_grid(timesteps, gamma, x_next, invert=True)[::-1]
    kwargs = dict(prediction=prediction, guidance=guidance, cond=cond, uncond=uncond)
    return _run(1.0 / gamma, schedule, model_fn, x_final, x_next, ts, kwargs)
