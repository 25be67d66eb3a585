"""MCMC moves: random walk, MALA, HMC as `(key, state, logdensity) -> (state, info)`.

Each kernel moves one particle and leaves π ∝ exp(logdensity) invariant; `vmap_move` maps it
over a particle array (leading axis n) and reports the acceptance rate. The state and info
follow BlackJAX's layout (`position`, `logdensity`, `logdensity_grad`; `acceptance_rate`,
`is_accepted`), so a BlackJAX kernel with its step size bound — e.g.
``functools.partial(blackjax.mala.build_kernel(), step_size=0.1)`` with ``blackjax.mala.init``
— is accepted by `vmap_move` and `mutate` as it is.

Proposals (d = dimension, h = step size, z ~ N(0, I)):

- random walk: x' = x + h z, accepted with min(1, π(x')/π(x));
- MALA: x' = x + h ∇log π(x) + sqrt(2h) z, with the Hastings ratio of the Gaussian proposal
  (`mala_log_proposal_ratio`, shared with `smc.rejuvenation`);
- HMC: p ~ N(0, I), L leapfrog steps of size h on H = −log π(x) + |p|²/2, accepted with
  min(1, exp(−ΔH)).

References:
  Metropolis et al. (1953); Roberts & Tweedie (1996), "Exponential convergence of Langevin
  distributions and their discrete approximations" (MALA); Neal (2011), "MCMC using Hamiltonian
  dynamics" (HMC); Cabezas et al. (2024), "BlackJAX: composable Bayesian inference in JAX".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from feynkit.core.types import Array, Key

__all__ = [
    "MoveInfo",
    "MoveState",
    "hmc",
    "init",
    "mala",
    "mala_log_proposal_ratio",
    "mutate",
    "random_walk",
    "vmap_move",
]

LogDensity = Callable[[Array], Array]
Move = Callable[[Key, Any, LogDensity], tuple[Any, Any]]


class MoveState(NamedTuple):
    """One particle: its position, log π(position) and ∇ log π(position)."""

    position: Array
    logdensity: Array
    logdensity_grad: Array


class MoveInfo(NamedTuple):
    """acceptance_rate: the Metropolis–Hastings acceptance probability of the proposal;
    is_accepted: whether it was accepted."""

    acceptance_rate: Array
    is_accepted: Array


def init(position: Array, logdensity: LogDensity) -> MoveState:
    """The move state of one particle."""
    value, grad = jax.value_and_grad(logdensity)(position)
    return MoveState(position, value, grad)


def _check_step(step_size) -> None:
    if isinstance(step_size, int | float) and not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}.")


def _accept(key, log_ratio, proposal, state):
    log_ratio = jnp.where(jnp.isnan(log_ratio), -jnp.inf, log_ratio)
    prob = jnp.minimum(1.0, jnp.exp(log_ratio))
    accepted = jax.random.uniform(key, (), prob.dtype) < prob
    new = jax.tree.map(lambda a, b: jnp.where(accepted, a, b), proposal, state)
    return new, MoveInfo(prob, accepted)


def random_walk(step_size: float | Array) -> Move:
    """Gaussian random-walk Metropolis with proposal scale `step_size`."""
    _check_step(step_size)

    def kernel(key: Key, state: MoveState, logdensity: LogDensity) -> tuple[MoveState, MoveInfo]:
        k_z, k_u = jax.random.split(key)
        x = state.position
        prop = init(x + step_size * jax.random.normal(k_z, x.shape, x.dtype), logdensity)
        return _accept(k_u, prop.logdensity - state.logdensity, prop, state)

    return kernel


def mala_log_proposal_ratio(
    x: Array,
    x_prop: Array,
    grad_x: Array,
    grad_prop: Array,
    step_size: Array,
    batched: bool = False,
) -> Array:
    """log q(x | x') − log q(x' | x) for q(x' | x) = N(x'; x + h ∇(x), 2h I).

    Arrays of equal shape: one particle (summed over all axes), or with `batched` a leading
    particle axis n (summed over the others, result shape (n,))."""

    def sq(v):
        return jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=1) if batched else jnp.sum(v**2)

    fwd = x_prop - x - step_size * grad_x
    back = x - x_prop - step_size * grad_prop
    return (sq(fwd) - sq(back)) / (4.0 * step_size)


def mala(step_size: float | Array) -> Move:
    """Metropolis-adjusted Langevin with step size h: x' = x + h ∇log π + sqrt(2h) z."""
    _check_step(step_size)

    def kernel(key: Key, state: MoveState, logdensity: LogDensity) -> tuple[MoveState, MoveInfo]:
        k_z, k_u = jax.random.split(key)
        x = state.position
        z = jax.random.normal(k_z, x.shape, x.dtype)
        prop = init(
            x + step_size * state.logdensity_grad + jnp.sqrt(2.0 * step_size) * z, logdensity
        )
        log_q = mala_log_proposal_ratio(
            x, prop.position, state.logdensity_grad, prop.logdensity_grad, step_size
        )
        return _accept(k_u, prop.logdensity - state.logdensity + log_q, prop, state)

    return kernel


