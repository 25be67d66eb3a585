"""Adaptive Guidance (AG) and LinearAG: classifier-free guidance that skips evaluations.

CFG evaluates the network twice per step, ε̂ = ε̂_u + w (ε̂_c − ε̂_u). Castillo et al. (2023)
observe that late in sampling the conditional and unconditional predictions point the same
way, so the extra evaluation buys nothing. Two `Guidance` methods for `sampler.sample`:

- `adaptive_guidance` (AG): CFG while the cosine similarity

      γ_t = ⟨ε̂_c, ε̂_u⟩ / (‖ε̂_c‖ ‖ε̂_u‖)

  stays below a threshold γ̄; from the first evaluation at which γ_t ≥ γ̄ on, the conditional
  prediction alone for every remaining step (optionally, the switch is allowed only below a
  time t_max_switch: with α_t ≈ 0 both ε̂ ≈ x_t/σ_t, so γ_t starts near 1, dips while the
  branches disagree and rises again). The paper's rule is per sample (``reduce="sample"``):
  each sample switches when its own γ_t passes γ̄ (≈ 0.991–0.996 on Stable Diffusion); in a
  batch the unconditional branch is then evaluated while any sample still guides, and the
  state counts each sample's guided evaluations (``guided``), i.e. the evaluations a
  per-sample deployment spends. ``reduce="all"``/``"mean"`` take one decision for the batch.
- `linear_ag` (LinearAG): in a chosen range of steps the unconditional prediction is not
  evaluated but estimated as a per-step linear combination of the current conditional and
  the H previous conditional and unconditional predictions,

      ε̂_u(t_i) ≈ β_i,0 ε̂_c(t_i) + Σ_{h=1..H} (β_i,2h−1 ε̂_c(t_{i−h}) + β_i,2h ε̂_u(t_{i−h})),

  with scalar coefficients β_i fit by least squares on CFG calibration runs
  (`fit_linear_ag`, `linear_ag_calibration`). Estimates are not fed back: where an
  evaluation was replaced its history slot of ε̂_u holds zeros, and `fit_linear_ag` given the
  same ``replaced`` steps drops those features, so the fit sees exactly what the run has. The
  paper's schedule: estimate every other step of the first half, and from the second half on
  the conditional prediction alone (``cond_only_from``, AG's late steps) — 25 evaluations of 40
  at 20 steps.

Both count steps by evaluations of ``combine`` (one per step for DDIM-like solvers; Heun
calls it twice per step).

References:
  Castillo, Kohler, Pérez, Pérez, Pumarola, Ghanem, Arbeláez & Thabet (2023), "Adaptive
  Guidance: Training-free Acceleration of Conditional Diffusion Models" (AG and LinearAG).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from feynkit.core.types import Array, ArrayLike, Float, Key
from feynkit.inference.diffusion.prediction import Prediction, as_denoiser
from feynkit.inference.diffusion.sampler import Guidance, Solver, sample

__all__ = [
    "AdaptiveGuidanceState",
    "LinearAGState",
    "adaptive_guidance",
    "cosine_similarity",
    "fit_linear_ag",
    "linear_ag",
    "linear_ag_calibration",
    "linear_ag_replaced",
]


class AdaptiveGuidanceState(NamedTuple):
    """AG's state: ``active`` (still guiding), the last similarity ``gamma`` and the number of
    guided evaluations ``guided`` — scalars for a batch decision, per sample (b,) with
    ``reduce="sample"``."""

    active: Array
    gamma: Array
    guided: Array


class LinearAGState(NamedTuple):
    """LinearAG's state: evaluation counter and the last H conditional/unconditional ε̂
    (most recent first), each of shape (H, *x.shape)."""

    step: Array
    eps_cond: Array
    eps_uncond: Array


def cosine_similarity(a: Float[ArrayLike, "b ..."], b: Float[ArrayLike, "b ..."]) -> Array:
    """Per-sample cosine similarity ⟨a, b⟩ / (‖a‖ ‖b‖) over all but the leading axis."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    num = jnp.sum(a2 * b2, axis=1)
    den = jnp.linalg.norm(a2, axis=1) * jnp.linalg.norm(b2, axis=1)
    return num / jnp.maximum(den, jnp.finfo(den.dtype).tiny)


