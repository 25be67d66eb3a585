"""Input checks shared by samplers and particle methods; each raises a ValueError that names
the argument and says what to pass instead."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from feynkit.core.types import Array, ArrayLike

__all__ = ["check_finite", "check_reward_shape", "check_time_grid", "fail_if"]


def _raise_on_host(message: str, bad: np.ndarray) -> None:
    if bool(np.any(bad)):
        raise ValueError(message)


def fail_if(bad: ArrayLike, message: str) -> None:
    """Raise ``ValueError(message)`` when any entry of the boolean ``bad`` is true.

    Concrete ``bad``: raised here, at once. Traced ``bad`` (inside ``jit``, ``vmap``, ``scan``):
    a ``jax.debug.callback`` raises the same ValueError on the host when the compiled code runs,
    and XLA stops the computation with a ``JaxRuntimeError`` whose text carries ``message`` —
    a data-dependent check that holds under ``jit`` without ``checkify`` at the call site. One
    host callback per call: use it at public entry points, not inside long loops.
    """
    if isinstance(bad, jax.core.Tracer):
        jax.debug.callback(functools.partial(_raise_on_host, message), jnp.any(bad))
    elif bool(jnp.any(jnp.asarray(bad))):
        raise ValueError(message)


def check_finite(x: ArrayLike, name: str, hint: str = "") -> None:
    """`fail_if` some entry of ``x`` is NaN or ±inf, naming ``name`` (also under ``jit``)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return
    msg = f"{name} contains NaN or Inf; {hint or 'pass finite values'}."
    fail_if(~jnp.all(jnp.isfinite(x)), msg)


def check_time_grid(
    timesteps: ArrayLike,
    dtype=None,
    *,
    min_times: int = 2,
    name: str = "timesteps",
    decreasing: bool = False,
    monotonic: bool = False,
    domain: tuple[float, float] | None = None,
) -> Array:
    """`timesteps` as an array (of `dtype` if given) after checking it is a 1-D grid of at
    least `min_times` times (a solver step needs a start and an end time).

    With ``decreasing`` the times must fall strictly (noise to data), with ``monotonic`` fall or
    rise strictly (a rising grid inverts a deterministic sampler, data to noise), and with
    ``domain`` lie in [lo, hi] and be finite. Those are data checks: raised at once for a concrete grid and, for a
    grid traced under ``jit``, when the compiled code runs (`fail_if`).
    """
    ts = jnp.asarray(timesteps) if dtype is None else jnp.asarray(timesteps, dtype)
    if ts.ndim != 1 or ts.shape[0] < min_times:
        raise ValueError(
            f"{name} must be a 1-D grid of ≥ {min_times} times, got shape {ts.shape}; "
            "build one with diffusion.time_grid(num_steps, ...)."
        )
    if domain is not None:
        lo, hi = domain
        fail_if(
            ~jnp.all(jnp.isfinite(ts) & (ts >= lo) & (ts <= hi)),
            f"{name} must lie in the schedule's time domain [{lo}, {hi}] (t = 0 data, t = 1 "
            f"noise); got times outside it. Build the grid with diffusion.time_grid(num_steps, "
            "t_max, t_min).",
        )
    if decreasing:
        fail_if(
            ~jnp.all(ts[1:] < ts[:-1]),
            f"{name} must decrease strictly, from t_max (noise) to t_min (data); got a grid "
            "that does not (reverse an increasing grid with timesteps[::-1]; only a "
            "deterministic solver, e.g. ddim(eta=0), runs an increasing grid, as an inversion).",
        )
    if monotonic:
        fail_if(
            ~(jnp.all(ts[1:] < ts[:-1]) | jnp.all(ts[1:] > ts[:-1])),
            f"{name} must be strictly monotonic: decreasing to sample (noise to data), "
            "increasing to invert (data to noise); got a grid that goes both ways or repeats "
            "a time.",
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
