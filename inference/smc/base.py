"""A generic Feynman–Kac / SMC sampler as an (init, kernel) pair.

One step of the kernel is mutate → reweight → adaptive resample:

    x_i' ~ M_t(x_i, ·),   log w_i += G_t(x_i, x_i'),
    log Ẑ += log Σ_i W_i exp(G_t,i),   resample if ESS < threshold · n.

`propagate_fn(key, particles, step) -> (particles, log_increments)` supplies both the move and the
log potential; the kernel owns the weights, the normaliser estimate and resampling, so every
particle method (FK correctors, steering, tempering) shares this one loop. A state may carry a
per-run ``shared`` pytree (an evaluation count, a guidance switch) that is threaded through
the steps once instead of being copied into every particle, and the kernel may apply an MCMC
``move_fn`` after each resampling (resample-move; Gilks & Berzuini 2001).

References:
  Del Moral (2004), "Feynman-Kac Formulae"; Chopin & Papaspiliopoulos (2020), "An Introduction
  to Sequential Monte Carlo", ch. 10 (the generic particle filter with adaptive resampling);
  Gilks & Berzuini (2001), "Following a moving target — Monte Carlo inference for dynamic
  Bayesian models" (resample-move).
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from feynkit.core import (
    adaptive_resample,
    check_log_weights,
    checkpointed_loop,
    ess,
    log_mean_exp,
    log_weights_ok,
    normalize_log_weights,
    systematic_resample,
)
from feynkit.core.types import Array, ArrayLike, Key, PyTree

__all__ = ["SMCInfo", "SMCState", "build_kernel", "init", "run", "run_checkpointed"]

PropagateFn = Callable[[Key, PyTree, Array], tuple[PyTree, Array]]


class SMCState(NamedTuple):
    """particles: pytree with leading axis n; log_weights: normalised, shape (n,);
    log_normalizer: running estimate of log Z_t; step: number of kernel steps taken;
    shared: per-run state threaded through the steps, not resampled (None: none)."""

    particles: PyTree
    log_weights: Array
    log_normalizer: Array
    step: Array
    shared: PyTree = None


class SMCInfo(NamedTuple):
    """Diagnostics of one step: ESS after reweighting (before resampling), the increment of
    log Ẑ, whether it resampled, the ancestor indices (identity when it did not; None when
    the kernel was built with ``keep_ancestry=False``), and ``weights_ok``: False when the
    weights broke down this step (a NaN, or every particle at zero weight) — the step then
    does not resample and the weights stay invalid; `run_checkpointed` raises on it, and a
    caller of `run` should check ``info.weights_ok.all()``."""

    ess: Array
    log_normalizer_increment: Array
    resampled: Array
    ancestors: Array | None = None
    weights_ok: Array | None = None


def _num_particles(particles: PyTree) -> int:
    leaves = jax.tree.leaves(particles)
    if not leaves:
        raise ValueError("particles must be a pytree with at least one array leaf.")
    n = leaves[0].shape[0]
    for leaf in leaves:
        if leaf.ndim == 0 or leaf.shape[0] != n:
            raise ValueError(
                f"every particle leaf needs leading axis n={n}; got a leaf of shape {leaf.shape}."
            )
    return n


def init(
    particles: PyTree, log_weights: ArrayLike | None = None, shared: PyTree = None
) -> SMCState:
    """Initial state from particles drawn from a proposal and their importance log-weights.

    With log-weights l_i = log π̃₀(x_i) − log q(x_i), log Ẑ₀ = log (1/n) Σ exp l_i estimates
    log ∫ π̃₀; without them the particles are taken as exact draws (log Ẑ₀ = 0). `shared` is
    per-run state for a `propagate_fn` that takes it (see `build_kernel`).
    """
    n = _num_particles(particles)
    if log_weights is None:
        log_weights = jnp.zeros((n,), jnp.result_type(float))
    log_weights = jnp.asarray(log_weights)
    if log_weights.shape != (n,):
        raise ValueError(
            f"log_weights must have shape ({n},) to match the particles, got {log_weights.shape}."
        )
    return SMCState(
        particles,
        normalize_log_weights(log_weights),
        log_mean_exp(log_weights),
        jnp.asarray(0, jnp.int32),
        shared,
    )


def build_kernel(
    propagate_fn: PropagateFn,
    resample_fn: Callable[..., Array] = systematic_resample,
    ess_threshold: float | Array = 0.5,
    sharding: jax.sharding.Sharding | None = None,
    *,
    keep_ancestry: bool = True,
    move_fn: Callable[..., tuple[PyTree, PyTree]] | None = None,
) -> Callable[[Key, SMCState], tuple[SMCState, SMCInfo]]:
    """The SMC transition `kernel(key, state) -> (state, info)`.

    Args:
      propagate_fn: `(key, particles, step) -> (new_particles, log_increments)`; for a state
        whose ``shared`` is not None, `(key, particles, step, shared) -> (new_particles,
        log_increments, shared)`.
      resample_fn: resampling scheme (`feynkit.core` signature).
      ess_threshold: resample when ESS < ess_threshold · n; 0 never resamples (importance
        sampling), 1 resamples at every step with non-uniform weights. May be a traced scalar.
      sharding: if given, particles are constrained to it after each step (keeps them split
        over a device mesh after resampling gathers).
      keep_ancestry: put each step's ancestor indices in `SMCInfo.ancestors` (n integers per
        step, stacked over a run: at 1e6 particles × 500 steps, 2 GB); False leaves it None.
      move_fn: `(key, particles, step, shared) -> (particles, shared)`, an MCMC move that
        leaves the current target invariant, applied after the steps that resampled (at the
        new step count); `shared` is None for states without one.
    """
    if isinstance(ess_threshold, int | float) and not 0.0 <= ess_threshold <= 1.0:
        raise ValueError(f"ess_threshold must be in [0, 1], got {ess_threshold}.")

    def kernel(key: Key, state: SMCState) -> tuple[SMCState, SMCInfo]:
        k_move, k_resample = jax.random.split(key)
        shared = state.shared
        if shared is None:
            particles, log_inc = propagate_fn(k_move, state.particles, state.step)
        else:
            particles, log_inc, shared = propagate_fn(k_move, state.particles, state.step, shared)
        log_inc = jnp.asarray(log_inc, state.log_weights.dtype)
        unnorm = state.log_weights + log_inc
        increment = logsumexp(unnorm)  # log Σ W_i exp(G_i), W normalised (+inf if any G = +inf)
        log_weights = normalize_log_weights(unnorm)  # +inf entries share the mass, not NaN
        step_ess = ess(log_weights)
        particles, log_weights, ancestors, resampled = adaptive_resample(
            k_resample, particles, log_weights, resample_fn, ess_threshold
        )
        if move_fn is not None:
            k_mcmc = jax.random.fold_in(key, 2)  # leaves the move and resampling keys as they are
            particles, shared = jax.lax.cond(
                resampled,
                lambda ps: move_fn(k_mcmc, ps[0], state.step + 1, ps[1]),
                lambda ps: ps,
                (particles, shared),
            )
        if sharding is not None:
            particles = jax.lax.with_sharding_constraint(particles, sharding)
        new_state = SMCState(
            particles, log_weights, state.log_normalizer + increment, state.step + 1, shared
        )
        info = SMCInfo(
            step_ess,
            increment,
            resampled,
            ancestors if keep_ancestry else None,
            log_weights_ok(log_weights),
        )
        return new_state, info

    return kernel


def run(
    key: Key,
    kernel: Callable[[Key, SMCState], tuple[SMCState, SMCInfo]],
    state: SMCState,
    num_steps: int,
) -> tuple[SMCState, SMCInfo]:
    """Apply `kernel` `num_steps` times in one `lax.scan`; step k uses `fold_in(key, k)`.

    Keys depend on the absolute step count held in the state, so a run split into pieces (or
    resumed from a checkpoint) draws exactly the numbers of an uninterrupted one.
    """

    def body(s, _):
        return kernel(jax.random.fold_in(key, s.step), s)

    return jax.lax.scan(body, state, None, length=num_steps)


def run_checkpointed(
    key: Key,
    kernel: Callable[[Key, SMCState], tuple[SMCState, SMCInfo]],
    state: SMCState,
    num_steps: int,
    directory: str | None = None,
    every: int = 100,
    progress: bool = False,
) -> tuple[SMCState, list[SMCInfo]]:
    """`run` in jitted chunks of `every` steps with an Orbax checkpoint after each chunk.

    Restarted with the same arguments it resumes from the newest checkpoint in `directory` and
    ends with the same numbers as an uninterrupted run. Between chunks the weights are checked
    on the host: all −inf/NaN weights raise a `ValueError` naming the step.
    """
    chunk = jax.jit(lambda s, length: run(key, kernel, s, length), static_argnums=1)

    def validate(s, _):
        try:
            check_log_weights(s.log_weights)
        except ValueError as err:
            raise ValueError(f"SMC weights broke down by step {int(s.step)}: {err}") from None

    return checkpointed_loop(
        chunk, state, num_steps, lambda s: s.step, directory, every, validate, progress
    )