def _cfg(cond: Prediction, uncond: Prediction, scale: Any) -> Prediction:
    return jax.tree.map(lambda c, u: u + scale * (c - u), cond, uncond)


def adaptive_guidance(
    scale: float,
    threshold: float,
    reduce: str = "all",
    t_max_switch: float | None = None,
    on: str = "eps",
) -> Guidance:
    """Adaptive Guidance: CFG until the predictions align, then the conditional model alone.

        ε̂ = ε̂_u + w (ε̂_c − ε̂_u)   while active;   ε̂ = ε̂_c   afterwards;
        active ← active ∧ ¬[R_b γ_t^(b) ≥ γ̄],   γ_t^(b) = cos(ε̂_c^(b), ε̂_u^(b)) (or of x̂₀),

    with R the reduction: "sample" (per sample, the paper's rule: each sample has its own
    switch), or one decision for the batch, "all" (min over the batch: every sample has
    converged) or "mean". The step at which the switch happens still uses CFG (both
    predictions exist).

    Args:
      scale: guidance weight w (w = 1: conditional sampling; the usual CFG w > 1).
      threshold: γ̄; above 1 never switches (plain CFG), at or below −1 switches after the
        first step.
      reduce: "sample" (per-sample switches), or "all" / "mean" (a batch decision).
      t_max_switch: the switch is considered only at times t ≤ t_max_switch (None: at every
        step, as in the paper). On VP schedules both ε̂ are ≈ x_t/σ_t near t = 1 (α_t ≈ 0), so
        their cosine starts near 1 before the branches diverge; this keeps AG from stopping
        guidance before it acted.
      on: compare the "eps" predictions (the paper) or the "x0" predictions. On a VP
        schedule ε̂ = (x_t − α_t x̂₀)/σ_t is dominated by x_t at high noise, so γ_t on ε̂ stays
        near 1; on x̂₀ it rises from well below 1 to 1 as sampling proceeds (the trend the
        paper reports), which makes the threshold a usable knob.

    Returns:
      A `Guidance` whose ``needs_uncond`` is the active flag, so skipped steps cost one
      evaluation of batch B instead of 2B.

    References:
      Castillo et al. (2023), "Adaptive Guidance: Training-free Acceleration of Conditional
      Diffusion Models" (AG).
    """
    if reduce not in ("sample", "all", "mean"):
        raise ValueError(f"reduce must be 'sample', 'all' or 'mean', got {reduce!r}.")
    if on not in ("eps", "x0"):
        raise ValueError(f"on must be 'eps' or 'x0', got {on!r}.")
    per_sample = reduce == "sample"

    def init(x: Array) -> AdaptiveGuidanceState:
        shape = x.shape[:1] if per_sample else ()
        return AdaptiveGuidanceState(
            jnp.ones(shape, bool), jnp.full(shape, -1.0, x.dtype), jnp.zeros(shape, jnp.int32)
        )

    def combine(cond: Prediction, uncond: Prediction, state: AdaptiveGuidanceState, t: Array):
        sims = cosine_similarity(getattr(cond, on), getattr(uncond, on))
        if per_sample:
            gamma = sims
            # a switched sample gets ε̂_c (its branch may still be evaluated for the others)
            guided = _cfg(cond, uncond, scale)
            keep = state.active.reshape(-1, *([1] * (cond.eps.ndim - 1)))
            out = jax.tree.map(lambda g, c: jnp.where(keep, g, c), guided, cond)
        else:
            gamma = jnp.min(sims) if reduce == "all" else jnp.mean(sims)
            # Inactive steps get the conditional prediction twice: CFG is then the identity.
            out = _cfg(cond, uncond, scale)
        gamma = jnp.where(state.active, gamma, state.gamma).astype(state.gamma.dtype)
        allowed = True if t_max_switch is None else t <= t_max_switch
        new = AdaptiveGuidanceState(
            state.active & ~((gamma >= threshold) & allowed),
            gamma,
            state.guided + state.active.astype(jnp.int32),
        )
        return out, new

    params = {"scale": scale, "threshold": threshold, "reduce": reduce}
    return Guidance(
        init, combine, lambda state, t: jnp.any(state.active), "adaptive_guidance", params
    )


