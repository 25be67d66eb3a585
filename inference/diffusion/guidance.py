"""Guidance methods for the one sampling loop: CFG (with a guidance interval), CFG++ and APG.

Each constructor returns a `Guidance(init, combine, needs_uncond)` (see `sampler.py`):
``combine(cond, uncond, state, t) -> (Prediction, state)`` merges the conditional and the
unconditional `Prediction` (x̂₀, ε̂) at time t. At a fixed point x both x̂₀ and ε̂ are affine in
the network output (x = α x̂₀ + σ ε̂), so an affine combination with weights summing to one is
the same whether it is taken on ε̂, x̂₀, v or the score; CFG++ and APG differ from CFG in that
they act on x̂₀ and choose which ε̂ the solver re-noises with.

How solvers read the pair: every solver in `solvers.py` writes its update as
``x_next = α_s · (x̂₀, or a multistep combination of x̂₀'s) + (noise coefficient) · ε̂`` taking
both fields from the `Prediction`. That is DDIM (η = 0 and η > 0), Euler on the probability-flow
ODE written as "denoised + σ_next · d" and DPM-Solver++(2M) in data-prediction form. A solver
that instead recomputes ε̂ = (x − α x̂₀)/σ, or uses only one of the two fields (an ODE written as
x + h·f(x, ε̂)), sees CFG++ as plain CFG (or as no guidance) — CFG++ needs the pair.

References:
  Ho & Salimans (2022), "Classifier-Free Diffusion Guidance";
  Kynkäänniemi et al. (2024), "Applying Guidance in a Limited Interval Improves Sample and
  Distribution Quality in Diffusion Models";
  Chung et al. (2025), "CFG++: Manifold-constrained Classifier Free Guidance for Diffusion
  Models" (ICLR);
  Sadat, Hilliges & Weber (2025), "Eliminating Oversaturation and Artifacts of High Guidance
  Scales in Diffusion Models" (ICLR).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from feynkit.core.types import Array, ArrayLike, Float
from feynkit.inference.diffusion.prediction import Prediction, as_denoiser
from feynkit.inference.diffusion.sampler import Guidance, SampleInfo, guided_predict_fn

__all__ = [
    "APGState",
    "apg",
    "cfg",
    "cfg_pp",
    "cfg_pp_equivalent_scale",
    "guided_ddim_inversion",
    "project_onto",
]


def _no_state(x: Array) -> None:
    return None


def _is_number(v: Any) -> bool:
    # Scales may be traced (one compiled sampler for a sweep); validate concrete ones only.
    return isinstance(v, (int, float))


def _check_finite_params(method: str, **params: Any) -> None:
    """Concrete (Python-number) parameters must be finite; traced ones are left alone."""
    for name, v in params.items():
        if _is_number(v) and not math.isfinite(v):
            raise ValueError(
                f"{method} needs a finite {name}, got {name}={v}; pass a real number (e.g. "
                "scale=1 is the conditional model)."
            )


def _mix(u: Prediction, c: Prediction, w: ArrayLike) -> Prediction:
    return Prediction(u.x0 + w * (c.x0 - u.x0), u.eps + w * (c.eps - u.eps))


def _sigma_tilde(schedule: Any, t: ArrayLike) -> Array:
    return schedule.sigma(t) / schedule.alpha(t)


def cfg(
    scale: float,
    interval: tuple[float, float] | None = None,
    schedule: Any = None,
) -> Guidance:
    """Classifier-free guidance, optionally only inside a noise-level interval.

        ε̂ = ε̂_u + w (ε̂_c − ε̂_u),   x̂₀ = x̂₀_u + w (x̂₀_c − x̂₀_u)   for σ̃_t ∈ (σ̃_lo, σ̃_hi],
        (ε̂, x̂₀) = (ε̂_c, x̂₀_c)                                      otherwise,

    w = 0 is the unconditional model, w = 1 the conditional one. The interval is in the noise
    level σ̃_t = σ_t/α_t of x_t/α_t (the σ of Karras et al.'s EDM and of Kynkäänniemi et al.;
    it equals the schedule's σ for variance-exploding schedules). Outside it the unconditional
    branch is not evaluated (``needs_uncond`` is false), which saves network evaluations.

    Args:
      scale: the guidance weight w.
      interval: ``(σ̃_lo, σ̃_hi)`` or None for guidance at every step.
      schedule: the solver's schedule (α_t, σ_t); needed only with an interval.

    Returns:
      A stateless `Guidance`.

    References:
      Ho & Salimans (2022), eq. 6; Kynkäänniemi et al. (2024), eq. 2 and §3.
    """
    _check_finite_params("cfg", scale=scale)
    params = {"scale": scale, "interval": interval}
    if interval is None:
        return Guidance(_no_state, lambda c, u, s, t: (_mix(u, c, scale), s), None, "cfg", params)
    lo, hi = (float(v) for v in interval)
    if not 0.0 <= lo < hi:
        raise ValueError(f"cfg interval must satisfy 0 <= sigma_lo < sigma_hi, got {interval}.")
    if schedule is None:
        raise ValueError("cfg with an interval needs the schedule (to compute σ̃_t = σ_t/α_t).")

    def inside(state: Any, t: Array) -> Array:
        s = _sigma_tilde(schedule, t)
        return (s > lo) & (s <= hi)

    def combine(c: Prediction, u: Prediction, state: Any, t: Array):
        w = jnp.where(inside(state, t), scale, 1.0)
        return _mix(u, c, w), state

    return Guidance(_no_state, combine, inside, "cfg", params)


def cfg_pp(scale_lambda: float) -> Guidance:
    """CFG++: guide the denoised estimate, re-noise with the unconditional noise.

        x̂₀^λ = x̂₀_u + λ (x̂₀_c − x̂₀_u),   λ ∈ [0, 1];   returns (x̂₀^λ, ε̂_u),

    so a DDIM step t → s becomes x_s = α_s x̂₀^λ + σ_s ε̂_u (the paper's Algorithm 2). The pair is
    deliberately not consistent with x; see the module docstring for the solvers that read it
    correctly (DDIM, Euler as "denoised + σ_next d", DPM++2M in data form).

    Strength relative to CFG: one DDIM step of CFG++ with λ equals one DDIM step of CFG with

        ω_t = λ σ̃_t / (σ̃_t − σ̃_s),   σ̃ = σ/α   (`cfg_pp_equivalent_scale`),

    so the equivalent CFG weight depends on the time grid (it grows with the number of steps
    and is ≈ λ at the last step). The paper compares λ ∈ [0, 1] against ω ∈ [1, 12.5] on SD with
    50-step DDIM (its README pairs λ = 0.6 with ω = 7.5, i.e. ω ≈ 12.5 λ).

    Args:
      scale_lambda: λ ∈ [0, 1] (0: unconditional, 1: conditional x̂₀ with unconditional
        re-noising).

    Returns:
      A stateless `Guidance`.

    References:
      Chung et al. (2025), "CFG++", Algorithm 2 and eq. 9.
    """
    if _is_number(scale_lambda) and not 0.0 <= scale_lambda <= 1.0:
        raise ValueError(
            f"cfg_pp needs scale_lambda in [0, 1] (it interpolates), got {scale_lambda}; "
            "use cfg(scale) for extrapolating weights."
        )

    def combine(c: Prediction, u: Prediction, state: Any, t: Array):
        return Prediction(u.x0 + scale_lambda * (c.x0 - u.x0), u.eps), state

    return Guidance(_no_state, combine, None, "cfg_pp", {"scale_lambda": scale_lambda})


def cfg_pp_equivalent_scale(
    schedule: Any, t: ArrayLike, t_next: ArrayLike, scale_lambda: ArrayLike
) -> Array:
    """The CFG weight ω_t whose DDIM step t → t_next equals CFG++'s with λ.

        ω_t = λ σ̃_t / (σ̃_t − σ̃_s),   σ̃ = σ/α,   s = t_next.

    Derivation: in x̄ = x/α a DDIM step is x̄_s = x̄_t − (σ̃_t − σ̃_s) ε̂ for CFG, and
    x̄_s = x̄_t − σ̃_t ε̂^λ + σ̃_s ε̂_u for CFG++; the two coincide when the coefficients of
    (ε̂_c − ε̂_u) agree. Works elementwise on arrays of t, t_next (e.g. a whole time grid).

    References:
      Chung et al. (2025), "CFG++", §3 (CFG++ as CFG with a time-varying scale).
    """
    st, ss = _sigma_tilde(schedule, t), _sigma_tilde(schedule, t_next)
    return scale_lambda * st / (st - ss)


class APGState(NamedTuple):
    """APG's momentum buffer: the running average of Δ = x̂₀_c − x̂₀_u (before rescaling)."""

    running: Array


def project_onto(
    v: Float[Array, "batch ..."], ref: Float[Array, "batch ..."]
) -> tuple[Float[Array, "batch ..."], Float[Array, "batch ..."]]:
    """Split v into the part parallel to ref and the rest, per sample (axis 0 is the batch).

        v∥ = (⟨v, ref⟩ / ⟨ref, ref⟩) ref,   v⊥ = v − v∥,

    the inner products over all non-batch axes. A zero ref gives v∥ = 0.

    References:
      Sadat et al. (2025), "Eliminating Oversaturation …", eq. 5.
    """
    axes = tuple(range(1, v.ndim))
    dot = jnp.sum(v * ref, axis=axes, keepdims=True)
    nrm = jnp.sum(ref * ref, axis=axes, keepdims=True)
    safe = jnp.where(nrm > 0, nrm, 1.0)
    par = jnp.where(nrm > 0, dot / safe, 0.0) * ref
    return par, v - par


def apg(
    scale: float,
    eta: float = 0.0,
    momentum: float = -0.75,
    norm_threshold: float | None = None,
    *,
    schedule: Any,
) -> Guidance:
    """Adaptive projected guidance (APG) on the denoised estimate.

    With D_c = x̂₀_c, D_u = x̂₀_u and the state m (zero at the start), at each evaluation

        Δ = D_c − D_u,   m ← Δ + β m,   Δ ← m             (reverse momentum, β < 0)
        Δ ← Δ · min(1, r / ‖Δ‖)                           (norm threshold r, per sample)
        Δ∥ = (⟨Δ, D_c⟩/⟨D_c, D_c⟩) D_c,   Δ⊥ = Δ − Δ∥
        x̂₀ = D_c + (w − 1)(Δ⊥ + η Δ∥),
        ε̂ = ε̂_c − (α_t/σ_t)(x̂₀ − D_c)                    (so that x = α_t x̂₀ + σ_t ε̂).

    With η = 1, β = 0 and no threshold this is CFG on x̂₀. The order (momentum, then threshold,
    then projection onto D_c) follows the authors' reference implementation. The momentum
    buffer advances at every model evaluation, so a multi-evaluation solver (Heun) updates it
    twice per step, as the reference code does.

    Args:
      scale: the guidance weight w (w = 1: conditional).
      eta: weight η of the parallel component (the paper's default 0).
      momentum: β (the paper uses β < 0, e.g. −0.5 or −0.75; 0 disables momentum).
      norm_threshold: r, or None for no rescaling. r is in the units of ‖x̂₀_c − x̂₀_u‖ over a
        whole sample: set it from the data's scale (the paper's r ≈ 2.5–15 is for SD latents).
      schedule: the solver's schedule, for α_t/σ_t in ε̂.

    Returns:
      A `Guidance` with state `APGState`.

    References:
      Sadat, Hilliges & Weber (2025), "Eliminating Oversaturation and Artifacts of High Guidance
      Scales in Diffusion Models", Algorithm 1, eqs. 5–9.
    """
    _check_finite_params("apg", scale=scale, eta=eta, momentum=momentum)
    if norm_threshold is not None and _is_number(norm_threshold) and not norm_threshold > 0:
        raise ValueError(f"apg norm_threshold must be > 0 or None, got {norm_threshold}.")

    def init(x: Array) -> APGState:
        return APGState(jnp.zeros_like(x))

    def combine(c: Prediction, u: Prediction, state: APGState, t: Array):
        running = (c.x0 - u.x0) + momentum * state.running
        diff = running
        if norm_threshold is not None:
            axes = tuple(range(1, diff.ndim))
            nrm = jnp.sqrt(jnp.sum(diff * diff, axis=axes, keepdims=True))
            diff = diff * jnp.minimum(1.0, norm_threshold / jnp.maximum(nrm, 1e-30))
        par, orth = project_onto(diff, c.x0)
        x0 = c.x0 + (scale - 1.0) * (orth + eta * par)
        eps = c.eps - schedule.alpha(t) / schedule.sigma(t) * (x0 - c.x0)
        return Prediction(x0, eps), APGState(running)

    params = {"scale": scale, "eta": eta, "momentum": momentum, "norm_threshold": norm_threshold}
    return Guidance(init, combine, None, "apg", params, state_axes=lambda s: APGState(0))


def guided_ddim_inversion(
    model_fn: Callable[..., Array],
    x0: ArrayLike,
    timesteps: ArrayLike,
    schedule: Any,
    *,
    prediction: str = "eps",
    guidance: Guidance | None = None,
    cond: dict[str, Any] | None = None,
    uncond: dict[str, Any] | None = None,
    batch_branches: bool = True,
) -> tuple[Array, SampleInfo]:
    """Deterministic DDIM inversion x_{t_min} → x_{t_max} that inverts `sample` with ddim(η=0).

    A guided DDIM step t → s reads x̂₀ (the "Tweedie" part) and ε̂ (the re-noising part) from the
    guided `Prediction`: x_s = α_s x̂₀ + σ_s ε̂. Inverting s → t with the prediction taken at
    (x_s, t) — the usual approximation, evaluating at the known point —

        x_t = (α_t/α_s)(x_s − σ_s ε̂) + σ_t ε̃,   ε̃ = (x_s − α_t x̂₀)/σ_t,

    i.e. the roles swap: CFG inverts with ε̂^ω in both places, CFG++ removes the unconditional
    noise ε̂_u and adds the guided one ε̂^λ (the authors' `inversion` of the CFG++ sampler).

    Args:
      model_fn, prediction, guidance, cond, uncond, batch_branches: as in `sample`.
      x0: the data at ``timesteps[-1]`` (batch, ...).
      timesteps: the *sampling* grid (decreasing, as given to `sample`); inversion runs it
        backwards, so ``sample(…, x_T, timesteps, guidance=…)`` with ddim(η=0) regenerates x0.
      schedule: the schedule of the sampler.

    Returns:
      (x_T at ``timesteps[0]``, SampleInfo with the evaluation count).

    References:
      Song, Meng & Ermon (2021), "DDIM", §4.3 (inversion as the reversed ODE);
      Chung et al. (2025), "CFG++", §4.2 (DDIM inversion with CFG++).
    """
    x = jnp.asarray(x0)
    ts = jnp.asarray(timesteps, x.dtype)
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"timesteps must be a 1-D grid of ≥ 2 times, got shape {ts.shape}.")
    denoise = as_denoiser(model_fn, schedule, prediction)
    predict = guided_predict_fn(denoise, guidance, cond, uncond, batch_branches)
    gstate = None if guidance is None else guidance.init(x)
    rev = ts[::-1]

    def body(state, inputs):
        x, carry = state
        s, t = inputs
        pred, carry = predict(x, t, carry)
        a_s, s_s, a_t = schedule.alpha(s), schedule.sigma(s), schedule.alpha(t)
        x_t = a_t / a_s * (x - s_s * pred.eps) + (x - a_t * pred.x0)
        return (x_t, carry), None

    (x_out, (_, nfe)), _ = jax.lax.scan(
        body, (x, (gstate, jnp.zeros((), jnp.int32))), (rev[:-1], rev[1:])
    )
    return x_out, SampleInfo(nfe)
