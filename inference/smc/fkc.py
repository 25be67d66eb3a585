"""Feynman–Kac correctors (FKC): weighted SDEs that sample annealed, product and CFG targets.

Given pretrained scores S_i(x, t) = ∇ log p_i,t(x) of VP diffusions (forward SDE
dx = f(t) x dt + g(t) dW), FKC targets the geometric combination of their marginals

    π̃_t(x) = Π_i p_i,t(x)^{a_i},          A = Σ_i a_i,   S = Σ_i a_i S_i.

Run in generation time s (t decreasing from t_max to t_min), the SDE and log-weight rate

    dx = [−f(t) x + g(t)² S(x, t)] ds + g(t) dW,
    d log w = G(x, t) ds,   G = (A − 1) d f(t) + g(t)²/2 · (‖S‖² − Σ_i a_i ‖S_i‖²)

make the weighted particles track π̃_t exactly (the Laplacian terms cancel, so no divergence of
the score is needed). Three cases of the paper:

  * annealing p^β (a = β):       G = (β − 1) d f + β(β − 1) g²/2 ‖S‖²
  * product of experts p₁p₂:    G = d f + g² ⟨S₁, S₂⟩
  * CFG geometric mixture p₁^(1−w) p₂^w:  G = g²/2 · w(w − 1) ‖S₂ − S₁‖²

The drift alone is the naive baseline (scaled score, summed scores, CFG); FKC adds the weights
and SMC resampling. The state-independent term (A − 1) d f only moves log Ẑ.

This module takes the pretrained models as score functions `(x, t) -> S` and runs
Euler–Maruyama; `fkc_sample` and `fkc_kernel` are that case of the one corrected sampler loop
(`feynkit.inference.smc.corrector`). For Flax or quantized models, the branches of one
model_fn, other solvers (DDPM, DDIM η > 0) and guidance, use
``diffusion.sample(..., corrector=smc.fkc_cfg_corrector(w))`` and its siblings
(`feynkit.inference.smc.fkc_corrector`).

Derivation: write the Fokker–Planck equation of the SDE for the unnormalised π̃ and collect the
residual as a potential, G = ∂_s log π̃ + ∇·b + ⟨b, ∇log π̃⟩ − g²/2 (Δ log π̃ + ‖∇ log π̃‖²),
using ∂_t log p_i = −d f − f ⟨x, S_i⟩ + g²/2 (∇·S_i + ‖S_i‖²) for each pretrained marginal.

References:
  Skreta, Akhound-Sadegh, Ohanesian, Bondesan, Aspuru-Guzik, Doucet, Brekelmans, Tong &
  Neklyudov (2025), "Feynman-Kac Correctors in Diffusion: Annealing, Guidance, and Product of
  Experts", Propositions 3.2–3.4.
"""

import math
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import norm

from feynkit.core import shard_particles, systematic_resample
from feynkit.core.schedules import VPSchedule
from feynkit.core.sharding import particle_sharding
from feynkit.core.types import Array, Key, LogProbFn, ScoreFn
from feynkit.inference.diffusion.solvers import euler_maruyama
from feynkit.inference.smc import base
from feynkit.inference.smc.corrector import Corrector, corrected_sampler

__all__ = [
    "WeightedSDE",
    "annealed_sde",
    "cfg_sde",
    "fkc_init",
    "fkc_kernel",
    "fkc_sample",
    "geometric_sde",
    "product_sde",
]


class WeightedSDE(NamedTuple):
    """A target family for FKC.

    Attributes:
      score_and_rate: `(x, t) -> (S, G)` for a batch x of shape (n, d): the combined score that
        drives the SDE and the log-weight rate per unit generation time, shape (n,).
      schedule: the VP schedule shared by the pretrained models.
      total_exponent: A = Σ a_i; π̃ at t_max is close to N(0, I/A).
      log_density: `(x, t) -> log π̃_t(x)` when the pretrained log-densities are known (analytic
        targets), for exact initial importance weights; None otherwise.
    """

    score_and_rate: Callable[[Array, Array], tuple[Array, Array]]
    schedule: VPSchedule
    total_exponent: float
    log_density: LogProbFn | None = None


