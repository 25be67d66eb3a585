"""Feynman–Kac correction as a layer of the one diffusion sampler loop.

``diffusion.sample(..., corrector=c)`` runs the batch as n weighted particles. Each step of the
run is one kernel step of `feynkit.inference.smc.base` (mutate → reweight → adaptive resample):

    x_{k+1} = solver.step(x_k)                      the solver's own move, guidance and all
    log w  += c.increment(stats_k, stats_{k+1})     from predictions the loop evaluated
    resample (x, solver state, per-sample guidance state, cached prediction) if ESS < τ n

A `Corrector` says what it reads from the predictions (``observe``: FKC's weight rate from the
conditional and unconditional branches, FK steering's reward of x̂₀) and where:

* ``cache_prediction=False`` (FKC): the increment of step k needs the prediction at x_k only,
  which the solver step evaluates anyway: the loop evaluates the branches once at x_k, hands
  the combined prediction to the solver (`reuse_first_prediction`) and observes the branches.
  A run costs exactly the solver's evaluations.
* ``cache_prediction=True`` (FK steering): the increment needs the prediction at x_{k+1}: the
  loop evaluates it once after the move, keeps it in the particle, and the next step's solver
  call reuses it. A run costs the solver's evaluations plus one (the start point).

Per-run state — the evaluation count, Adaptive Guidance's switch, a multistep solver's step
size — is the kernel state's ``shared`` part, kept once; per-sample state (APG's momentum,
DPM-Solver's previous x̂₀) follows the particles through resampling (`Guidance.state_axes`;
otherwise a leaf whose leading axis is the particle count is per-sample).

Tiers (BlackJAX style): `corrected_sampler` binds the pieces and returns ``init`` /
``kernel`` for `smc.run` or `smc.run_checkpointed`, and ``output`` that turns the final state
into ``(x, SampleInfo)``; `corrected_sample` is what ``diffusion.sample`` delegates to.

Layering: `diffusion.sample` imports this module lazily (``smc`` imports ``diffusion``), so the
dependency stays one-way at import time and there is one SMC kernel (`smc.base`).

References:
  Del Moral (2004), "Feynman-Kac Formulae"; Skreta et al. (2025), "Feynman-Kac Correctors in
  Diffusion"; Singhal et al. (2025), "A General Framework for Inference-time Scaling and
  Steering of Diffusion Models".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from feynkit.core import get_resampler
from feynkit.core.types import Array, ArrayLike, Key, PyTree
from feynkit.core.validation import check_time_grid
from feynkit.inference.diffusion.prediction import Prediction, as_denoiser
from feynkit.inference.diffusion.sampler import (
    Guidance,
    SampleInfo,
    Solver,
    checked_model,
    guided_branches_fn,
    guided_predict_fn,
    reuse_first_prediction,
)
from feynkit.inference.smc import base

__all__ = [
    "CorrectedParticles",
    "CorrectedSampler",
    "CorrectedShared",
    "Corrector",
    "Rejuvenation",
    "corrected_sample",
    "corrected_sampler",
    "resolve_resampler",
]


class Rejuvenation(NamedTuple):
    """MCMC moves on π̃_t after each resampling (see `feynkit.inference.smc.rejuvenation`).

    Attributes:
      num_steps: K moves per resampling.
      step_size: h, or ``h(t)``; a float c means h_t = c σ_t² (σ_t² is the width of π̃_t at high
        noise and shrinks with it).
      log_density: ``log π̃_t(x)`` up to a constant, ``(x, t) -> (n,)``: the moves are MALA
        (Metropolis-adjusted); None: unadjusted Langevin (ULA).
    """

    num_steps: int
    step_size: float | Callable[[Array], Array]
    log_density: Callable[[Array, Array], Array] | None = None


class Corrector(NamedTuple):
    """A particle layer of the sampler loop (see the module docstring).

    Attributes:
      name: e.g. "fkc_cfg", "fk_steering".
      prepare: ``prepare(solver, guidance) -> guidance`` checks that the corrector's weights
        hold for this solver and guidance (ValueError otherwise) and returns the `Guidance`
        the loop combines the branches with (the corrector's own drift, or the user's), or None
        for the conditional branch alone.
      observe: ``observe(x, t, cond_pred, uncond_pred, pred, schedule) -> stats``, a pytree of
        per-particle arrays (leading axis n) read from the branch predictions and their
        combination (the solver's schedule gives α_t, σ_t and the SDE coefficients).
      increment: ``increment(stats_k, stats_next, t, t_next) -> (log_increments (n,), stats)``
        for the move t → t_next; ``stats_next`` is None unless ``cache_prediction``.
      initial_log_weights: ``(stats_0) -> (n,)`` log-weights of the starting particles, or None.
      ess_threshold: resample when ESS < ess_threshold · n (may be traced).
      resample_fn: a `feynkit.core` resampling function.
      cache_prediction: the increment needs the prediction at the new point.
      rejuvenation: `Rejuvenation` moves after resampling, or None. Valid only for correctors
        whose combined prediction is the score of their target π̃_t (FKC).
    """

    name: str
    prepare: Callable[[Solver, Guidance | None], Guidance | None]
    observe: Callable[[Array, Array, Prediction, Prediction, Prediction, Any], PyTree]
    increment: Callable[[PyTree, PyTree, Array, Array], tuple[Array, PyTree]]
    initial_log_weights: Callable[[PyTree], Array] | None = None
    ess_threshold: float | Array = 0.5
    resample_fn: Callable[..., Array] = get_resampler("systematic")
    cache_prediction: bool = False
    rejuvenation: Rejuvenation | None = None


class CorrectedParticles(NamedTuple):
    """Per-particle state: x, the prediction at x and the corrector's stats (None unless the
    corrector caches them), and the per-sample leaves of the solver and guidance states."""

    x: Array
    pred: Prediction | None
    stats: PyTree
    solver_state: tuple
    guidance_state: tuple


class CorrectedShared(NamedTuple):
    """Per-run state: the per-run leaves of the solver and guidance states, the network
    evaluations per particle, and rejuvenation's accepted / proposed move counts."""

    solver_state: tuple
    guidance_state: tuple
    nfe: Array
    accepted: Array
    proposed: Array


