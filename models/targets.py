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
from jax.scipy.special import logsumexp

from feynkit.core.types import Array, ArrayLike, Float, Key

__all__ = ["GaussianMixture"]


@struct.dataclass
class GaussianMixture:
    """A Gaussian mixture Σ_k π_k N(μ_k, Σ_k) in d dimensions (a pytree: jit/vmap friendly).

    Attributes:
      log_weights: normalised log mixture weights, shape (K,).
      means: component means, shape (K, d).
      covs: component covariances, shape (K, d, d), symmetric positive definite.
      eigvals, eigvecs: the spectral decomposition covs = V diag(λ) Vᵀ, shapes (K, d) and
        (K, d, d), computed once in float64 NumPy by `create` (and carried exactly through
        `noised`: α²Σ + σ²I has eigenvalues α²λ + σ², the same vectors). Densities, scores and
        draws use it, so nothing inside a jitted sampler loop calls a LAPACK factorisation:
        jaxlib's batched CPU LAPACK kernels (`getrf`, `potrf`) run a parallel batch map on
        XLA's intra-op thread pool and were seen to deadlock inside `lax.scan` (all threads
        waiting; the intermittent `fkc_sample` hang). None: computed on use with `eigh`.
    """

    log_weights: Array
    means: Array
    covs: Array
    eigvals: Array | None = None
    eigvecs: Array | None = None

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
        c64 = np.asarray(covs, dtype=np.float64)
        if not np.allclose(c64, np.swapaxes(c64, -1, -2), rtol=1e-5, atol=1e-6 * np.abs(c64).max()):
            raise ValueError("covs must be symmetric positive definite (they are not symmetric).")
        vals, vecs = np.linalg.eigh(c64)
        if not np.all(vals > 0):
            raise ValueError("covs must be symmetric positive definite.")
        log_w = np.log(weights) - np.log(weights.sum())
        dt = means.dtype
        return cls(
            jnp.asarray(log_w, dtype=dt),
            means,
            covs,
            jnp.asarray(vals, dtype=dt),
            jnp.asarray(vecs, dtype=dt),
        )

    def spectral(self) -> tuple[Array, Array]:
        """(λ, V) with covs = V diag(λ) Vᵀ, shapes (K, d) and (K, d, d)."""
        if self.eigvals is not None and self.eigvecs is not None:
            return self.eigvals, self.eigvecs
        return jnp.linalg.eigh(self.covs)

    def _whiten(self, diff: Array) -> Array:
        """Vᵀ(x − μ_k) per component: diff (..., K, d) → (..., K, d) in the eigenbasis."""
        _, vecs = self.spectral()
        return jnp.einsum("kji,...kj->...ki", vecs, diff)

    def precision_matvec(self, diff: Array) -> Array:
        """Σ_k⁻¹ (x − μ_k) per component for diff of shape (..., K, d), without a solve."""
        vals, vecs = self.spectral()
        vals = vals.reshape((1,) * (diff.ndim - 2) + vals.shape)
        return jnp.einsum("kij,...kj->...ki", vecs, self._whiten(diff) / vals)

    def _lead(self, a: Array, x: Array) -> Array:
        """`a` (per component) with x's leading axes prepended (explicit rank promotion)."""
        return a.reshape((1,) * (x.ndim - 1) + a.shape)

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
        vals, _ = self.spectral()
        diff = x[..., None, :] - self._lead(self.means, x)  # (..., K, d)
        z2 = jnp.sum(self._whiten(diff) ** 2 / self._lead(vals, x), -1)
        const = self.log_weights - 0.5 * jnp.sum(jnp.log(vals), -1)
        return self._lead(const, x) - 0.5 * z2 - 0.5 * self.dim * math.log(2 * math.pi)

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
        per = -self.precision_matvec(x[..., None, :] - self._lead(self.means, x))  # (..., K, d)
        return jnp.sum(r[..., None] * per, axis=-2)

    def sample(self, key: Key, n: int) -> Float[Array, "n d"]:
        """n i.i.d. draws."""
        return self.sample_with_labels(key, n)[0]

    def sample_with_labels(self, key: Key, n: int) -> tuple[Array, Array]:
        """n i.i.d. draws and the index of the component each came from."""
        k1, k2 = jax.random.split(key)
        labels = jax.random.categorical(k1, self.log_weights, shape=(n,))
        eps = jax.random.normal(k2, (n, self.dim), dtype=self.means.dtype)
        vals, vecs = self.spectral()
        x = self.means[labels] + jnp.einsum(
            "nij,nj->ni", vecs[labels], jnp.sqrt(vals[labels]) * eps
        )
        return x, labels

    def noised(self, alpha: ArrayLike, sigma: ArrayLike) -> GaussianMixture:
        """The law of α x + σ ε, ε ~ N(0, I): Σ π_k N(α μ_k, α² Σ_k + σ² I)."""
        alpha = jnp.asarray(alpha, self.means.dtype)
        sigma = jnp.asarray(sigma, self.means.dtype)
        eye = jnp.eye(self.dim, dtype=self.means.dtype)
        vals, vecs = self.spectral()
        return GaussianMixture(
            self.log_weights,
            alpha * self.means,
            alpha**2 * self.covs + sigma**2 * eye[None],
            alpha**2 * vals + sigma**2,
            vecs,
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
        cov = cov.reshape(k1 * k2, self.dim, self.dim)
        cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
        vals, vecs = jnp.linalg.eigh(cov)
        return (
            GaussianMixture(
                (lw - log_z).reshape(k1 * k2), mean.reshape(k1 * k2, self.dim), cov, vals, vecs
            ),
            log_z,
        )

    def select(self, components: ArrayLike) -> GaussianMixture:
        """The mixture restricted to `components` (indices), weights renormalised."""
        idx = np.asarray(components)
        lw = self.log_weights[idx]
        vals, vecs = self.spectral()
        return GaussianMixture(
            lw - logsumexp(lw), self.means[idx], self.covs[idx], vals[idx], vecs[idx]
        )

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
