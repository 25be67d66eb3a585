"""Log-space importance weights: normalisation, log-mean-exp and effective sample sizes.

All functions act on a vector of log-weights of shape (n,). Weights of −inf are allowed (zero
weight); NaN is not. The functions are pure and jit/vmap compatible; `check_log_weights` is the
eager validation used by drivers outside `jit`.
"""

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from feynkit.core.types import Array, ArrayLike, Float

__all__ = [
    "check_log_weights",
    "conditional_ess",
    "ess",
    "log_ess",
    "log_mean_exp",
    "normalize_log_weights",
]


def normalize_log_weights(log_weights: Float[ArrayLike, " n"]) -> Float[Array, " n"]:
    """Normalised log-weights, log W_i = log w_i − log Σ_j w_j.

    Args:
      log_weights: unnormalised log-weights, shape (n,).

    Returns:
      Log-weights whose exponentials sum to one. Entries of +inf share all the mass (log W =
      −log k on the k of them, −inf elsewhere), as in the resamplers; all −inf or any NaN
      input gives NaN (`feynkit.core.log_weights_ok` is the traceable check).
    """
    log_weights = jnp.asarray(log_weights)
    posinf = log_weights == jnp.inf
    k = jnp.sum(posinf)
    among_inf = jnp.where(posinf, -jnp.log(jnp.maximum(k, 1).astype(log_weights.dtype)), -jnp.inf)
    return jnp.where(k > 0, among_inf, log_weights - logsumexp(log_weights))


def log_mean_exp(x: Float[ArrayLike, "..."], axis: int | None = None) -> Array:
    """log((1/n) Σ exp x_i), computed stably: logsumexp(x) − log n."""
    x = jnp.asarray(x)
    n = x.size if axis is None else x.shape[axis]
    return logsumexp(x, axis=axis) - jnp.log(n)


def log_ess(log_weights: Float[ArrayLike, " n"]) -> Float[Array, ""]:
    """log of the effective sample size, log ESS = 2 logsumexp(l) − logsumexp(2 l)."""
    log_weights = jnp.asarray(log_weights)
    return 2.0 * logsumexp(log_weights) - logsumexp(2.0 * log_weights)


def ess(log_weights: Float[ArrayLike, " n"]) -> Float[Array, ""]:
    """Effective sample size (Σ w_i)² / Σ w_i², in [1, n], from unnormalised log-weights.

    References:
      Kong, Liu & Wong (1994), "Sequential imputations and Bayesian missing data problems".
    """
    return jnp.exp(log_ess(log_weights))


def conditional_ess(
    log_weights: Float[ArrayLike, " n"], log_increments: Float[ArrayLike, " n"]
) -> Float[Array, ""]:
    """Conditional ESS of an incremental reweighting, n (Σ W_i v_i)² / Σ W_i v_i².

    W are the normalised current weights and v_i = exp(log_increments_i) the incremental weights;
    the value lies in (0, n] (it can fall below 1 when the increments favour particles of
    small current weight) and equals n when the increments are constant.

    References:
      Zhou, Johansen & Aston (2016), "Toward automatic model comparison: an adaptive sequential
      Monte Carlo approach", eq. (9).
    """
    log_w = normalize_log_weights(log_weights)
    log_increments = jnp.asarray(log_increments)
    n = log_w.shape[0]
    num = 2.0 * logsumexp(log_w + log_increments)
    den = logsumexp(log_w + 2.0 * log_increments)
    return n * jnp.exp(num - den)


def check_log_weights(log_weights: ArrayLike, name: str = "log_weights") -> None:
    """Raise `ValueError` unless `log_weights` is a vector with no NaN and some finite entry.

    Eager only (it reads values); drivers call it between compiled chunks.
    """
    w = np.asarray(log_weights)
    if w.ndim != 1 or w.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty vector of shape (n,), got shape {w.shape}.")
    if np.isnan(w).any():
        raise ValueError(
            f"{name} contains NaN ({int(np.isnan(w).sum())} of {w.size}); a potential or "
            "score returned NaN: check the model and the step size."
        )
    if np.isposinf(w).any():
        raise ValueError(
            f"{name} contains +inf ({int(np.isposinf(w).sum())} of {w.size}): normalising would "
            "give NaN; a potential overflowed, check its scale or the step size."
        )
    if not np.isfinite(w).any():
        raise ValueError(
            f"all {w.size} {name} are -inf or +inf: every particle has zero (or infinite) weight, "
            "so there is nothing to resample; check the potential/target log-density."
        )