class CorrectedSampler(NamedTuple):
    """``init(x_init, log_weights=None) -> SMCState``; ``kernel(key, state) -> (state,
    SMCInfo)`` for `smc.run` / `smc.run_checkpointed`; ``num_steps``; and ``output(state,
    info, denoise_final=False, trajectory=None) -> (x, SampleInfo)``."""

    init: Callable[..., base.SMCState]
    kernel: Callable[[Key, base.SMCState], tuple[base.SMCState, base.SMCInfo]]
    num_steps: int
    output: Callable[..., tuple[Array, SampleInfo]]


def resolve_resampler(resample: str | Callable[..., Array]) -> Callable[..., Array]:
    """A resampling function from its name ("systematic", ...) or the function itself."""
    return get_resampler(resample) if isinstance(resample, str) else resample


class _Layout(NamedTuple):
    treedef: Any
    axes: tuple  # per leaf: the particle axis, or None for a per-run leaf


def _layout(tree: Any, n: int, axes_fn: Callable[[Any], Any] | None) -> _Layout:
    leaves, treedef = jax.tree.flatten(tree)
    if axes_fn is not None:
        axes = jax.tree.flatten(axes_fn(tree), is_leaf=lambda a: a is None)[0]
        if len(axes) != len(leaves):
            raise ValueError(
                f"state_axes gave {len(axes)} axes for a state of {len(leaves)} leaves."
            )
    else:
        axes = [0 if len(leaf.shape) >= 1 and leaf.shape[0] == n else None for leaf in leaves]
    return _Layout(treedef, tuple(axes))


def _split(tree: Any, lay: _Layout) -> tuple[tuple, tuple]:
    leaves = jax.tree.leaves(tree)
    per = tuple(
        jnp.moveaxis(v, a, 0) for v, a in zip(leaves, lay.axes, strict=True) if a is not None
    )
    run = tuple(v for v, a in zip(leaves, lay.axes, strict=True) if a is None)
    return per, run


def _merge(per: tuple, run: tuple, lay: _Layout) -> Any:
    it_per, it_run = iter(per), iter(run)
    leaves = [next(it_run) if a is None else jnp.moveaxis(next(it_per), 0, a) for a in lay.axes]
    return jax.tree.unflatten(lay.treedef, leaves)