def geometric_sde(
    score_fns: Sequence[ScoreFn],
    exponents: Sequence[float],
    schedule: VPSchedule,
    log_prob_fns: Sequence[LogProbFn] | None = None,
) -> WeightedSDE:
    """FKC for π̃_t = Π p_i,t^{a_i}: drift from S = Σ a_i S_i, rate G as in the module docstring.

    Args:
      score_fns: `(x, t) -> ∇ log p_i,t(x)` on batches, one per pretrained model.
      exponents: a_i, one per model; their sum must be positive.
      schedule: VP schedule of the pretrained models.
      log_prob_fns: optional `(x, t) -> log p_i,t(x)`, for exact initial weights.
    """
    score_fns, exponents = tuple(score_fns), tuple(float(a) for a in exponents)
    if not score_fns or len(score_fns) != len(exponents):
        raise ValueError(
            f"need one exponent per score function; got {len(score_fns)} score functions and "
            f"{len(exponents)} exponents."
        )
    if not all(math.isfinite(a) for a in exponents):
        raise ValueError(f"the exponents must be finite numbers, got {exponents}.")
    total = sum(exponents)
    if total <= 0:
        raise ValueError(f"the exponents must sum to a positive number, got {exponents}.")
    if log_prob_fns is not None and len(log_prob_fns) != len(score_fns):
        raise ValueError("log_prob_fns must have one entry per score function.")

    def score_and_rate(x, t):
        scores = [fn(x, t) for fn in score_fns]
        for s in scores:
            if s.shape != x.shape:
                raise ValueError(f"a score function returned shape {s.shape} for x of {x.shape}.")
        combined = sum(a * s for a, s in zip(exponents, scores, strict=True))
        sq = jnp.sum(combined**2, -1) - sum(
            a * jnp.sum(s**2, -1) for a, s in zip(exponents, scores, strict=True)
        )
        d = x.shape[-1]
        rate = (total - 1.0) * d * schedule.drift_coef(t) + 0.5 * schedule.beta(t) * sq
        return combined, rate

    log_density = None
    if log_prob_fns is not None:
        fns = tuple(log_prob_fns)

        def log_density(x, t):
            return sum(a * fn(x, t) for a, fn in zip(exponents, fns, strict=True))

    return WeightedSDE(score_and_rate, schedule, total, log_density)


def annealed_sde(
    score_fn: ScoreFn, schedule: VPSchedule, beta: float, log_prob_fn: LogProbFn | None = None
) -> WeightedSDE:
    """FKC for the annealed family p_t^β (β > 0; β > 1 sharpens). Prop. 3.2 of the paper."""
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"the inverse temperature beta must be > 0 and finite, got {beta}.")
    lp = None if log_prob_fn is None else [log_prob_fn]
    return geometric_sde([score_fn], [beta], schedule, lp)


def product_sde(
    score_fns: Sequence[ScoreFn],
    schedule: VPSchedule,
    log_prob_fns: Sequence[LogProbFn] | None = None,
) -> WeightedSDE:
    """FKC for the product of experts Π_i p_i,t. Prop. 3.3 of the paper."""
    if len(score_fns) < 2:
        raise ValueError(f"a product of experts needs at least 2 models, got {len(score_fns)}.")
    return geometric_sde(score_fns, [1.0] * len(score_fns), schedule, log_prob_fns)


def cfg_sde(
    uncond_score_fn: ScoreFn,
    cond_score_fn: ScoreFn,
    schedule: VPSchedule,
    guidance_weight: float,
    log_prob_fns: Sequence[LogProbFn] | None = None,
) -> WeightedSDE:
    """FKC for the CFG target p_uncond^(1−w) p_cond^w; its drift is classifier-free guidance
    with score (1 − w) S_uncond + w S_cond. Prop. 3.4 of the paper (w = β there)."""
    w = float(guidance_weight)
    if not math.isfinite(w):
        raise ValueError(
            f"guidance_weight must be a finite number, got {guidance_weight}; w = 0 is the "
            "unconditional model, w = 1 the conditional one."
        )
    return geometric_sde([uncond_score_fn, cond_score_fn], [1.0 - w, w], schedule, log_prob_fns)


