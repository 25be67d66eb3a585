"""Tempered SMC: from a prior π₀ to π₀ L through π_β ∝ π₀ L^β, fixed or adaptive schedule.

One step of `smc.base`'s kernel, with β carried in the state's ``shared``:

    move every particle with a π_β-invariant MCMC kernel (`moves`), then
    β' = next temperature,   log w_i += (β' − β) log L(x_i),   resample if ESS < τ n,

so log Ẑ = Σ_t log Σ_i W_i L(x_i)^{β_{t+1} − β_t} estimates log Z = log ∫ π₀ L. The move at β
before the reweighting keeps the weighted approximation of π_β (an invariant kernel leaves
E_W[f] unchanged), so resampling and moving need not coincide.

Adaptive tempering chooses β' by bisection (`core.bisect`, inside `jit`) so that the
conditional ESS of the increments, n (Σ W v)² / Σ W v² with v = L^{β'−β}, equals
``target_ess · n`` (Zhou, Johansen & Aston 2016; Jasra et al. 2011); the weights W are carried
in ``shared`` next to β, so any resampling threshold works. It runs in a `lax.while_loop` until
β = 1 (at most `max_steps` steps), so a `vmap` over seeds stops when the last run ends.

References:
  Neal (2001), "Annealed importance sampling"; Del Moral, Doucet & Jasra (2006), "Sequential
  Monte Carlo samplers"; Jasra, Stephens, Doucet & Tsagaris (2011), "Inference for Lévy-driven
  stochastic volatility models via adaptive sequential Monte Carlo"; Zhou, Johansen & Aston
  (2016), "Toward automatic model comparison: an adaptive sequential Monte Carlo approach".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from feynkit.core import bisect, conditional_ess, systematic_resample
from feynkit.core.types import Array, ArrayLike, Key
from feynkit.inference.smc import base, moves

__all__ = ["TemperedShared", "next_temperature", "tempered_kernel", "tempered_smc"]

LogDensity = Callable[[Array], Array]


class TemperedShared(NamedTuple):
    """beta: current temperature; log_weights: the kernel's normalised weights (for the
    conditional ESS); acceptance: mean acceptance rate of the latest move."""

    beta: Array
    log_weights: Array
    acceptance: Array


def next_temperature(
    beta: Array, log_weights: Array, loglik: Array, target_ess: float | Array
) -> Array:
    """β' ∈ (β, 1] with conditional ESS of L^{β'−β} equal to target_ess · n (1 if it stays above).

    The conditional ESS decreases in the increment, so a bisection of 40 halvings on [0, 1 − β]
    brackets the root to ~1e-12; runs under `jit` and `vmap`."""
    n = loglik.shape[0]
    loglik = jnp.where(jnp.isnan(loglik), -jnp.inf, loglik)

    def gap(delta):
        return conditional_ess(log_weights, delta * loglik) - target_ess * n

    room = 1.0 - beta
    delta = bisect(gap, jnp.zeros_like(beta), room, increasing=False, iterations=40)
    return jnp.where(gap(room) >= 0, 1.0, jnp.minimum(beta + delta, 1.0))


def _check(target_ess, num_mcmc_steps, betas):
    if not isinstance(num_mcmc_steps, int) or num_mcmc_steps < 1:
        raise ValueError(f"num_mcmc_steps must be an integer ≥ 1, got {num_mcmc_steps!r}.")
    if betas is None:
        if isinstance(target_ess, int | float) and not 0.0 < target_ess < 1.0:
            raise ValueError(f"target_ess must be in (0, 1), got {target_ess}.")
        return None
    b = np.asarray(betas, np.float64)
    if b.ndim != 1 or b.size < 2 or b[0] != 0.0 or b[-1] != 1.0 or np.any(np.diff(b) <= 0):
        raise ValueError(
            "betas must be a strictly increasing vector from 0 to 1 (e.g. jnp.linspace(0, 1, 20))"
            f", got {b!r}."
        )
    return jnp.asarray(b, jnp.result_type(float))


def tempered_kernel(
    logprior: LogDensity,
    loglik: LogDensity,
    move: moves.Move,
    *,
    betas: ArrayLike | None = None,
    target_ess: float | Array = 0.5,
    num_mcmc_steps: int = 1,
    resample_fn: Callable[..., Array] = systematic_resample,
    ess_threshold: float | Array = 0.5,
    init_fn: Callable = moves.init,
):
    """The `smc.base` kernel of tempered SMC (per-particle `logprior`, `loglik`: x -> scalar).

    With `betas` (0 = β₀ < … < β_T = 1) step t moves at β_t and reweights to β_{t+1}; without,
    β' is chosen adaptively (`next_temperature`). `move` is a per-particle kernel of `moves` (or
    BlackJAX's, with its `init_fn`)."""
    betas = _check(target_ess, num_mcmc_steps, betas)
    ll_batch = jax.vmap(loglik)

    def propagate(key, x, step, shared):
        beta = shared.beta

        def logdensity(y):
            return logprior(y) + beta * loglik(y)

        x, acc = moves.mutate(key, move, x, logdensity, num_mcmc_steps, init_fn)
        ll = ll_batch(x)
        if betas is None:
            new_beta = next_temperature(beta, shared.log_weights, ll, target_ess)
        else:
            new_beta = betas[jnp.minimum(step + 1, betas.shape[0] - 1)]
        inc = jnp.where(new_beta > beta, (new_beta - beta) * ll, 0.0)
        return x, inc, TemperedShared(new_beta, shared.log_weights, acc)

    inner = base.build_kernel(propagate, resample_fn, ess_threshold)

    def kernel(key, state):
        new, info = inner(key, state)
        # the weights after this step feed the next conditional ESS
        return new._replace(shared=new.shared._replace(log_weights=new.log_weights)), info

    return kernel