def corrected_sampler(
    solver: Solver,
    model_fn: Callable[..., Any],
    timesteps: ArrayLike,
    corrector: Corrector,
    *,
    prediction: str = "eps",
    guidance: Guidance | None = None,
    cond: dict[str, Any] | None = None,
    uncond: dict[str, Any] | None = None,
    batch_branches: bool = True,
    keep_ancestry: bool = False,
    sharding: jax.sharding.Sharding | None = None,
) -> CorrectedSampler:
    """Bind solver, model, grid, guidance and corrector into an SMC (init, kernel) pair.

    Arguments as in `feynkit.inference.diffusion.sample`; `sharding` constrains the particles
    after each step (`feynkit.core.particle_sharding`).
    """
    ts = check_time_grid(timesteps)
    num_steps = ts.shape[0] - 1
    drift = corrector.prepare(solver, guidance)
    denoise = as_denoiser(checked_model(model_fn, prediction), solver.schedule, prediction)
    branches = guided_branches_fn(denoise, drift, cond, uncond, batch_branches)
    predict = guided_predict_fn(denoise, drift, cond, uncond, batch_branches)
    schedule = solver.schedule

    def layouts(x: Array) -> tuple[_Layout, _Layout]:
        spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
        n = x.shape[0]
        s_lay = _layout(jax.eval_shape(solver.init, spec), n, None)
        g_shape = None if drift is None else jax.eval_shape(drift.init, spec)
        g_lay = _layout(g_shape, n, None if drift is None else drift.state_axes)
        return s_lay, g_lay

    def evaluate(x, t, gstate, nfe):
        (pc, pu), (_, nfe) = branches(x, t, (gstate, nfe))
        if drift is None:
            pred = pc
        else:
            pred, gstate = drift.combine(pc, pu, gstate, t)
        return pred, corrector.observe(x, t, pc, pu, pred, schedule), gstate, nfe

    def check_stats(stats, n):
        for leaf in jax.tree.leaves(stats):
            if leaf.ndim < 1 or leaf.shape[0] != n:
                raise ValueError(
                    f"corrector {corrector.name!r} observed a statistic of shape {leaf.shape}; "
                    f"it needs one value per particle (leading axis {n})."
                )
        return stats

    def init(x_init: ArrayLike, log_weights: ArrayLike | None = None) -> base.SMCState:
        x = jnp.asarray(x_init)
        n = x.shape[0]
        s_lay, g_lay = layouts(x)
        gstate = None if drift is None else drift.init(x)
        nfe = jnp.zeros((), jnp.int32)
        pred = stats = None
        lw = None if log_weights is None else jnp.asarray(log_weights)
        if corrector.cache_prediction:
            pred, stats, gstate, nfe = evaluate(x, ts[0].astype(x.dtype), gstate, nfe)
            stats = check_stats(stats, n)
            if corrector.initial_log_weights is not None:
                lw0 = jnp.asarray(corrector.initial_log_weights(stats))
                lw = lw0 if lw is None else lw + lw0
        s_per, s_run = _split(solver.init(x), s_lay)
        g_per, g_run = _split(gstate, g_lay)
        particles = CorrectedParticles(x, pred, stats, s_per, g_per)
        zero = jnp.zeros((), jnp.int32)
        shared = CorrectedShared(s_run, g_run, nfe, zero, zero)
        return base.init(particles, lw, shared)

    def propagate(key: Key, p: CorrectedParticles, step: Array, shared: CorrectedShared):
        x = p.x
        s_lay, g_lay = layouts(x)
        t, t_next = ts[step].astype(x.dtype), ts[step + 1].astype(x.dtype)
        sstate = _merge(p.solver_state, shared.solver_state, s_lay)
        gstate = _merge(p.guidance_state, shared.guidance_state, g_lay)
        nfe = shared.nfe
        if corrector.cache_prediction:
            pred = p.pred
        else:
            pred, stats, gstate, nfe = evaluate(x, t, gstate, nfe)
            stats = check_stats(stats, x.shape[0])
        cached = reuse_first_prediction(predict, pred)
        x_new, sstate, (gstate, nfe) = solver.step(key, x, sstate, cached, (gstate, nfe), t, t_next)
        if corrector.cache_prediction:
            pred_new, stats_new, gstate, nfe = evaluate(x_new, t_next, gstate, nfe)
            log_inc, stats_new = corrector.increment(p.stats, stats_new, t, t_next)
        else:
            pred_new = stats_new = None
            log_inc, _ = corrector.increment(stats, None, t, t_next)
        s_per, s_run = _split(sstate, s_lay)
        g_per, g_run = _split(gstate, g_lay)
        new = CorrectedParticles(x_new, pred_new, stats_new, s_per, g_per)
        return new, log_inc, shared._replace(solver_state=s_run, guidance_state=g_run, nfe=nfe)

    move_fn = None
    if corrector.rejuvenation is not None:
        from feynkit.inference.smc.rejuvenation import rejuvenation_move

        def evaluate_at(p: CorrectedParticles, shared: CorrectedShared, x: Array, t: Array):
            # the guidance state is read, not advanced: rejuvenation is not a sampler step
            _, g_lay = layouts(p.x)
            gstate = _merge(p.guidance_state, shared.guidance_state, g_lay)
            pred, stats, _, nfe = evaluate(x, t, gstate, shared.nfe)
            return pred, stats, nfe

        move_fn = rejuvenation_move(
            corrector.rejuvenation, ts, schedule, evaluate_at, corrector.cache_prediction
        )

    kernel = base.build_kernel(
        propagate,
        corrector.resample_fn,
        corrector.ess_threshold,
        sharding,
        keep_ancestry=keep_ancestry,
        move_fn=move_fn,
    )

    def output(
        state: base.SMCState,
        info: base.SMCInfo,
        denoise_final: bool = False,
        trajectory: Array | None = None,
    ) -> tuple[Array, SampleInfo]:
        p, shared = state.particles, state.shared
        nfe = shared.nfe
        x = p.x
        if denoise_final:
            if p.pred is not None:
                x = p.pred.x0
            else:
                _, g_lay = layouts(x)
                gstate = _merge(p.guidance_state, shared.guidance_state, g_lay)
                pred, (_, nfe) = predict(x, ts[-1].astype(x.dtype), (gstate, nfe))
                x = pred.x0
        acceptance = None
        if corrector.rejuvenation is not None:
            acceptance = shared.accepted / jnp.maximum(shared.proposed, 1)
        return x, SampleInfo(
            nfe,
            trajectory,
            state.log_weights,
            state.log_normalizer,
            info.ess,
            info.resampled,
            info.ancestors if keep_ancestry else None,
            acceptance,
        )

    return CorrectedSampler(init, kernel, num_steps, output)


