"""Input checks shared by samplers and particle methods; each raises a ValueError that names
the argument and says what to pass instead."""

from __future__ import annotations

import jax.numpy as jnp

from feynkit.core.types import Array, ArrayLike

__all__ = ["check_reward_shape", "check_time_grid"]


def check_time_grid(
    timesteps: ArrayLike, dtype=None, *, min_times: int = 2, name: str = "timesteps"
) -> Array:
    """`timesteps` as an array (of `dtype` if given) after checking it is a 1-D grid of at
    least `min_times` times (a solver step needs a start and an end time)."""
    ts = jnp.asarray(timesteps) if dtype is None else jnp.asarray(timesteps, dtype)
    if ts.ndim != 1 or ts.shape[0] < min_times:
        raise ValueError(
            f"{name} must be a 1-D grid of ≥ {min_times} times, got shape {ts.shape}; "
            "build one with diffusion.time_grid(num_steps, ...)."
        )
    return ts


def check_reward_shape(rewards: ArrayLike, n: int, *, name: str = "reward_fn") -> Array:
    """`rewards` as an array after checking it holds one scalar per particle, shape (n,)."""
    r = jnp.asarray(rewards)
    if r.shape != (n,):
        raise ValueError(
            f"{name} must return shape ({n},), one reward per sample, got {r.shape}; reduce "
            "any event dimensions inside it."
        )
    return r