def _features(eps_c: Array, hist_c: Array, hist_u: Array) -> Array:
    """Stack (ε̂_c, ε̂_c(t−1), ε̂_u(t−1), ε̂_c(t−2), ...) along a new leading axis."""
    past = jnp.stack([hist_c, hist_u], axis=1).reshape(-1, *eps_c.shape)
    return jnp.concatenate([eps_c[None], past])


def linear_ag(
    scale: float,
    coefficients: Float[ArrayLike, "steps k"],
    schedule: Any,
    start_step: int,
    end_step: int | None = None,
    every: int = 1,
    cond_only_from: int | None = None,
) -> Guidance:
    """LinearAG: CFG whose unconditional evaluations in steps [start, end) are estimated.

        ε̂_u(t_i) = β_i · (ε̂_c(t_i), ε̂_c(t_{i−1}), ε̂_u(t_{i−1}), …),
        x̂₀,u = x̂₀,c + (σ_t/α_t)(ε̂_c − ε̂_u),

    then CFG ε̂ = ε̂_u + w (ε̂_c − ε̂_u) (and the same for x̂₀). Steps i with
    ``start ≤ i < end`` and ``(i − start) % every == 0`` skip the unconditional network call
    (`linear_ag_replaced` gives that mask, for `fit_linear_ag`); steps i ≥ `cond_only_from`
    use the conditional prediction alone (AG's late steps). The history keeps the real ε̂_u
    and zeros where it was estimated (estimates are not fed back).

    Args:
      scale: guidance weight w.
      coefficients: β, shape (num_steps, 1 + 2H) from `fit_linear_ag` (H = history length).
      schedule: the solver's schedule (α_t, σ_t turn the estimated ε̂_u into x̂₀,u).
      start_step, end_step: the range of evaluations (0-based) whose unconditional branch is
        estimated; ``end_step`` defaults to the number of rows of `coefficients`.
      every: estimate every `every`-th step of the range (2: alternate real and estimated).
      cond_only_from: from this evaluation on, no guidance and no unconditional call (None:
        never).

    Returns:
      A `Guidance` with state `LinearAGState`.

    References:
      Castillo et al. (2023), "Adaptive Guidance: Training-free Acceleration of Conditional
      Diffusion Models" (LinearAG).
    """
    coefs = jnp.asarray(coefficients)
    if coefs.ndim != 2 or coefs.shape[1] % 2 != 1:
        raise ValueError(
            f"coefficients must have shape (num_steps, 1 + 2*history), got {coefs.shape}."
        )
    n, history = coefs.shape[0], coefs.shape[1] // 2
    end_step = n if end_step is None else end_step
    if not 0 <= start_step <= end_step <= n or every < 1:
        raise ValueError(
            f"need 0 ≤ start_step ≤ end_step ≤ {n} and every ≥ 1, got start_step={start_step}, "
            f"end_step={end_step}, every={every}."
        )
    if cond_only_from is not None and not 0 <= cond_only_from <= n:
        raise ValueError(f"need 0 ≤ cond_only_from ≤ {n}, got cond_only_from={cond_only_from}.")
    mask = np.append(linear_ag_replaced(n, start_step, end_step, every), False)
    replace = jnp.asarray(mask)  # entry n (past the grid) is False
    idx = np.arange(n + 1)
    late = jnp.asarray(idx >= (n + 1 if cond_only_from is None else cond_only_from))

    def replaced(step: Array) -> Array:
        return replace[jnp.minimum(step, n)]

    def cond_only(step: Array) -> Array:
        return late[jnp.minimum(step, n)]

    def init(x: Array) -> LinearAGState:
        zeros = jnp.zeros((history, *x.shape), x.dtype)
        return LinearAGState(jnp.zeros((), jnp.int32), zeros, zeros)

    def combine(cond: Prediction, uncond: Prediction, state: LinearAGState, t: Array):
        rep = replaced(state.step)
        beta = coefs[jnp.minimum(state.step, n - 1)].astype(cond.eps.dtype)
        feats = _features(cond.eps, state.eps_cond, state.eps_uncond)
        eps_est = jnp.tensordot(beta, feats, axes=1)
        ratio = schedule.sigma(t) / schedule.alpha(t)
        est = Prediction(cond.x0 + ratio * (cond.eps - eps_est), eps_est)
        real_u = uncond.eps
        uncond = jax.tree.map(lambda e, u: jnp.where(rep, e, u), est, uncond)
        guided = _cfg(cond, uncond, scale)
        out = jax.tree.map(lambda c, g: jnp.where(cond_only(state.step), c, g), cond, guided)
        if history:
            hist_c = jnp.concatenate([cond.eps[None], state.eps_cond[:-1]])
            kept = jnp.where(rep, jnp.zeros_like(real_u), real_u)  # no estimate fed back
            hist_u = jnp.concatenate([kept[None], state.eps_uncond[:-1]])
        else:
            hist_c, hist_u = state.eps_cond, state.eps_uncond
        return out, LinearAGState(state.step + 1, hist_c, hist_u)

    return Guidance(
        init,
        combine,
        lambda state, t: ~replaced(state.step) & ~cond_only(state.step),
        "linear_ag",
        {"scale": scale},
        # the history runs over samples on axis 1 (axis 0 is the step), the counter per run
        state_axes=lambda s: LinearAGState(None, 1, 1),
    )


