"""Resampling schemes for particle methods, as pure functions of log-weights.

Every scheme has the signature `resample_fn(key, log_weights, num_samples) -> ancestors`, where
`log_weights` has shape (n,) (unnormalised, −inf allowed) and `ancestors` is an int32 vector of
shape (num_samples,) with entries in [0, n). All four are unbiased: E[#offspring of i] =
num_samples · W_i. They differ in variance: multinomial ≥ stratified ≥ systematic (in practice),
and residual ≤ multinomial.

One module serves every particle method in feynkit (SMC, FK correctors, steering, particle Gibbs).

References:
  Douc, Cappé & Moulines (2005), "Comparison of resampling schemes for particle filtering".
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from feynkit.core.types import Array, ArrayLike, Float, Int, Key, PyTree
from feynkit.core.weights import ess

__all__ = [
    "RESAMPLERS",
    "adaptive_resample",
    "get_resampler",
    "multinomial_resample",
    "resample_particles",
    "residual_resample",
    "stratified_resample",
    "systematic_resample",
]


def _relative_weights(log_weights: ArrayLike) -> Array:
    # exp(l − max l): exactly one for equal log-weights, so uniform weights give exact sums.
    log_weights = jnp.asarray(log_weights)
    return jnp.exp(log_weights - jnp.max(log_weights))


def _inverse_cdf(log_weights: ArrayLike, uniforms: Array) -> Array:
    w = _relative_weights(log_weights)
    n = w.shape[0]
    cdf = jnp.cumsum(w)
    # Dividing by the total makes the last entry exactly one, so no uniform in [0, 1) falls off
    # the end.
    cdf = cdf / cdf[-1]
    idx = jnp.clip(jnp.searchsorted(cdf, uniforms, side="right"), 0, n - 1).astype(jnp.int32)

    def _to_positive(idx):
        last_positive = lax.cummax(jnp.where(w > 0, jnp.arange(n, dtype=jnp.int32), 0))
        return last_positive[idx]

    # XLA computes cumsum as a tree reduction: the result need not be exactly monotone, nor flat
    # across a zero weight, so the search can land on a zero-weight (−inf) particle. Move such a
    # draw to the nearest earlier particle of positive weight, at whose interval's edge it lies.
    # The extra scan costs ~20% at 1e6 on CPU, so it runs only when some weight is zero.
    return lax.cond(jnp.all(w > 0), lambda i: i, _to_positive, idx)


def _comb(offsets: Array, num_samples: int) -> Array:
    """Points (k + u_k)/m, each kept strictly inside its stratum [k/m, (k+1)/m)."""
    k = jnp.arange(num_samples, dtype=offsets.dtype)
    # In float32, k + u rounds up to k + 1 for u near one (and the last point to 1.0), which
    # would duplicate an index or select a zero-weight last particle.
    upper = jnp.nextafter((k + 1) / num_samples, jnp.zeros((), offsets.dtype))
    return jnp.minimum((k + offsets) / num_samples, upper)


def multinomial_resample(
    key: Key, log_weights: Float[ArrayLike, " n"], num_samples: int
) -> Int[Array, " m"]:
    """Multinomial resampling: `num_samples` i.i.d. draws from Categorical(W).

    Inverse-CDF sampling of i.i.d. uniforms, O(m log n) time and O(n + m) memory.
    """
    u = jax.random.uniform(key, (num_samples,), dtype=jnp.result_type(float))
    return _inverse_cdf(log_weights, u)


def stratified_resample(
    key: Key, log_weights: Float[ArrayLike, " n"], num_samples: int
) -> Int[Array, " m"]:
    """Stratified resampling: one uniform in each stratum [k/m, (k+1)/m)."""
    u = jax.random.uniform(key, (num_samples,), dtype=jnp.result_type(float))
    return _inverse_cdf(log_weights, _comb(u, num_samples))


def systematic_resample(
    key: Key, log_weights: Float[ArrayLike, " n"], num_samples: int
) -> Int[Array, " m"]:
    """Systematic resampling: the comb (k + U)/m, k = 0..m−1, with a single uniform U."""
    u = jax.random.uniform(key, (), dtype=jnp.result_type(float))
    return _inverse_cdf(log_weights, _comb(u, num_samples))


def residual_resample(
    key: Key, log_weights: Float[ArrayLike, " n"], num_samples: int
) -> Int[Array, " m"]:
    """Residual resampling: ⌊m W_i⌋ deterministic copies, the rest multinomial on the residuals.

    Output order: the deterministic copies (grouped by parent) first, then the random draws.
    """
    log_weights = jnp.asarray(log_weights)
    n = log_weights.shape[0]
    w = _relative_weights(log_weights)
    # (m w_i) / Σ w rather than m · exp(log W_i): exact for equal weights, where
    # m · exp(−log n) can round to 0.99999994 and floor to zero deterministic copies.
    scaled = num_samples * w / jnp.sum(w)
    copies = jnp.floor(scaled).astype(jnp.int32)
    num_det = jnp.sum(copies)
    det = jnp.repeat(jnp.arange(n, dtype=jnp.int32), copies, total_repeat_length=num_samples)
    residual = scaled - copies
    # When every residual is zero no random draw is used; the tiny floor keeps the CDF finite.
    log_residual = jnp.log(jnp.maximum(residual, 0.0) + jnp.finfo(residual.dtype).tiny)
    log_residual = jnp.where(jnp.isfinite(log_weights), log_residual, -jnp.inf)
    rnd = multinomial_resample(key, log_residual, num_samples)
    return jnp.where(jnp.arange(num_samples) < num_det, det, rnd)


RESAMPLERS: dict[str, Callable[..., Array]] = {
    "multinomial": multinomial_resample,
    "stratified": stratified_resample,
    "systematic": systematic_resample,
    "residual": residual_resample,
}


def get_resampler(name: str) -> Callable[..., Array]:
    """The resampling function called `name` (one of `RESAMPLERS`)."""
    try:
        return RESAMPLERS[name]
    except KeyError:
        raise ValueError(
            f"unknown resampler {name!r}; choose one of {sorted(RESAMPLERS)}."
        ) from None


def resample_particles(particles: PyTree, ancestors: Int[ArrayLike, " m"]) -> PyTree:
    """Select `particles[ancestors]` along the leading axis of every leaf of a pytree."""
    ancestors = jnp.asarray(ancestors)
    return jax.tree.map(lambda leaf: jnp.take(leaf, ancestors, axis=0), particles)


def adaptive_resample(
    key: Key,
    particles: PyTree,
    log_weights: Float[ArrayLike, " n"],
    resample_fn: Callable[..., Array] = systematic_resample,
    ess_threshold: float = 0.5,
) -> tuple[PyTree, Array, Array, Array]:
    """Resample when ESS < `ess_threshold` · n, inside `jit` (a `lax.cond`, no host round-trip).

    Args:
      key: PRNG key.
      particles: pytree whose leaves have leading dimension n.
      log_weights: unnormalised log-weights, shape (n,).
      resample_fn: a resampling scheme with the shared signature.
      ess_threshold: fraction of n below which to resample; 0 never resamples, 1 always
        resamples at every step (even for uniform weights, whose float ESS can round below n).

    Returns:
      `(particles, log_weights, ancestors, resampled)`: after resampling the log-weights are all
      equal to the log of the mean weight (so log-normaliser bookkeeping is unchanged);
      otherwise they are returned unchanged and `ancestors` is the identity.
    """
    log_weights = jnp.asarray(log_weights)
    n = log_weights.shape[0]
    do_resample = ess(log_weights) < ess_threshold * n

    def _resample(_):
        ancestors = resample_fn(key, log_weights, n)
        mean = jax.scipy.special.logsumexp(log_weights) - jnp.log(n)
        return resample_particles(particles, ancestors), jnp.full_like(log_weights, mean), ancestors

    def _keep(_):
        return particles, log_weights, jnp.arange(n, dtype=jnp.int32)

    particles, log_weights, ancestors = lax.cond(do_resample, _resample, _keep, None)
    return particles, log_weights, ancestors, do_resample
