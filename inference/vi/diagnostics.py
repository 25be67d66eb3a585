"""Posterior-collapse diagnostics for Gaussian-encoder VAEs.

Posterior collapse of latent dimension i: q(z_i | x) ≈ p(z_i) for (almost) every x, so z_i
carries no information about x. "Beyond Vanilla Variational Autoencoders: Detecting Posterior
Collapse in Conditional and Hierarchical VAEs" (Dang, Tran, Osher, Tran-The, Ho & Nguyen, ICLR
2024) measures it, as is standard, by

* ε-posterior collapse: the dimension's KL, E_x KL(q(z_i | x) ‖ N(0, 1)), is below ε;
* active units (Burda et al. 2016): A_i = Var_x(E_q[z_i | x]) above a threshold (0.01) marks an
  active unit; a collapsed unit's posterior mean does not move with x.

`collapse_report` returns both per dimension and flags the model as collapsed when the share of
collapsed dimensions reaches `max_collapsed_fraction`. The paper's linear analysis predicts which
models collapse (a high β, a decoder variance large against the data's singular values, or, in a
conditional VAE, inputs strongly correlated with outputs); this module measures the outcome.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from feynkit.core.types import Array, ArrayLike

__all__ = ["CollapseReport", "active_units", "collapse_report", "kl_per_dimension"]


class CollapseReport(NamedTuple):
    """Per-dimension KL (nats, mean over data), active-unit statistic Var_x E[z_i | x], the masks
    of collapsed (KL < ε) and active dimensions, the collapsed share and the verdict."""

    kl_per_dim: Array
    activity: Array
    collapsed_dims: Array
    active_dims: Array
    collapsed_fraction: Array
    collapsed: Array


def _check(mean: ArrayLike, logvar: ArrayLike) -> tuple[Array, Array]:
    mean, logvar = jnp.asarray(mean), jnp.asarray(logvar)
    if mean.ndim != 2 or mean.shape != logvar.shape or mean.shape[0] < 2:
        raise ValueError(
            "mean and logvar must be (num_data >= 2, latent_dim) arrays of one shape (the "
            f"encoder's outputs on a data set), got {mean.shape} and {logvar.shape}."
        )
    return mean, logvar


def kl_per_dimension(mean: ArrayLike, logvar: ArrayLike) -> Array:
    """E_x KL(N(μ_i(x), e^{logvar_i(x)}) ‖ N(0, 1)) per latent dimension, shape (latent_dim,)."""
    mean, logvar = _check(mean, logvar)
    return jnp.mean(0.5 * (jnp.exp(logvar) + mean**2 - 1.0 - logvar), axis=0)


def active_units(mean: ArrayLike) -> Array:
    """Var_x E_q[z_i | x] per latent dimension (Burda et al. 2016's activity statistic)."""
    mean = jnp.asarray(mean)
    if mean.ndim != 2 or mean.shape[0] < 2:
        raise ValueError(f"mean must be a (num_data >= 2, latent_dim) array, got {mean.shape}.")
    return jnp.var(mean, axis=0)


def collapse_report(
    mean: ArrayLike,
    logvar: ArrayLike,
    kl_threshold: float = 0.05,
    activity_threshold: float = 0.01,
    max_collapsed_fraction: float = 0.5,
) -> CollapseReport:
    """The posterior-collapse diagnostic of an encoder's (μ(x), logvar(x)) over a data set.

    A dimension is collapsed when its KL is below `kl_threshold` nats (ε-collapse); the model is
    flagged when the collapsed share is at least `max_collapsed_fraction`.
    """
    if not kl_threshold > 0:
        raise ValueError(f"kl_threshold must be > 0 nats, got {kl_threshold!r}.")
    if not activity_threshold > 0:
        raise ValueError(f"activity_threshold must be > 0, got {activity_threshold!r}.")
    if not 0 < max_collapsed_fraction <= 1:
        raise ValueError(
            f"max_collapsed_fraction must lie in (0, 1], got {max_collapsed_fraction!r}."
        )
    kl = kl_per_dimension(mean, logvar)
    act = active_units(mean)
    collapsed_dims = kl < kl_threshold
    frac = jnp.mean(collapsed_dims.astype(jnp.float32))
    return CollapseReport(
        kl, act, collapsed_dims, act > activity_threshold, frac, frac >= max_collapsed_fraction
    )
