"""Variational families: mean-field and full-rank Gaussians over a flat latent vector.

A family is a frozen dataclass (hashable, so it can be a static argument of `jit`) with

    family.init(loc=0.0, scale=1.0, batch_shape=())  -> params (a dict of arrays)
    family.sample(key, params, num_samples)         -> z, shape (num_samples, *batch, dim),
                                                       reparameterised: z = loc + L ε
    family.log_prob(params, z)                      -> log q(z), shape z.shape[:-1]
    family.check(params, name)                      -> batch shape; ValueError on a bad tree

`log_prob` evaluates the density at the point z itself (it solves L u = z − loc), never from the
noise ε that produced z. That matters for sticking-the-landing (STL) and DReG estimators, which
evaluate ``log_prob(stop_gradient(params), z)``: z keeps its path derivative through the
parameters while the density's own parameter dependence (the score term) is dropped. Computing
log q as ``log N(ε) − log |det L|`` instead, as one JAX library does behind its STL flag, keeps a
gradient through L and the flag changes nothing.

Parameters are unconstrained: ``log_scale`` for the mean-field scales, and for the full-rank
family a matrix ``scale_tril`` whose strict lower triangle is used as is and whose diagonal is
exponentiated (L = tril(S, −1) + diag(exp(diag S))).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from feynkit.core.types import Array, ArrayLike, Key, PyTree

__all__ = ["FullRankGaussian", "MeanFieldGaussian", "check_params"]

_LOG_2PI = math.log(2 * math.pi)


def check_params(params: PyTree, expected: dict[str, tuple[int, ...]], name: str) -> tuple:
    """Check that `params` is a dict with exactly the keys of `expected`, each an array whose
    shape ends in the expected event shape with one common batch shape; return that shape."""
    if not isinstance(params, dict) or set(params) != set(expected):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(
            f"{name} must be a dict with keys {sorted(expected)}, got {got}; build it with "
            "family.init(...)."
        )
    batch = None
    for k, event in expected.items():
        shape = jnp.shape(params[k])
        n = len(shape) - len(event)
        if n < 0 or tuple(shape[n:]) != tuple(event):
            raise ValueError(
                f"{name}[{k!r}] must end in shape {event}, got {shape}; the family's dim "
                "does not match these parameters."
            )
        b = tuple(shape[:n])
        if batch is not None and b != batch:
            raise ValueError(
                f"{name} leaves have different batch shapes {batch} and {b} (key {k!r})."
            )
        batch = b
    return batch


def _check_dim(dim: int) -> None:
    if not (isinstance(dim, int) and dim >= 1):
        raise ValueError(f"dim must be a positive int, got {dim!r}.")


@dataclasses.dataclass(frozen=True)
class MeanFieldGaussian:
    """q(z) = Π_i N(z_i; loc_i, exp(log_scale_i)²) over z ∈ ℝ^dim."""

    dim: int

    def __post_init__(self):
        _check_dim(self.dim)

    def init(self, loc: ArrayLike = 0.0, scale: ArrayLike = 1.0, batch_shape=()) -> dict:
        shape = (*batch_shape, self.dim)
        return {
            "loc": jnp.broadcast_to(jnp.asarray(loc, jnp.float32), shape),
            "log_scale": jnp.broadcast_to(jnp.log(jnp.asarray(scale, jnp.float32)), shape),
        }

    def check(self, params: PyTree, name: str = "params") -> tuple:
        return check_params(params, {"loc": (self.dim,), "log_scale": (self.dim,)}, name)

    def sample(self, key: Key, params: dict, num_samples: int) -> Array:
        loc, log_scale = params["loc"], params["log_scale"]
        eps = jax.random.normal(key, (num_samples, *loc.shape), loc.dtype)
        return loc[None] + jnp.exp(log_scale)[None] * eps

    def log_prob(self, params: dict, z: ArrayLike) -> Array:
        z = jnp.asarray(z)
        loc = jnp.broadcast_to(params["loc"], z.shape)
        log_scale = jnp.broadcast_to(params["log_scale"], z.shape)
        u = (z - loc) * jnp.exp(-log_scale)
        return -0.5 * jnp.sum(u**2 + _LOG_2PI, -1) - jnp.sum(log_scale, -1)

    def mean_cov(self, params: dict) -> tuple[Array, Array]:
        """(mean, covariance) of q."""
        var = jnp.exp(2 * params["log_scale"])
        return params["loc"], var[..., None] * jnp.eye(self.dim, dtype=var.dtype)


@dataclasses.dataclass(frozen=True)
class FullRankGaussian:
    """q(z) = N(z; loc, L Lᵀ) with L lower triangular (diagonal exp(diag scale_tril))."""

    dim: int

    def __post_init__(self):
        _check_dim(self.dim)

    def init(self, loc: ArrayLike = 0.0, scale: ArrayLike = 1.0, batch_shape=()) -> dict:
        eye = jnp.eye(self.dim, dtype=jnp.float32)
        raw = eye * jnp.log(jnp.asarray(scale, jnp.float32))
        return {
            "loc": jnp.broadcast_to(jnp.asarray(loc, jnp.float32), (*batch_shape, self.dim)),
            "scale_tril": jnp.broadcast_to(raw, (*batch_shape, self.dim, self.dim)),
        }

    def check(self, params: PyTree, name: str = "params") -> tuple:
        d = self.dim
        return check_params(params, {"loc": (d,), "scale_tril": (d, d)}, name)

    def tril(self, params: dict) -> Array:
        """The Cholesky factor L of the covariance."""
        s = params["scale_tril"]
        diag = jnp.diagonal(s, axis1=-2, axis2=-1)
        return jnp.tril(s, -1) + jnp.exp(diag)[..., None] * jnp.eye(self.dim, dtype=s.dtype)

    def sample(self, key: Key, params: dict, num_samples: int) -> Array:
        loc, chol = params["loc"], self.tril(params)
        eps = jax.random.normal(key, (num_samples, *loc.shape), loc.dtype)
        return loc[None] + jnp.einsum("...ij,k...j->k...i", chol, eps)

    def log_prob(self, params: dict, z: ArrayLike) -> Array:
        loc, chol = params["loc"], self.tril(params)
        z = jnp.asarray(z)
        diff = z - jnp.broadcast_to(loc, z.shape)
        # L⁻¹ once per factor (not one triangular solve per sample), then u = L⁻¹ (z − loc)
        eye = jnp.broadcast_to(jnp.eye(self.dim, dtype=chol.dtype), chol.shape)
        inv = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
        inv_b = jnp.broadcast_to(inv, (*diff.shape, self.dim))
        u = jnp.einsum("...ij,...j->...i", inv_b, diff)
        log_det = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)
        log_det = jnp.broadcast_to(log_det, u.shape[:-1])
        return -0.5 * jnp.sum(u**2 + _LOG_2PI, -1) - log_det

    def mean_cov(self, params: dict) -> tuple[Array, Array]:
        """(mean, covariance) of q."""
        chol = self.tril(params)
        return params["loc"], chol @ jnp.swapaxes(chol, -1, -2)
