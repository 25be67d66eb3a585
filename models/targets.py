"""Analytic targets: Gaussian mixtures with exact log-density, score and VP-noised marginals.

Under the VP forward process x_t = α_t x_0 + σ_t ε a mixture Σ π_k N(μ_k, Σ_k) stays a mixture,
Σ π_k N(α_t μ_k, α_t² Σ_k + σ_t² I), so samplers can be run and tested with the true score.
The product of two mixtures is again a mixture (weights π_i ρ_j N(a_i; b_j, A_i + B_j)), which
gives closed-form ground truth for products of experts.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.scipy.linalg import solve_triangular
from jax.scipy.special import logsumexp

from feynkit.core.types import Array, ArrayLike, Float, Key

__all__ = ["GaussianMixture"]


def _chol(covs: Array) -> Array:
    return jnp.linalg.cholesky(covs)


@struct.dataclass
class GaussianMixture:
    """A Gaussian mixture Σ_k π_k N(μ_k, Σ_k) in d dimensions (a pytree: jit/vmap friendly).

    Attributes:
      log_weights: normalised log mixture weights, shape (K,).
      means: component means, shape (K, d).
      covs: component covariances, shape (K, d, d), symmetric positive definite.
    """

    log_weights: Array
    means: Array
    covs: Array

    @classmethod
    def create(
        cls,
        weights: ArrayLike,
        means: ArrayLike,
        covs: ArrayLike | None = None,
        scales: ArrayLike | float | None = None,
    ) -> GaussianMixture:
        """Build a mixture from weights (normalised here), means and covariances or scales.

        Args:
          weights: nonnegative mixture weights, shape (K,).
          means: shape (K, d).
          covs: full covariances, shape (K, d, d); or
          scales: isotropic standard deviations, a scalar or shape (K,).
        """
        weights = np.asarray(weights, dtype=np.float64)
        means = jnp.asarray(means, dtype=jnp.result_type(float))
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {means.shape}.")
        k, d = means.shape
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape ({k},) to match means, got {weights.shape}.")
        if (weights < 0).any() or weights.sum() <= 0 or not np.isfinite(weights).all():
            raise ValueError(
                f"weights must be finite, nonnegative and not all zero, got {weights}."
            )
        if (covs is None) == (scales is None):
            raise ValueError("give exactly one of covs (K, d, d) or scales (scalar or (K,)).")
        if covs is None:
            s = np.broadcast_to(np.asarray(scales, dtype=np.float64), (k,))
            if (s <= 0).any():
                raise ValueError(f"scales must be positive, got {s}.")
            covs = (s**2)[:, None, None] * np.eye(d)[None]
        covs = jnp.asarray(covs, dtype=means.dtype)
        if covs.shape != (k, d, d):
            raise ValueError(f"covs must have shape ({k}, {d}, {d}), got {covs.shape}.")
        if not np.all(np.linalg.eigvalsh(np.asarray(covs, dtype=np.float64)) > 0):
            raise ValueError("covs must be symmetric positive definite.")
        log_w = np.log(weights) - np.log(weights.sum())
        return cls(jnp.asarray(log_w, dtype=means.dtype), means, covs)

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def weights(self) -> Array:
        return jnp.exp(self.log_weights)

    def _check_x(self, x: Array) -> Array:
        x = jnp.asarray(x)
        if x.shape[-1:] != (self.dim,):
            raise ValueError(f"x must have trailing dimension {self.dim}, got shape {x.shape}.")
        return x

    def component_log_probs(self, x: Float[ArrayLike, "... d"]) -> Float[Array, "... K"]:
        """log π_k + log N(x; μ_k, Σ_k) for every component."""
        x = self._check_x(x)
        chol = _chol(self.covs)

        def one(mu, L, lw):
            diff = x.reshape(-1, self.dim) - mu[None]
            z = solve_triangular(L, diff.T, lower=True).T
            logdet = jnp.sum(jnp.log(jnp.diagonal(L)))
            lp = -0.5 * jnp.sum(z**2, -1) - logdet - 0.5 * self.dim * math.log(2 * math.pi)
            return lw + lp.reshape(x.shape[:-1])

        return jnp.moveaxis(jax.vmap(one)(self.means, chol, self.log_weights), 0, -1)

    def log_prob(self, x: Float[ArrayLike, "... d"]) -> Float[Array, "..."]:
        """log p(x) = logsumexp_k (log π_k + log N(x; μ_k, Σ_k))."""
        return logsumexp(self.component_log_probs(x), axis=-1)

    def responsibilities(self, x: Float[ArrayLike, "... d"]) -> Float[Array, "... K"]:
        """Posterior component probabilities r_k(x) = π_k N_k(x) / p(x)."""
        c = self.component_log_probs(x)
        return jnp.exp(c - logsumexp(c, axis=-1, keepdims=True))

    def score(self, x: Float[ArrayLike, "... d"]) -> Float[Array, "... d"]:
        """∇ log p(x) = −Σ_k r_k(x) Σ_k⁻¹ (x − μ_k), in closed form."""
        x = self._check_x(x)
        r = self.responsibilities(x)
        prec = jnp.linalg.inv(self.covs)
        means = self.means.reshape((1,) * (x.ndim - 1) + self.means.shape)
        diff = x[..., None, :] - means  # (..., K, d)
        per = -jnp.einsum("kij,...kj->...ki", prec, diff)
        return jnp.sum(r[..., None] * per, axis=-2)

    def sample(self, key: Key, n: int) -> Float[Array, "n d"]:
        """n i.i.d. draws."""
        return self.sample_with_labels(key, n)[0]

    def sample_with_labels(self, key: Key, n: int) -> tuple[Array, Array]:
        """n i.i.d. draws and the index of the component each came from."""
        k1, k2 = jax.random.split(key)
        labels = jax.random.categorical(k1, self.log_weights, shape=(n,))
        eps = jax.random.normal(k2, (n, self.dim), dtype=self.means.dtype)
        chol = _chol(self.covs)[labels]
        x = self.means[labels] + jnp.einsum("nij,nj->ni", chol, eps)
        return x, labels

    def noised(self, alpha: ArrayLike, sigma: ArrayLike) -> GaussianMixture:
        """The law of α x + σ ε, ε ~ N(0, I): Σ π_k N(α μ_k, α² Σ_k + σ² I)."""
        alpha = jnp.asarray(alpha, self.means.dtype)
        sigma = jnp.asarray(sigma, self.means.dtype)
        eye = jnp.eye(self.dim, dtype=self.means.dtype)
        return GaussianMixture(
            self.log_weights, alpha * self.means, alpha**2 * self.covs + sigma**2 * eye[None]
        )

    def marginal(self, schedule, t: ArrayLike) -> GaussianMixture:
        """p_t of the VP forward process started at this mixture (schedule from feynkit.core)."""
        return self.noised(schedule.alpha(t), schedule.sigma(t))

    def mean(self) -> Array:
        return jnp.einsum("k,kd->d", self.weights, self.means)

    def covariance(self) -> Array:
        m = self.mean()
        second = self.covs + jnp.einsum("ki,kj->kij", self.means, self.means)
        return jnp.einsum("k,kij->ij", self.weights, second) - jnp.outer(m, m)

    def product(self, other: GaussianMixture) -> tuple[GaussianMixture, Array]:
        """The normalised product p·q/Z as a K₁K₂-component mixture, and log Z = log ∫ p q.

        N(x; a, A) N(x; b, B) = N(a; b, A + B) N(x; c, C), C = (A⁻¹ + B⁻¹)⁻¹,
        c = C (A⁻¹ a + B⁻¹ b).
        """
        if other.dim != self.dim:
            raise ValueError(f"dimensions differ: {self.dim} and {other.dim}.")
        pa = jnp.linalg.inv(self.covs)[:, None]  # (K1, 1, d, d)
        pb = jnp.linalg.inv(other.covs)[None]  # (1, K2, d, d)
        cov = jnp.linalg.inv(pa + pb)
        rhs = jnp.einsum("...ij,...j->...i", pa, self.means[:, None]) + jnp.einsum(
            "...ij,...j->...i", pb, other.means[None]
        )
        mean = jnp.einsum("...ij,...j->...i", cov, rhs)
        k1, k2 = self.num_components, other.num_components
        cross = GaussianMixture(
            jnp.zeros((k2,), self.means.dtype), other.means, other.covs
        )  # N(a_i; b_j, A_i + B_j) via a per-i mixture with widened covariances
        lw = jax.vmap(
            lambda a, acov: cross.replace(covs=other.covs + acov[None]).component_log_probs(a)
        )(self.means, self.covs)
        lw = lw + self.log_weights[:, None] + other.log_weights[None]
        log_z = logsumexp(lw)
        return (
            GaussianMixture(
                (lw - log_z).reshape(k1 * k2),
                mean.reshape(k1 * k2, self.dim),
                cov.reshape(k1 * k2, self.dim, self.dim),
            ),
            log_z,
        )

    def select(self, components: ArrayLike) -> GaussianMixture:
        """The mixture restricted to `components` (indices), weights renormalised."""
        idx = np.asarray(components)
        lw = self.log_weights[idx]
        return GaussianMixture(lw - logsumexp(lw), self.means[idx], self.covs[idx])

    def modes(self, num_iters: int = 200) -> Array:
        """Local maxima of p found by mean-shift from every component mean, shape (K, d)."""
        prec = jnp.linalg.inv(self.covs)
        pm = jnp.einsum("kij,kj->ki", prec, self.means)

        def body(x, _):
            r = self.responsibilities(x)
            a = jnp.einsum("nk,kij->nij", r, prec)
            b = jnp.einsum("nk,ki->ni", r, pm)
            return jnp.linalg.solve(a, b[..., None])[..., 0], None

        x, _ = jax.lax.scan(body, self.means, None, length=num_iters)
        return x
