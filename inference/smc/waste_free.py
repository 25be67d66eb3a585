"""Waste-free tempered SMC (Dau & Chopin 2022): resample M ≪ N, run M chains of length P = N/M,
keep every state.

Standard SMC resamples N particles and moves each k times, keeping only the last state: N·k
kernel evaluations for N particles. Waste-free SMC resamples only M ancestors and runs a
π_t-invariant chain of length P from each, keeping all M·P = N states (the start included) as
the new, equally weighted particles: N − M evaluations per step. With uniform weights the
step's log-normaliser increment is the plain average over the N states,

    log Ẑ_t − log Ẑ_{t−1} = log (1/N) Σ_{n} L(x_n)^{β_t − β_{t−1}},

and the ancestors of the next chains are drawn from those N weights. The estimator is
consistent as P → ∞ or M → ∞ (Dau & Chopin 2022, Prop. 1 and §3.3), and the chains explore
further than N short moves, which pays on multimodal targets.

It runs on `smc.base`'s kernel: the propagate function reweights, resamples M and runs the
chains itself, returning the same increment for every particle, so the kernel's weights stay
uniform and its own resampling (threshold 0) never fires; β is carried in ``shared``.

References:
  Dau & Chopin (2022), "Waste-free sequential Monte Carlo", JRSS B 84(1), Algorithm 2.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from feynkit.core import multinomial_resample
from feynkit.core.types import Array, ArrayLike, Key
from feynkit.inference.smc import base, moves
from feynkit.inference.smc.tempered import TemperedShared, _check, next_temperature

__all__ = ["waste_free_kernel", "waste_free_smc"]

LogDensity = Callable[[Array], Array]


def _chains(key, move, starts, logdensity, length, init_fn):
    """M chains of `length` states from `starts` (M, d): all states, shape (M·length, d)."""
    states = jax.vmap(init_fn, in_axes=(0, None))(starts, logdensity)
    batched = moves.vmap_move(move)

    def body(s, k):
        s, info = batched(k, s, logdensity)
        return s, (s.position, jnp.mean(info.acceptance_rate))

    _, (path, acc) = jax.lax.scan(body, states, jax.random.split(key, length - 1))
    allx = jnp.concatenate([starts[None], path], axis=0)  # (P, M, d)
    return jnp.swapaxes(allx, 0, 1).reshape((-1,) + starts.shape[1:]), jnp.mean(acc)


def waste_free_kernel(
    logprior: LogDensity,
    loglik: LogDensity,
    move: moves.Move,
    num_resampled: int,
    num_particles: int,
    *,
    betas: ArrayLike | None = None,
    target_ess: float | Array = 0.5,
    resample_fn: Callable[..., Array] = multinomial_resample,
    init_fn: Callable = moves.init,
):
    """The `smc.base` kernel of waste-free tempered SMC (N = `num_particles`, M =
    `num_resampled`, P = N / M ≥ 2)."""
    _check(target_ess, 1, betas)
    betas = None if betas is None else jnp.asarray(np.asarray(betas, np.float64), float)
    if not isinstance(num_resampled, int) or num_resampled < 1:
        raise ValueError(f"num_resampled must be an integer ≥ 1, got {num_resampled!r}.")
    if num_particles % num_resampled or num_particles // num_resampled < 2:
        raise ValueError(
            f"num_particles ({num_particles}) must be a multiple ≥ 2× of num_resampled "
            f"({num_resampled}): the chain length is P = N / M."
        )
    length = num_particles // num_resampled
    ll_batch = jax.vmap(loglik)

    def propagate(key, x, step, shared):
        beta = shared.beta
        ll = ll_batch(x)
        if betas is None:
            new_beta = next_temperature(beta, shared.log_weights, ll, target_ess)
        else:
            new_beta = betas[jnp.minimum(step + 1, betas.shape[0] - 1)]
        g = jnp.where(new_beta > beta, (new_beta - beta) * ll, 0.0)
        increment = logsumexp(g) - jnp.log(g.shape[0])
        k_res, k_mcmc = jax.random.split(key)
        starts = x[resample_fn(k_res, g, num_resampled)]

        def logdensity(y):
            return logprior(y) + new_beta * loglik(y)

        x, acc = _chains(k_mcmc, move, starts, logdensity, length, init_fn)
        inc = jnp.full((x.shape[0],), increment)  # equal weights: the step's log mean weight
        return x, inc, TemperedShared(new_beta, shared.log_weights, acc)

    return base.build_kernel(propagate, ess_threshold=0.0)


def waste_free_smc(
    key: Key,
    particles: Array,
    logprior: LogDensity,
    loglik: LogDensity,
    move: moves.Move,
    num_resampled: int,
    *,
    betas: ArrayLike | None = None,
    target_ess: float | Array = 0.5,
    resample_fn: Callable[..., Array] = multinomial_resample,
    max_steps: int = 1000,
    init_fn: Callable = moves.init,
) -> tuple[base.SMCState, Array]:
    """Run waste-free tempered SMC from N prior draws `particles` (N, d) to β = 1.

    Returns `(state, num_steps)` as `tempered.tempered_smc` does; the final N particles are
    equally weighted draws (correlated along each chain) from π₀ L / Z. The first step's chains
    start from M of the prior draws, as in Dau & Chopin's Algorithm 2."""
    n = particles.shape[0]
    kernel = waste_free_kernel(
        logprior,
        loglik,
        move,
        num_resampled,
        n,
        betas=betas,
        target_ess=target_ess,
        resample_fn=resample_fn,
        init_fn=init_fn,
    )
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

    state = jax.lax.while_loop(cond, lambda s: kernel(jax.random.fold_in(key, s.step), s)[0], state)
    return state, state.step
