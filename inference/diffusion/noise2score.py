"""Noise2Score: denoising with Tweedie's formula from the score of the *noisy* data alone.

For noise from an exponential family p(y | η) = h(y) exp(η y − A(η)), Tweedie's formula gives
the posterior mean of the natural parameter from the score l'(y) = ∇log p(y) of the noisy
marginal,

    E[η | y] = l'(y) − h'(y) / h(y),

and Noise2Score maps it back to the image x. With l' learned from noisy images only (e.g. by a
denoising auto-encoder, `tweedie.dae_score`), no clean image is needed. Per noise model:

    Gaussian  y = x + σ ε:                 x̂ = y + σ² l'(y)                  (= E[x | y], exact)
    Poisson   y = ζ · Poisson(x / ζ):      x̂ = (y + ζ/2) exp(ζ l'(y))        (≈ exp E[log x | y])
    Gamma     y ~ Gamma(k, rate k / x):    x̂ = k y / ((k − 1) − y l'(y))     (= 1 / E[1/x | y])

Only the Gaussian estimate is the posterior mean. For Poisson counts z = y/ζ the natural
parameter is log(x/ζ) and h(z) = 1/z!, so E[log x | y] = log ζ + ζ l'(y) + ψ(z + 1) exactly
(for the continuous extension of p), and Noise2Score replaces ψ(z + 1) by log(z + ½) and
exponentiates: x̂ is the posterior geometric mean up to O(1/z²), below E[x | y] by at most
about ζ/2 (for a Gamma posterior of x/ζ with shape K, by the factor ≈ 1 − 1/(2K)). For
Gamma noise the natural parameter is −k/x, so E[1/x | y] is exact and x̂ is the posterior
harmonic mean (below E[x | y]).

Score functions: ``score_fn(y) -> ∇log p(y)`` elementwise over any batch shape (the noisy
marginal's score, not a diffusion-time score).

References:
  Kim & Ye (2021), "Noise2Score: Tweedie's Approach to Self-Supervised Image Denoising without
  Clean Images", Table 1 and the official implementation; Efron (2011), "Tweedie's Formula and
  Selection Bias", §2.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from feynkit.core.types import Array, ArrayLike, Float

__all__ = ["noise2score_gamma", "noise2score_gaussian", "noise2score_poisson"]


def _positive(name: str, value: ArrayLike) -> None:
    try:
        bad = float(value) <= 0
    except (TypeError, ValueError):  # traced: cannot be checked
        return
    if bad:
        raise ValueError(f"{name} must be > 0, got {value}.")


def noise2score_gaussian(
    score_fn: Callable[[Array], Array], y: Float[ArrayLike, "..."], sigma: ArrayLike
) -> Float[Array, "..."]:
    """Denoise additive Gaussian noise y = x + σ ε: x̂ = y + σ² ∇log p(y) = E[x | y].

    Args:
      score_fn: the score of the noisy marginal p(y), elementwise over a batch.
      y: noisy observations.
      sigma: the noise standard deviation σ > 0.

    Returns:
      The posterior mean E[x | y], shape of y.

    References:
      Kim & Ye (2021), "Noise2Score", Table 1 (Gaussian).
    """
    _positive("sigma", sigma)
    y = jnp.asarray(y)
    return y + sigma**2 * score_fn(y)


def noise2score_poisson(
    score_fn: Callable[[Array], Array], y: Float[ArrayLike, "..."], zeta: ArrayLike
) -> Float[Array, "..."]:
    """Denoise Poisson noise y = ζ · Poisson(x / ζ): x̂ = (y + ζ/2) exp(ζ ∇log p(y)).

    ζ is the gain (Var[y | x] = ζ x; 1/ζ photons per unit intensity), and ∇log p is the score of
    the noisy marginal of y, in y's units. The estimate is exp(E[log x | y]) with ψ(z + 1)
    approximated by log(z + ½), z = y/ζ: the posterior geometric mean, not the posterior mean
    (see the module docstring for the size of the difference).

    Args:
      score_fn: the score of the noisy marginal p(y), elementwise over a batch.
      y: noisy observations, ≥ 0 (multiples of ζ).
      zeta: the gain ζ > 0.

    Returns:
      The denoised estimate, shape of y.

    References:
      Kim & Ye (2021), "Noise2Score", Table 1 (Poisson) and the official code (the score is
      evaluated at y; in count units z = y/ζ the estimate reads ζ (z + ½) exp(l_z'(z))).
    """
    _positive("zeta", zeta)
    y = jnp.asarray(y)
    return (y + 0.5 * zeta) * jnp.exp(zeta * score_fn(y))


def noise2score_gamma(
    score_fn: Callable[[Array], Array], y: Float[ArrayLike, "..."], k: ArrayLike
) -> Float[Array, "..."]:
    """Denoise Gamma noise y ~ Gamma(shape k, rate k/x): x̂ = k y / ((k − 1) − y ∇log p(y)).

    E[y | x] = x and Var[y | x] = x²/k. The natural parameter is −k/x with base measure
    y^(k−1), so Tweedie gives E[1/x | y] = ((k − 1) − y l'(y)) / (k y) exactly and x̂ is its
    reciprocal (the posterior harmonic mean).

    Args:
      score_fn: the score of the noisy marginal p(y), elementwise over a batch.
      y: noisy observations, > 0.
      k: the shape k > 0 (larger is less noisy).

    Returns:
      The denoised estimate, shape of y.

    References:
      Kim & Ye (2021), "Noise2Score", Table 1 (Gamma).
    """
    _positive("k", k)
    y = jnp.asarray(y)
    return k * y / ((k - 1.0) - y * score_fn(y))