def corrected_sample(
    key: Key,
    solver: Solver,
    model_fn: Callable[..., Any],
    x_init: ArrayLike,
    timesteps: ArrayLike,
    corrector: Corrector,
    *,
    prediction: str = "eps",
    guidance: Guidance | None = None,
    cond: dict[str, Any] | None = None,
    uncond: dict[str, Any] | None = None,
    denoise_final: bool = False,
    return_trajectory: bool = False,
    batch_branches: bool = True,
    keep_ancestry: bool = False,
    log_weights: ArrayLike | None = None,
) -> tuple[Array, SampleInfo]:
    """`diffusion.sample` with a corrector (see there): init, `smc.run`, output.

    `log_weights` are optional importance log-weights of `x_init` (e.g. log π̃_T − log q).
    """
    loop = corrected_sampler(
        solver,
        model_fn,
        timesteps,
        corrector,
        prediction=prediction,
        guidance=guidance,
        cond=cond,
        uncond=uncond,
        batch_branches=batch_branches,
        keep_ancestry=keep_ancestry,
    )
    state = loop.init(x_init, log_weights)
    if not return_trajectory:
        state, info = base.run(key, loop.kernel, state, loop.num_steps)
        return loop.output(state, info, denoise_final)

    def body(s, _):  # `base.run` with the particles recorded
        s, info = loop.kernel(jax.random.fold_in(key, s.step), s)
        return s, (info, s.particles.x)

    x0 = state.particles.x
    state, (info, traj) = jax.lax.scan(body, state, None, length=loop.num_steps)
    return loop.output(state, info, denoise_final, jnp.concatenate([x0[None], traj]))