def _time_grid(num_steps: int, t_max: float, t_min: float) -> Array:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}.")
    return jnp.linspace(t_max, t_min, num_steps + 1)


def _warn_if_unstable(schedule: VPSchedule, num_steps: int, t_max: float, t_min: float) -> None:
    """Warn when Euler–Maruyama's step is too long for the schedule's noise rate.

    The linear part of an Euler–Maruyama step of the reverse VP SDE multiplies x by about
    1 − c β(t) Δt with c of order one (c = 1/2 for a standard-normal score, 3/2 when annealing
    it with β = 2), so β(t) Δt ≳ 2 makes the step expand instead of contract: every particle
    is thrown to one far-away point after resampling (seen at 3 and 5 steps of the linear
    schedule, β_max = 20). Checked on the concrete grid, at trace time.
    """
    ts = np.linspace(t_max, t_min, num_steps + 1)
    with jax.ensure_compile_time_eval():
        rate = np.asarray(schedule.beta(jnp.asarray(ts[:-1])), np.float64) * (ts[:-1] - ts[1:])
    worst = float(np.max(rate))
    if not worst <= 2.0:
        need = int(np.ceil(num_steps * worst))
        warnings.warn(
            f"num_steps={num_steps} is too few for Euler–Maruyama on this schedule: β(t)·Δt "
            f"reaches {worst:.3g} (> 2), where the step is unstable and the particles can "
            f"collapse onto one far-away point; use num_steps ≥ {need} (β·Δt ≤ 1).",
            RuntimeWarning,
            stacklevel=3,
        )


def _sde_loop(
    sde: WeightedSDE,
    ts: Array,
    weighted: bool | Array = True,
    resample_fn: Callable[..., Array] = systematic_resample,
    ess_threshold: float = 0.5,
    sharding: jax.sharding.Sharding | None = None,
    keep_ancestry: bool = False,
):
    """The corrected sampler loop (`corrector.corrected_sampler`) of a `WeightedSDE`: the
    model is its combined score, Euler–Maruyama moves it, the weights come from its rate."""
    schedule = sde.schedule

    def score_model(x, t):
        return sde.score_and_rate(x, t[0])[0]

    def prepare(solver, guidance):
        return None

    def observe(x, t, pc, pu, pred, sched):
        # the same call as the model's, traced on the same (x, t): XLA computes it once
        return sde.score_and_rate(x, t)[1]

    def increment(rate, _, t, t_next):
        return jnp.where(weighted, rate * (t - t_next), jnp.zeros_like(rate)), None

    threshold = (
        jnp.where(weighted, ess_threshold, 0.0)
        if _traced(weighted)
        else (ess_threshold if weighted else 0.0)
    )
    corrector = Corrector("fkc_sde", prepare, observe, increment, None, threshold, resample_fn)
    return corrected_sampler(
        euler_maruyama(schedule),
        score_model,
        ts,
        corrector,
        prediction="score",
        keep_ancestry=keep_ancestry,
        sharding=sharding,
    )


def fkc_kernel(
    sde: WeightedSDE,
    num_steps: int,
    t_max: float = 1.0,
    t_min: float = 1e-3,
    weighted: bool = True,
    resample_fn: Callable[..., Array] = systematic_resample,
    ess_threshold: float = 0.5,
    sharding: jax.sharding.Sharding | None = None,
    keep_ancestry: bool = False,
):
    """The SMC kernel of FKC with Euler–Maruyama steps on the uniform grid t_max → t_min.

    Step k moves t_k → t_{k+1} (Δ = t_k − t_{k+1} > 0):
      x ← x + [−f(t_k) x + g(t_k)² S(x, t_k)] Δ + g(t_k) √Δ ξ,   log w += G(x, t_k) Δ.
    With `weighted=False` the increments are zero and nothing is resampled: the naive sampler.
    `weighted` may also be a traced boolean scalar, so that one compiled function runs both.
    It is the kernel of the one corrected sampler loop (`smc.corrector`) on states whose
    particles are x (from `fkc_init`), for `smc.run` and `smc.run_checkpointed`.
    """
    ts = _time_grid(num_steps, t_max, t_min)
    _warn_if_unstable(sde.schedule, num_steps, t_max, t_min)
    loop = _sde_loop(
        sde,
        ts,
        weighted,
        resample_fn,
        ess_threshold,
        sharding,
        keep_ancestry,
    )

    def kernel(key: Key, state: base.SMCState) -> tuple[base.SMCState, base.SMCInfo]:
        # Euler–Maruyama on a score carries nothing but x: the loop's state is x plus the
        # evaluation count, which this kernel's callers never read.
        inner = loop.init(state.particles)._replace(
            log_weights=state.log_weights, log_normalizer=state.log_normalizer, step=state.step
        )
        new, info = loop.kernel(key, inner)
        return new._replace(particles=new.particles.x, shared=None), info

    return kernel


