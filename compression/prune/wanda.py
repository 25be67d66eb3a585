"""Wanda: prune by |W| times the input-activation norm, compared within each output channel.

For a linear layer with calibration inputs X (rows x of the layer's input), Wanda scores

    S_ij = |W_ij| · ‖X_j‖₂        (j: input feature, i: output channel)

and removes the lowest scores of each output channel (the paper's per-output comparison group),
or the N:M pattern on those scores, with no weight update. ‖X_j‖₂² is read from the diagonal of
the calibration Hessian H = 2/N Σ x xᵀ (`calibrate`): diag H = (2/N) ‖X_j‖², and the constant
factor does not change a per-output ranking.

References:
  Sun, Liu, Bair & Kolter (2024), "A Simple and Effective Pruning Approach for Large Language
  Models" (Wanda), Eq. 1 and Section 3.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

from feynkit.compression.prune.masks import check_pattern, pattern_mask, pattern_name
from feynkit.compression.prune.recipe import PruneRecipe
from feynkit.compression.quant.quant_recipe import _where
from feynkit.compression.quant.tree import ALL_KERNELS
from feynkit.core.types import Array, ArrayLike

__all__ = ["wanda_mask", "wanda_recipe", "wanda_scores"]


def wanda_scores(w: ArrayLike, input_sq_norms: ArrayLike) -> Array:
    """|W| · ‖X_j‖₂ for a (d_in, d_out) kernel and the (d_in,) squared input norms (or any
    positive multiple of them, e.g. diag H)."""
    w = jnp.asarray(w)
    x2 = jnp.asarray(input_sq_norms, jnp.promote_types(w.dtype, jnp.float32))
    if w.ndim != 2 or x2.shape != (w.shape[0],):
        raise ValueError(
            f"input norms of shape {x2.shape} do not fit the kernel {w.shape}; expected "
            f"({w.shape[0]},) (one per input feature)."
        )
    return jnp.abs(w) * jnp.sqrt(jnp.maximum(x2, 0.0))[:, None]


def wanda_mask(
    w: ArrayLike,
    input_sq_norms: ArrayLike,
    sparsity=0.5,
    *,
    n: int | None = None,
    m: int | None = None,
) -> Array:
    """Wanda's keep mask of a (d_in, d_out) kernel: per output channel (unstructured) or N:M."""
    return pattern_mask(wanda_scores(w, input_sq_norms), sparsity, n, m, granularity="row")


def wanda_recipe(
    sparsity: float = 0.5,
    *,
    n: int | None = None,
    m: int | None = None,
    where: str | Sequence[str] | None = ALL_KERNELS,
) -> PruneRecipe:
    """Wanda pruning of the selected kernels (needs calibration Hessians; only their diagonal
    is read).

    Args:
      sparsity: fraction pruned per output channel, in [0, 1) (ignored for N:M).
      n, m: N:M semi-structured pattern (2:4, 4:8) along the input axis.
      where: regexes over parameter paths (None: every kernel).
    """
    check_pattern(sparsity, n, m)

    def prune(w, stats, i, ctx):
        mask = wanda_mask(w, jnp.diagonal(stats.hessian), sparsity, n=n, m=m)
        return jnp.where(mask, w, jnp.zeros((), w.dtype)), mask

    return PruneRecipe(
        f"wanda{pattern_name(sparsity, n, m)}", prune, _where(where), True, ("hessian",)
    )