def linear_ag_replaced(
    num_steps: int, start_step: int, end_step: int | None = None, every: int = 1
) -> np.ndarray:
    """The (num_steps,) mask of the evaluations `linear_ag` estimates: ``start ≤ i < end`` and
    ``(i − start) % every == 0``."""
    end_step = num_steps if end_step is None else end_step
    idx = np.arange(num_steps)
    return (idx >= start_step) & (idx < end_step) & ((idx - start_step) % every == 0)


@functools.partial(jax.jit, static_argnames="history")
def fit_linear_ag(
    eps_cond: Float[ArrayLike, "steps b ..."],
    eps_uncond: Float[ArrayLike, "steps b ..."],
    history: int = 1,
    ridge: float = 1e-6,
    replaced: ArrayLike | None = None,
) -> Float[Array, "steps k"]:
    """Least-squares LinearAG coefficients, one scalar per feature and step.

        β_i = argmin_β Σ_{samples, pixels} ‖ε̂_u(t_i) − Σ_j β_j F_j(t_i)‖²,
        F(t_i) = (ε̂_c(t_i), ε̂_c(t_{i−1}), ε̂_u(t_{i−1}), …, ε̂_u(t_{i−H})),

    solved by the normal equations with a ridge of ``ridge · tr(FᵀF)/k`` (features before
    the first step are zero and get coefficient 0).

    Args:
      eps_cond, eps_uncond: conditional and unconditional ε̂ along calibration CFG runs,
        shape (num_steps, batch, ...), e.g. from `linear_ag_calibration`.
      history: H, the number of past steps used.
      ridge: relative Tikhonov regularisation.
      replaced: the (num_steps,) mask of steps whose ε̂_u the run estimates
        (`linear_ag_replaced`): their ε̂_u is not in the run's history, so the fit drops it
        as a feature of later steps (coefficient 0). None: every step is real.

    Returns:
      Coefficients of shape (num_steps, 1 + 2H) for `linear_ag`.

    References:
      Castillo et al. (2023) (LinearAG: least-squares fit on calibration runs).
    """
    ec, eu = jnp.asarray(eps_cond), jnp.asarray(eps_uncond)
    if ec.shape != eu.shape or ec.ndim < 2:
        raise ValueError(
            f"eps_cond and eps_uncond must share a shape (num_steps, batch, ...); got "
            f"{ec.shape} and {eu.shape}."
        )
    if history < 0:
        raise ValueError(f"history must be ≥ 0, got {history}.")
    n = ec.shape[0]
    pad = jnp.zeros((history, *ec.shape[1:]), ec.dtype)
    if replaced is not None:
        rep = jnp.asarray(replaced, bool).reshape(n, *([1] * (ec.ndim - 1)))
        eu_hist = jnp.where(rep, 0.0, eu)  # the history the run keeps
    else:
        eu_hist = eu
    ec_p, eu_p = jnp.concatenate([pad, ec]), jnp.concatenate([pad, eu])
    eu_hist_p = jnp.concatenate([pad, eu_hist])

    def one(i):
        cur = jax.lax.dynamic_index_in_dim(ec_p, i + history, keepdims=False)
        past_c = jax.lax.dynamic_slice_in_dim(ec_p, i, history)[::-1]
        past_u = jax.lax.dynamic_slice_in_dim(eu_hist_p, i, history)[::-1]
        f = _features(cur, past_c, past_u).reshape(1 + 2 * history, -1)
        y = jax.lax.dynamic_index_in_dim(eu_p, i + history, keepdims=False).reshape(-1)
        gram = f @ f.T
        k = gram.shape[0]
        reg = ridge * jnp.trace(gram) / k + jnp.finfo(gram.dtype).tiny
        return jnp.linalg.solve(gram + reg * jnp.eye(k, dtype=gram.dtype), f @ y)

    return jax.lax.map(one, jnp.arange(n))


