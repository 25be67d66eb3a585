"""Numerical building blocks shared by samplers, schedules and calibration: bisection."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from feynkit.core.types import Array, ArrayLike

__all__ = ["bisect"]


def bisect(
    fn: Callable[[Array], Array],
    lo: ArrayLike,
    hi: ArrayLike,
    *,
    increasing: bool = True,
    iterations: int = 60,
) -> Array:
    """Elementwise root of a monotone `fn` on [lo, hi] by bisection, in one `lax.fori_loop`.

        each step: m = (lo + hi)/2;  lo ← m if fn(m) is on lo's side of 0, else hi ← m,

    where lo's side is fn < 0 for an increasing `fn` and fn > 0 for a decreasing one. After k
    steps the root is bracketed to (hi − lo)/2^k; the midpoint is returned. A root outside
    [lo, hi] gives the nearer end. `lo` and `hi` broadcast against each other, and `fn` maps
    an array of their broadcast shape to one of the same shape (one independent root per
    element), so ``fn`` may be vectorised over a batch of targets. jit- and vmap-compatible;
    `increasing` and `iterations` are static.

    Args:
      fn: monotone in each element of its argument.
      lo, hi: the bracket ends, lo < hi.
      increasing: whether `fn` increases (True) or decreases (False).
      iterations: halvings of the bracket (60 reach float64 resolution on [0, 1]).

    Returns:
      The bracket midpoints after `iterations` steps, of the broadcast shape of lo and hi.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be ≥ 1, got {iterations}.")
    dtype = jnp.result_type(lo, hi, float)
    lo, hi = jnp.broadcast_arrays(jnp.asarray(lo, dtype), jnp.asarray(hi, dtype))
    # Scalar brackets serve a vectorised fn: widen them to the shape fn returns.
    shape = jnp.broadcast_shapes(lo.shape, jax.eval_shape(fn, lo).shape)
    lo, hi = jnp.broadcast_to(lo, shape), jnp.broadcast_to(hi, shape)
    if jax.eval_shape(fn, lo).shape != shape:
        raise ValueError(
            f"fn must map an array of shape {shape} to one of the same shape (one root per "
            f"element), got {jax.eval_shape(fn, lo).shape}."
        )

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        right = fn(mid) < 0 if increasing else fn(mid) > 0  # the root lies above mid
        return jnp.where(right, mid, lo), jnp.where(right, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iterations, body, (lo, hi))
    return 0.5 * (lo + hi)