def tempered_smc(
    key: Key,
    particles: Array,
    logprior: LogDensity,
    loglik: LogDensity,
    move: moves.Move,
    *,
    betas: ArrayLike | None = None,
    target_ess: float | Array = 0.5,
    num_mcmc_steps: int = 1,
    resample_fn: Callable[..., Array] = systematic_resample,
    ess_threshold: float | Array = 0.5,
    max_steps: int = 1000,
    init_fn: Callable = moves.init,
) -> tuple[base.SMCState, Array]:
    """Run tempered SMC from prior draws `particles` (n, d) to β = 1.

    Returns `(state, num_steps)`: ``state.log_normalizer`` estimates log ∫ π₀ L,
    ``state.shared.beta`` is 1 unless `max_steps` ran out (then < 1: check it), and the
    particles with ``state.log_weights`` approximate π₀ L / Z. A fixed schedule runs its
    len(betas) − 1 steps in a `lax.scan`; the adaptive one a `lax.while_loop`."""
    kernel = tempered_kernel(
        logprior,
        loglik,
        move,
        betas=betas,
        target_ess=target_ess,
        num_mcmc_steps=num_mcmc_steps,
        resample_fn=resample_fn,
        ess_threshold=ess_threshold,
        init_fn=init_fn,
    )
    n = particles.shape[0]
    dtype = jnp.result_type(particles.dtype, float)
    shared = TemperedShared(
        jnp.zeros((), dtype), jnp.full((n,), -jnp.log(n), dtype), jnp.zeros((), dtype)
    )
    state = base.init(particles, shared=shared)
    if betas is not None:
        state, _ = base.run(key, kernel, state, len(np.asarray(betas)) - 1)
        return state, state.step
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be an integer ≥ 1, got {max_steps!r}.")

    def cond(s):
        return (s.shared.beta < 1.0) & (s.step < max_steps)

    def body(s):
        return kernel(jax.random.fold_in(key, s.step), s)[0]

    state = jax.lax.while_loop(cond, body, state)
    return state, state.step
