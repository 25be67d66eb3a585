"""Tweedie's formula: the posterior mean and covariance of x₀ given x_t from the score of p_t.

For x_t = α x₀ + σ ε, ε ~ N(0, I), and any prior on x₀,

    E[x₀ | x_t]   = (x_t + σ² ∇log p_t(x_t)) / α                              (first order)
    Cov[x₀ | x_t] = (σ² / α²) (I + σ² ∇² log p_t(x_t))                        (second order)

(the second is the derivative of the first: Cov = (σ²/α) ∂E[x₀|x_t]/∂x_t). The Hessian of
log p_t is the Jacobian of the score, computed exactly with `jax.jacfwd` (d forward passes per
point) or estimated matrix-free with Hutchinson probes: for Rademacher v, E[v ⊙ (H v)] = diag H
and E[vᵀ H v] = tr H, one Jacobian-vector product per probe.

A denoising auto-encoder r trained at noise σ (x̃ = x + σ ε) learns r(x̃) ≈ E[x | x̃], so by
Tweedie its residual is a score: (r(x̃) − x̃)/σ² = ∇log p_σ(x̃) (`dae_score`).

Score functions. ``score_fn(x) -> ∇log p_t(x)`` takes a batch x of shape (n, *event) and must act
row-wise (row i of the output depends on row i of the input only), as every score network and
`feynkit.models.GaussianMixture.score` do; bind t with a closure, e.g.
``lambda x: gmm.marginal(schedule, t).score(x)`` or ``lambda x: -model(x, t) / sigma``.
The covariance functions flatten the event dimensions: covariances have shape (n, D, D) with
D = prod(event); diagonals and traces keep the event shape and (n,).

References:
  Efron (2011), "Tweedie's Formula and Selection Bias";
  Rout et al. (2023), "Beyond First-Order Tweedie: Solving Inverse Problems using Latent
  Diffusion" (second-order Tweedie, Hutchinson trace);
  Alain & Bengio (2014), "What Regularized Auto-Encoders Learn from the Data-Generating
  Distribution" (DAE residual ↔ score);
  Hutchinson (1989), "A Stochastic Estimator of the Trace of the Influence Matrix".
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from feynkit.core.types import Array, ArrayLike, Float, Key

__all__ = [
    "dae_score",
    "score_jacobian",
    "tweedie_covariance",
    "tweedie_covariance_diag_hutchinson",
    "tweedie_mean",
    "tweedie_trace_hutchinson",
]

ScoreOfX = Callable[[Array], Array]


def _batch(x: ArrayLike) -> Array:
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(
            f"x must be a batch of shape (n, *event), got shape {x.shape}; add a leading axis "
            "(x[None]) for a single point."
        )
    return x


def _check_probes(num_probes: int) -> None:
    if num_probes < 1:
        raise ValueError(f"num_probes must be ≥ 1, got {num_probes}.")


def tweedie_mean(
    score_fn: ScoreOfX, x: Float[ArrayLike, "n ..."], alpha: ArrayLike, sigma: ArrayLike
) -> Float[Array, "n ..."]:
    """First-order Tweedie: the posterior mean E[x₀ | x_t] = (x_t + σ² ∇log p_t(x_t)) / α.

    Args:
      score_fn: ``score_fn(x) -> ∇log p_t(x)`` on a batch (see the module docstring).
      x: points x_t, shape (n, *event).
      alpha, sigma: the coefficients of x_t = α x₀ + σ ε (scalars).

    Returns:
      E[x₀ | x_t], shape of x.

    References:
      Efron (2011), "Tweedie's Formula and Selection Bias", eq. 2.8.
    """
    x = _batch(x)
    return (x + sigma**2 * score_fn(x)) / alpha


def score_jacobian(score_fn: ScoreOfX, x: Float[ArrayLike, "n ..."]) -> Float[Array, "n D D"]:
    """The Jacobian of the score (the Hessian ∇² log p_t) at each point, by `jax.jacfwd`.

    Args:
      score_fn: row-wise ``score_fn(x) -> ∇log p_t(x)`` on a batch.
      x: shape (n, *event).

    Returns:
      ∂score/∂x per point, shape (n, D, D) with D = prod(event), row-major flattening.
    """
    x = _batch(x)
    event = x.shape[1:]

    def one(xi_flat):
        return score_fn(xi_flat.reshape((1, *event))).reshape(-1)

    return jax.vmap(jax.jacfwd(one))(x.reshape(x.shape[0], -1))


def tweedie_covariance(
    score_fn: ScoreOfX, x: Float[ArrayLike, "n ..."], alpha: ArrayLike, sigma: ArrayLike
) -> Float[Array, "n D D"]:
    """Second-order Tweedie: Cov[x₀ | x_t] = (σ²/α²)(I + σ² ∇² log p_t(x_t)), exact Jacobian.

    Costs D forward-mode passes per point; use the Hutchinson estimators in high dimension.

    Args:
      score_fn: row-wise ``score_fn(x) -> ∇log p_t(x)`` on a batch.
      x: points x_t, shape (n, *event).
      alpha, sigma: the coefficients of x_t = α x₀ + σ ε (scalars).

    Returns:
      The posterior covariances, shape (n, D, D), D = prod(event) (symmetrised: the exact
      Hessian is symmetric, its float Jacobian only up to round-off).

    References:
      Rout et al. (2023), "Beyond First-Order Tweedie", eq. 5; Efron (2011), eq. 2.9.
    """
    jac = score_jacobian(score_fn, x)
    jac = 0.5 * (jac + jnp.swapaxes(jac, -1, -2))
    eye = jnp.eye(jac.shape[-1], dtype=jac.dtype)
    return (sigma**2 / alpha**2) * (eye[None] + sigma**2 * jac)


def _rademacher_jvps(
    key: Key, score_fn: ScoreOfX, x: Array, num_probes: int
) -> tuple[Array, Array]:
    """Probes v (num_probes, n, *event) and the products (∇² log p) v of the same shape."""
    _check_probes(num_probes)
    probes = jax.random.rademacher(key, (num_probes, *x.shape), dtype=x.dtype)

    def jvp(v):
        return jax.jvp(score_fn, (x,), (v,))[1]  # row-wise score: block-diagonal Jacobian

    return probes, jax.lax.map(jvp, probes)


def tweedie_covariance_diag_hutchinson(
    key: Key,
    score_fn: ScoreOfX,
    x: Float[ArrayLike, "n ..."],
    alpha: ArrayLike,
    sigma: ArrayLike,
    num_probes: int = 64,
) -> Float[Array, "n ..."]:
    """The diagonal of Cov[x₀ | x_t] by Hutchinson's diagonal estimator with Rademacher probes.

        diag Cov ≈ (σ²/α²)(1 + σ² (1/K) Σ_k v_k ⊙ (∇² log p_t · v_k)),   v_k ∈ {±1}^D,

    unbiased, with per-entry variance (σ⁴/α²)² Σ_{j≠i} H_ij² / K (falls like 1/K: exact for
    diagonal Hessians). One Jacobian-vector product (forward mode) per probe, run sequentially.

    Args:
      key: PRNG key for the probes.
      score_fn: row-wise ``score_fn(x) -> ∇log p_t(x)`` on a batch.
      x: points x_t, shape (n, *event).
      alpha, sigma: the coefficients of x_t = α x₀ + σ ε (scalars).
      num_probes: K ≥ 1.

    Returns:
      The estimated posterior variances, shape of x.

    References:
      Bekas, Kokiopoulou & Saad (2007), "An estimator for the diagonal of a matrix";
      Rout et al. (2023), "Beyond First-Order Tweedie".
    """
    x = _batch(x)
    probes, hv = _rademacher_jvps(key, score_fn, x, num_probes)
    diag_h = jnp.mean(probes * hv, axis=0)
    return (sigma**2 / alpha**2) * (1.0 + sigma**2 * diag_h)


def tweedie_trace_hutchinson(
    key: Key,
    score_fn: ScoreOfX,
    x: Float[ArrayLike, "n ..."],
    alpha: ArrayLike,
    sigma: ArrayLike,
    num_probes: int = 64,
) -> Float[Array, " n"]:
    """tr Cov[x₀ | x_t] by Hutchinson's trace estimator with Rademacher probes.

        tr Cov ≈ (σ²/α²)(D + σ² (1/K) Σ_k v_kᵀ ∇² log p_t · v_k),

    unbiased with variance (σ⁴/α²)² · 2 Σ_{i≠j} H_ij² / K. This is the O(1)-per-probe quantity
    the surrogate loss of Rout et al. (2023) uses in place of the full second-order term.

    Args:
      key: PRNG key for the probes.
      score_fn: row-wise ``score_fn(x) -> ∇log p_t(x)`` on a batch.
      x: points x_t, shape (n, *event).
      alpha, sigma: the coefficients of x_t = α x₀ + σ ε (scalars).
      num_probes: K ≥ 1.

    Returns:
      The estimated trace per point, shape (n,).

    References:
      Hutchinson (1989); Rout et al. (2023), "Beyond First-Order Tweedie", §4.
    """
    x = _batch(x)
    probes, hv = _rademacher_jvps(key, score_fn, x, num_probes)
    axes = tuple(range(2, probes.ndim))
    trace_h = jnp.mean(jnp.sum(probes * hv, axis=axes), axis=0)
    dim = math.prod(x.shape[1:])
    return (sigma**2 / alpha**2) * (dim + sigma**2 * trace_h)


def dae_score(
    denoiser: Callable[[Array], Array], x: Float[ArrayLike, "n ..."], sigma: ArrayLike
) -> Float[Array, "n ..."]:
    """The score a denoising auto-encoder implies: ∇log p_σ(x) ≈ (r(x) − x) / σ².

    For r trained to reconstruct x from x̃ = x + σ ε with the squared error, the optimum is
    r*(x̃) = E[x | x̃] and Tweedie gives r*(x̃) − x̃ = σ² ∇log p_σ(x̃) exactly, with p_σ the
    data density convolved with N(0, σ² I); as σ → 0 it is the score of the data itself.

    Args:
      denoiser: ``r(x) -> reconstruction`` on a batch.
      x: shape (n, *event).
      sigma: the training corruption σ > 0.

    Returns:
      The score estimate, shape of x.

    References:
      Alain & Bengio (2014), "What Regularized Auto-Encoders Learn from the Data-Generating
      Distribution", Thm. 1 and §3.3; Vincent (2011), "A Connection Between Score Matching and
      Denoising Autoencoders".
    """
    x = _batch(x)
    return (denoiser(x) - x) / sigma**2
