"""Feynman–Kac correctors (FKC) as correctors of the one sampler loop.

The conditional and unconditional branches of one model (``cond`` / ``uncond`` of
`diffusion.sample`) give scores S_c = −ε̂_c/σ_t and S_u = −ε̂_u/σ_t of marginals p_c,t, p_u,t of
the forward process dx = f x dt + g dW. FKC targets their geometric combination

    π̃_t = p_c,t^{a_c} p_u,t^{a_u},   A = a_c + a_u,   S = a_c S_c + a_u S_u,

by driving the solver with S (the combined prediction ε̂ = −σ_t S) and weighting each step
t → s by G(x_t, t)(t − s), with

    G = (A − 1) d f + g²/2 (‖S‖² − a_c ‖S_c‖² − a_u ‖S_u‖²)
      = (A − 1) d f + g²/2 [A(A − 1)‖S_u‖² + 2 a_c (A − 1)⟨S_u, D⟩ + a_c (a_c − 1)‖D‖²],

D = S_c − S_u (the second form is expanded so that nothing cancels: for CFG, A = 1 and
G = g²/2 · w(w − 1)‖S_c − S_u‖², computed from the difference of the two predictions).

Which solvers. The rate is that of the marginal-preserving family of reverse SDEs

    dx = [f x − (1 + η²)/2 · g² S] dt + η g dW̄,   η > 0,

for every η (the divergence terms ∇·S of the Fokker–Planck residual cancel for every member:
the drift contributes (1 + η²)/2 · g² ∇·S, the noise −η²/2 · g² ∇·S, the forward marginals'
time derivative −½ g² ∇·S). Euler–Maruyama is η = 1, DDPM ancestral sampling the exact
Gaussian step of η = 1 with S frozen, DDIM(η) the same for η ∈ (0, 1] (its noise
c² = η² σ_s² (1 − SNR_t/SNR_s) → η² g² |Δ|): all three are first-order discretisations the
left-point weights match. The deterministic member η = 0 (DDIM η = 0, the probability-flow
ODE, Heun, DPM-Solver++) has the same rate in continuous time, but its particles follow an
ODE: copies made by resampling never separate, so the particle system collapses onto a few
paths; the correctors refuse deterministic solvers.

Cases: `fkc_anneal_corrector` (a_c = β on the one branch: p^β), `fkc_product_corrector`
(a_c = a_u = 1: p_c p_u), `fkc_cfg_corrector` (a_c = w, a_u = 1 − w: the CFG target
p_u^{1−w} p_c^w), all instances of `fkc_geometric_corrector`.

References:
  Skreta, Akhound-Sadegh, Ohanesian, Bondesan, Aspuru-Guzik, Doucet, Brekelmans, Tong &
  Neklyudov (2025), "Feynman-Kac Correctors in Diffusion: Annealing, Guidance, and Product of
  Experts", Propositions 3.2–3.4; Song et al. (2021), "Score-Based Generative Modeling through
  Stochastic Differential Equations", App. (the marginal-preserving SDE family).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from feynkit.core.types import Array, ArrayLike
from feynkit.inference.diffusion.prediction import Prediction
from feynkit.inference.diffusion.sampler import Guidance, Solver
from feynkit.inference.smc.corrector import Corrector, Rejuvenation, resolve_resampler

__all__ = [
    "FKC_SOLVERS",
    "fkc_anneal_corrector",
    "fkc_cfg_corrector",
    "fkc_geometric_corrector",
    "fkc_product_corrector",
    "fkc_rate",
]

FKC_SOLVERS = ("euler_maruyama", "ddpm", "ddim")


def _number(v: Any) -> bool:
    return isinstance(v, int | float)


def _sq(v: Array) -> Array:
    return jnp.sum((v * v).reshape(v.shape[0], -1), axis=1)


def _dot(u: Array, v: Array) -> Array:
    return jnp.sum((u * v).reshape(u.shape[0], -1), axis=1)


def fkc_rate(
    eps_cond: ArrayLike,
    eps_uncond: ArrayLike,
    a_cond: ArrayLike,
    a_uncond: ArrayLike,
    schedule: Any,
    t: ArrayLike,
    total: float | None = None,
) -> Array:
    """The FKC log-weight rate G per unit generation time, per sample (see the module docstring).

        G = (A − 1) d f + g²/(2σ²) [A(A−1)‖ε̂_u‖² + 2 a_c (A−1)⟨ε̂_u, Δ⟩ + a_c(a_c−1)‖Δ‖²],

    Δ = ε̂_c − ε̂_u, A = a_c + a_u, d the number of entries of one sample, f = d log α/dt and
    g² = dσ²/dt − 2 f σ² at t. Sums run over all axes but the first. `total` gives A when it is
    known exactly (CFG: 1, even for a traced w), else A = a_cond + a_uncond.
    """
    ec, eu = jnp.asarray(eps_cond), jnp.asarray(eps_uncond)
    total = a_cond + a_uncond if total is None else total
    diff = ec - eu
    d = ec[0].size
    inner = a_cond * (a_cond - 1.0) * _sq(diff)
    if not (_number(total) and total == 1.0):
        inner = inner + (total - 1.0) * (total * _sq(eu) + 2.0 * a_cond * _dot(eu, diff))
    sigma = schedule.sigma(t)
    g2 = schedule.beta(t)
    return (total - 1.0) * d * schedule.drift_coef(t) + 0.5 * g2 / sigma**2 * inner


def _geometric_drift(a_cond, a_uncond, total, schedule, name: str, uses_uncond: bool) -> Guidance:
    """ε̂ = ε̂_u + a_c (ε̂_c − ε̂_u) + (A − 1) ε̂_u (the score S of π̃_t) and the x̂₀ that makes
    the pair consistent with x = α x̂₀_u + σ ε̂_u."""
    unit = _number(total) and total == 1.0

    def combine(c: Prediction, u: Prediction, state: Any, t: Array):
        x0 = u.x0 + a_cond * (c.x0 - u.x0)
        eps = u.eps + a_cond * (c.eps - u.eps)
        if not unit:
            x0 = x0 + (1.0 - total) * (schedule.sigma(t) / schedule.alpha(t)) * u.eps
            eps = eps + (total - 1.0) * u.eps
        return Prediction(x0, eps), state

    return Guidance(
        lambda x: None,
        combine,
        None,
        name,
        {"a_cond": a_cond, "a_uncond": a_uncond},
        uses_uncond,
    )


def _check_solver(solver: Solver, who: str) -> None:
    if solver.name in FKC_SOLVERS and solver.stochastic:
        for attr in ("drift_coef", "beta", "sigma", "alpha"):
            if not hasattr(solver.schedule, attr):
                raise ValueError(
                    f"{who} needs the forward SDE's coefficients from the solver's schedule "
                    f"(drift_coef f and beta g²); {type(solver.schedule).__name__} has no {attr}."
                )
        return
    if solver.stochastic is False:
        why = (
            "it is deterministic: its particles follow an ODE, so the copies that resampling "
            "makes never separate and the particle set collapses onto a few paths (FKC's "
            "divergence-free weights are those of the reverse SDEs with noise)"
        )
    else:
        why = f"its weights are derived only for the reverse SDEs, not for solver {solver.name!r}"
    raise ValueError(
        f"{who} cannot correct solver {solver.name!r}: {why}. Use a stochastic SDE solver: "
        "euler_maruyama, ddpm or ddim with eta > 0."
    )


def fkc_geometric_corrector(
    a_cond: float,
    a_uncond: float,
    *,
    name: str = "fkc_geometric",
    total: float | None = None,
    single_branch: bool = False,
    guidance_check: Callable[[Guidance], None] | None = None,
    ess_threshold: float = 0.5,
    resample: str | Callable[..., Array] = "systematic",
    rejuvenation: Rejuvenation | None = None,
) -> Corrector:
    """FKC for π̃_t = p_c,t^{a_c} p_u,t^{a_u} (see the module docstring).

    Args:
      a_cond, a_uncond: the exponents of the conditional and unconditional branches; their
        sum A must be positive.
      name: the corrector's name in error messages.
      total: A = a_cond + a_uncond when known exactly (CFG: 1 for any, even traced, scale).
      single_branch: the model has one branch (``cond``) with exponent a_uncond: the
        unconditional branch is not evaluated (annealing).
      guidance_check: called with the user's guidance (not None); raise ValueError to reject
        it. None: any guidance is rejected (the corrector supplies its own drift).
      ess_threshold, resample: adaptive resampling (name or `feynkit.core` function).
      rejuvenation: `langevin_rejuvenation(...)` moves after resampling, or None.

    Returns:
      A `Corrector` for ``diffusion.sample(..., corrector=...)``.
    """
    if _number(a_cond) and _number(a_uncond) and not a_cond + a_uncond > 0:
        raise ValueError(
            f"{name}: the exponents must sum to a positive number, got a_cond={a_cond}, "
            f"a_uncond={a_uncond}."
        )
    if _number(ess_threshold) and not 0.0 <= ess_threshold <= 1.0:
        raise ValueError(f"{name}: ess_threshold must be in [0, 1], got {ess_threshold}.")
    total = a_cond + a_uncond if total is None else total

    def prepare(solver: Solver, guidance: Guidance | None) -> Guidance:
        _check_solver(solver, name)
        if guidance is not None:
            if guidance_check is None:
                raise ValueError(
                    f"{name} supplies its own drift (the score of its target); pass "
                    f"guidance=None (got guidance {guidance.name!r})."
                )
            guidance_check(guidance)
        return _geometric_drift(a_cond, a_uncond, total, solver.schedule, name, not single_branch)

    def observe(x, t, pc: Prediction, pu: Prediction, pred: Prediction, schedule) -> Array:
        if single_branch:  # one branch with exponent a_uncond
            return fkc_rate(pc.eps, pc.eps, 0.0, a_uncond, schedule, t, total)
        return fkc_rate(pc.eps, pu.eps, a_cond, a_uncond, schedule, t, total)

    def increment(rate, _, t, t_next):
        return rate * (t - t_next), None

    return Corrector(
        name,
        prepare,
        observe,
        increment,
        None,
        ess_threshold,
        resolve_resampler(resample),
        False,
        rejuvenation,
    )


def fkc_anneal_corrector(
    beta: float,
    *,
    ess_threshold: float = 0.5,
    resample: str | Callable[..., Array] = "systematic",
    rejuvenation: Rejuvenation | None = None,
) -> Corrector:
    """FKC for the annealed family p_t^β of the model's (conditional) branch (β > 1 sharpens).

        drift: β S,   G = (β − 1) d f + β(β − 1) g²/2 ‖S‖²   (Prop. 3.2 of Skreta et al.)

    Use with ``guidance=None``; start from x_T ~ N(0, σ_T²/β I), the law p_T^β normalised.
    """
    if _number(beta) and not beta > 0:
        raise ValueError(f"fkc_anneal_corrector: beta must be > 0, got {beta}.")
    return fkc_geometric_corrector(
        0.0,
        beta,
        name="fkc_anneal",
        single_branch=True,
        ess_threshold=ess_threshold,
        resample=resample,
        rejuvenation=rejuvenation,
    )


def fkc_product_corrector(
    *,
    ess_threshold: float = 0.5,
    resample: str | Callable[..., Array] = "systematic",
    rejuvenation: Rejuvenation | None = None,
) -> Corrector:
    """FKC for the product of experts p_c,t · p_u,t: the experts are the ``cond`` and
    ``uncond`` branches of the one model_fn (e.g. two labels, or ``{"expert": 0}`` and
    ``{"expert": 1}``).

        drift: S_c + S_u,   G = d f + g² ⟨S_c, S_u⟩   (Prop. 3.3 of Skreta et al.)

    Use with ``guidance=None``; start from x_T ~ N(0, σ_T²/2 I).
    """
    return fkc_geometric_corrector(
        1.0,
        1.0,
        name="fkc_product",
        ess_threshold=ess_threshold,
        resample=resample,
        rejuvenation=rejuvenation,
    )


def fkc_cfg_corrector(
    scale: float,
    *,
    ess_threshold: float = 0.5,
    resample: str | Callable[..., Array] = "systematic",
    rejuvenation: Rejuvenation | None = None,
) -> Corrector:
    """FKC for the CFG target p_u,t^{1−w} p_c,t^w, whose drift is classifier-free guidance.

        drift: S_u + w (S_c − S_u),   G = g²/2 · w(w − 1) ‖S_c − S_u‖²   (Prop. 3.4)

    ``guidance=None`` or ``guidance=cfg(scale)`` with the same scale and no interval; any other
    guidance is rejected (its drift is not the score of this target).
    """

    def check(g: Guidance) -> None:
        params = g.params or {}
        same = g.name == "cfg" and params.get("interval") is None
        s = params.get("scale")
        if same and _number(s) and _number(scale):
            same = float(s) == float(scale)
        if not same:
            raise ValueError(
                f"fkc_cfg_corrector({scale}) weights the CFG target, whose drift is "
                f"cfg({scale}) without an interval; got guidance {g.name!r} with {params}. "
                "Pass guidance=None or cfg(scale) with the corrector's scale."
            )

    return fkc_geometric_corrector(
        scale,
        1.0 - scale,
        name="fkc_cfg",
        total=1.0,
        guidance_check=check,
        ess_threshold=ess_threshold,
        resample=resample,
        rejuvenation=rejuvenation,
    )
