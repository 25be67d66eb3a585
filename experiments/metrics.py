"""Sample-quality metrics against reference samples; weighted particles are supported."""

import jax
import jax.numpy as jnp

from feynkit.core.types import Array, ArrayLike

__all__ = ["energy_distance", "mode_weights"]


def _mean_pairwise_distance(x: Array, wx: Array, y: Array, wy: Array, block: int = 2048) -> Array:
    """Σ_ij wx_i wy_j ‖x_i − y_j‖, computed in row blocks to bound memory."""
    n = x.shape[0]
    pad = (-n) % block
    xp = jnp.pad(x, ((0, pad), (0, 0)))
    wp = jnp.pad(wx, (0, pad))

    def body(acc, xs):
        xb, wb = xs
        d = jnp.sqrt(jnp.maximum(jnp.sum((xb[:, None, :] - y[None, :, :]) ** 2, -1), 0.0))
        return acc + jnp.einsum("i,ij,j->", wb, d, wy), None

    out, _ = jax.lax.scan(
        body, jnp.zeros((), x.dtype), (xp.reshape(-1, block, x.shape[1]), wp.reshape(-1, block))
    )
    return out


def energy_distance(
    x: ArrayLike,
    y: ArrayLike,
    x_weights: ArrayLike | None = None,
    y_weights: ArrayLike | None = None,
) -> Array:
    """Energy distance between two (weighted) samples in R^d.

        D(P, Q) = sqrt(2 E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖),

    with the expectations under the weighted empirical measures (V-statistics). It is zero iff
    the two empirical measures coincide; in 1-D it equals sqrt(2) times the L2 distance of the
    CDFs (scipy.stats.energy_distance).

    Args:
      x: samples (n, d) or (n,); y: samples (m, d) or (m,).
      x_weights, y_weights: nonnegative weights (normalised here); uniform when None.

    References:
      Székely & Rizzo (2013), "Energy statistics: A class of statistics based on distances".
    """
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    x = x[:, None] if x.ndim == 1 else x
    y = y[:, None] if y.ndim == 1 else y
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"samples must share their dimension: got {x.shape} and {y.shape}.")
    wx = jnp.ones(x.shape[0], x.dtype) if x_weights is None else jnp.asarray(x_weights, x.dtype)
    wy = jnp.ones(y.shape[0], y.dtype) if y_weights is None else jnp.asarray(y_weights, y.dtype)
    wx, wy = wx / wx.sum(), wy / wy.sum()
    xy = _mean_pairwise_distance(x, wx, y, wy)
    xx = _mean_pairwise_distance(x, wx, x, wx)
    yy = _mean_pairwise_distance(y, wy, y, wy)
    return jnp.sqrt(jnp.maximum(2.0 * xy - xx - yy, 0.0))


def mode_weights(x: ArrayLike, centers: ArrayLike, weights: ArrayLike | None = None) -> Array:
    """Mass of each Voronoi cell of `centers` (K, d) under the (weighted) sample x (n, d)."""
    x = jnp.asarray(x)
    centers = jnp.asarray(centers)
    d2 = jnp.sum((x[:, None, :] - centers[None, :, :]) ** 2, -1)
    nearest = jnp.argmin(d2, axis=1)
    w = jnp.ones(x.shape[0], x.dtype) if weights is None else jnp.asarray(weights, x.dtype)
    return jax.ops.segment_sum(w, nearest, num_segments=centers.shape[0]) / w.sum()