def _traced(flag) -> bool:
    return isinstance(flag, jax.Array)


def fkc_init(
    key: Key,
    sde: WeightedSDE,
    num_particles: int,
    dim: int,
    t_max: float = 1.0,
    weighted: bool = True,
) -> base.SMCState:
    """Particles from N(0, I/A) at t_max, importance-weighted to π̃_{t_max} when the target's
    log-density is known (so log Ẑ estimates log ∫ π̃_{t_min} exactly in the limit)."""
    scale = 1.0 / jnp.sqrt(sde.total_exponent)
    x = scale * jax.random.normal(key, (num_particles, dim))
    log_w = None
    if sde.log_density is not None and (_traced(weighted) or weighted):
        log_q = jnp.sum(norm.logpdf(x, scale=scale), -1)
        log_w = sde.log_density(x, jnp.asarray(t_max)) - log_q
        log_w = jnp.where(weighted, log_w, jnp.zeros_like(log_w))
    return base.init(x, log_w)


def fkc_sample(
    key: Key,
    sde: WeightedSDE,
    num_particles: int,
    dim: int,
    num_steps: int = 500,
    t_max: float = 1.0,
    t_min: float = 1e-3,
    weighted: bool = True,
    resample_fn: Callable[..., Array] = systematic_resample,
    ess_threshold: float = 0.5,
    mesh: jax.sharding.Mesh | None = None,
    keep_ancestry: bool = False,
) -> tuple[base.SMCState, base.SMCInfo]:
    """Sample π̃_{t_min} with FKC (or the naive SDE with `weighted=False`) in one `lax.scan`.

    Args:
      key: PRNG key.
      sde: from `annealed_sde`, `product_sde`, `cfg_sde` or `geometric_sde`.
      num_particles, dim: particle count and dimension.
      num_steps: Euler–Maruyama steps from t_max to t_min.
      weighted: False gives the naive baseline (same SDE, no weights, no resampling); a traced
        boolean scalar selects at run time.
      resample_fn, ess_threshold: adaptive resampling of the SMC loop.
      mesh: shard the particles over this mesh (`feynkit.core.particle_mesh()`).
      keep_ancestry: keep every step's ancestor indices in the info (steps × n integers).

    Returns:
      The final `SMCState` (particles (n, d), normalised log-weights, log Ẑ) and the per-step
      `SMCInfo` stacked over steps. Jit it with the non-array arguments static.

    Warns:
      RuntimeWarning: (at trace time, so also under ``jit``) when ``num_steps`` is so small
      that β(t)·Δt > 2 somewhere on the grid, where Euler–Maruyama is unstable and the
      particles collapse (`_warn_if_unstable`). The SDE constructors reject non-finite
      exponents, β and guidance weights when they are built.
    """
    k_init, k_run = jax.random.split(key)
    state = fkc_init(k_init, sde, num_particles, dim, t_max, weighted)
    sharding = None
    if mesh is not None:
        state = state._replace(particles=shard_particles(state.particles, mesh))
        sharding = particle_sharding(mesh)
    kernel = fkc_kernel(
        sde, num_steps, t_max, t_min, weighted, resample_fn, ess_threshold, sharding, keep_ancestry
    )
    return base.run(k_run, kernel, state, num_steps)