def linear_ag_calibration(
    key: Key,
    solver: Solver,
    model_fn: Callable[..., Array],
    x_init: ArrayLike,
    timesteps: ArrayLike,
    scale: float,
    *,
    prediction: str = "eps",
    cond: dict[str, Any] | None = None,
    uncond: dict[str, Any] | None = None,
) -> tuple[Array, Array]:
    """ε̂_c and ε̂_u at every step of a CFG run, the data `fit_linear_ag` fits on.

    Runs `sample` with CFG (weight `scale`) and returns the trajectory's conditional and
    unconditional predictions at (x_{t_i}, t_i), i < num_steps: exactly the ones the run used
    for solvers that evaluate the model once per step (DDIM, DDPM, Euler–Maruyama, DPM++2M).

    Returns:
      (eps_cond, eps_uncond), each of shape (num_steps, *x_init.shape).
    """
    cond = {} if cond is None else cond
    uncond = {} if uncond is None else uncond
    guide = Guidance(lambda x: None, lambda c, u, s, t: (_cfg(c, u, scale), s))
    ts = jnp.asarray(timesteps)
    _, info = sample(
        key,
        solver,
        model_fn,
        x_init,
        ts,
        prediction=prediction,
        guidance=guide,
        cond=cond,
        uncond=uncond,
        return_trajectory=True,
    )
    denoise = as_denoiser(model_fn, solver.schedule, prediction)

    def at(args):
        x, t = args
        return denoise(x, t, **cond).eps, denoise(x, t, **uncond).eps

    return jax.lax.map(at, (info.trajectory[:-1], ts[:-1].astype(info.trajectory.dtype)))