def hmc(step_size: float | Array, num_leapfrog: int) -> Move:
    """Hamiltonian Monte Carlo with identity mass and `num_leapfrog` leapfrog steps of size h."""
    _check_step(step_size)
    if not isinstance(num_leapfrog, int) or num_leapfrog < 1:
        raise ValueError(f"num_leapfrog must be an integer ≥ 1, got {num_leapfrog!r}.")

    def kernel(key: Key, state: MoveState, logdensity: LogDensity) -> tuple[MoveState, MoveInfo]:
        k_p, k_u = jax.random.split(key)
        x = state.position
        p0 = jax.random.normal(k_p, x.shape, x.dtype)

        def leap(_, carry):
            s, p = carry
            p = p + 0.5 * step_size * s.logdensity_grad
            s = init(s.position + step_size * p, logdensity)
            return s, p + 0.5 * step_size * s.logdensity_grad

        prop, p = jax.lax.fori_loop(0, num_leapfrog, leap, (state, p0))
        log_ratio = prop.logdensity - state.logdensity - 0.5 * (jnp.sum(p**2) - jnp.sum(p0**2))
        return _accept(k_u, log_ratio, prop, state)

    return kernel


def vmap_move(move: Move) -> Callable[[Key, Any, LogDensity], tuple[Any, Any]]:
    """`move` over a batch of states (leading axis n), one key per particle."""

    def batched(key: Key, states: Any, logdensity: LogDensity) -> tuple[Any, Any]:
        n = jax.tree.leaves(states)[0].shape[0]
        keys = jax.random.split(key, n)
        return jax.vmap(move, in_axes=(0, 0, None))(keys, states, logdensity)

    return batched


def mutate(
    key: Key,
    move: Move,
    positions: Array,
    logdensity: LogDensity,
    num_steps: int = 1,
    init_fn: Callable[[Array, LogDensity], Any] = init,
) -> tuple[Array, Array]:
    """`num_steps` applications of `move` to every particle; returns (positions, mean
    acceptance rate over particles and steps).

    Args:
      key: PRNG key.
      move: a per-particle kernel `(key, state, logdensity) -> (state, info)` (this module's or
        BlackJAX's, whose info has ``acceptance_rate``).
      positions: array of shape (n, ...).
      logdensity: log π of one particle, up to a constant.
      num_steps: ≥ 1 moves per particle.
      init_fn: `(position, logdensity) -> state` for one particle (this module's `init`, or
        BlackJAX's ``blackjax.mala.init`` etc.).
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer ≥ 1, got {num_steps!r}.")
    states = jax.vmap(init_fn, in_axes=(0, None))(positions, logdensity)
    batched = vmap_move(move)

    def body(carry, k):
        s, acc = carry
        s, info = batched(k, s, logdensity)
        return (s, acc + jnp.mean(info.acceptance_rate)), None

    (states, acc), _ = jax.lax.scan(
        body, (states, jnp.zeros((), positions.dtype)), jax.random.split(key, num_steps)
    )
    return states.position, acc / num_steps
