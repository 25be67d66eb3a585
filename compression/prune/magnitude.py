"""Magnitude pruning: keep the largest |w| per output channel, per layer, or over all layers.

    unstructured:  prune the ⌊s·n⌋ smallest |w_ij| of each comparison group (an output
                   channel, the whole kernel, or every selected kernel together: "global");
    N:M:           keep the N largest |w| of every M consecutive inputs of an output channel.

References:
  Han et al. (2015), "Learning both Weights and Connections for Efficient Neural Networks";
  Zhu & Gupta (2017), "To prune, or not to prune"; Mishra et al. (2021) (2:4).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

from feynkit.compression.prune.masks import (
    _check_scores,
    _num_pruned,
    _ranks,
    check_pattern,
    kernel_matrix,
    pattern_mask,
    pattern_name,
)
from feynkit.compression.prune.recipe import PruneRecipe
from feynkit.compression.quant.quant_recipe import _where
from feynkit.compression.quant.tree import ALL_KERNELS
from feynkit.core.types import Array, ArrayLike

__all__ = ["global_magnitude_masks", "magnitude_mask", "magnitude_recipe"]

MAGNITUDE_GRANULARITIES = ("row", "layer", "global")


def magnitude_mask(
    w: ArrayLike,
    sparsity=0.5,
    *,
    n: int | None = None,
    m: int | None = None,
    granularity: str = "row",
) -> Array:
    """Keep mask of the largest-magnitude weights of one kernel (shape of ``w``).

    Args:
      w: a kernel, (d_in, d_out) or N-D (read as its im2col matrix).
      sparsity: fraction pruned in each group, in [0, 1) (ignored for N:M); may be traced.
      n, m: N:M pattern along the input axis instead (e.g. 2, 4).
      granularity: "row" (each output channel) or "layer" (the whole kernel).

    Returns:
      Boolean mask of ``w``'s shape, True = keep.
    """
    w = jnp.asarray(w)
    w2 = kernel_matrix(w)
    return pattern_mask(jnp.abs(w2), sparsity, n, m, granularity=granularity).reshape(w.shape)


def global_magnitude_masks(kernels: Sequence[ArrayLike], sparsity) -> list[Array]:
    """Masks pruning the ⌊s·Σn⌋ smallest |w| over all ``kernels`` together (one threshold).

    Returns:
      One boolean mask per kernel, of its shape.
    """
    ws = [jnp.asarray(w) for w in kernels]
    if not ws:
        raise ValueError("global magnitude pruning needs at least one kernel.")
    flat = jnp.concatenate([jnp.abs(w).reshape(-1) for w in ws])
    _check_scores(flat, "global magnitude scores")
    keep = _ranks(flat, None) >= _num_pruned(sparsity, flat.size)
    out, i = [], 0
    for w in ws:
        out.append(keep[i : i + w.size].reshape(w.shape))
        i += w.size
    return out


def magnitude_recipe(
    sparsity: float = 0.5,
    *,
    n: int | None = None,
    m: int | None = None,
    granularity: str = "row",
    where: str | Sequence[str] | None = ALL_KERNELS,
) -> PruneRecipe:
    """Magnitude pruning of the selected kernels (no calibration).

    Args:
      sparsity: fraction pruned, in [0, 1) (ignored when n, m are given).
      n, m: N:M semi-structured pattern (2:4, 4:8) instead of unstructured.
      granularity: "row" (per output channel, as Wanda compares), "layer" or "global"
        (one threshold over all selected kernels; unstructured only).
      where: regexes over parameter paths (None: every kernel).

    Returns:
      A `PruneRecipe`; ``recipe(params)`` returns ``(pruned_params, masks)``.
    """
    check_pattern(sparsity, n, m)
    if granularity not in MAGNITUDE_GRANULARITIES:
        raise ValueError(
            f"granularity={granularity!r}; use one of {MAGNITUDE_GRANULARITIES} (output "
            "channel, layer, or one threshold over all selected kernels)."
        )
    if granularity == "global" and n is not None:
        raise ValueError("granularity='global' is unstructured; drop n, m or use 'row'.")
    prepare = None
    if granularity == "global":

        def prepare(mats):
            return global_magnitude_masks(mats, sparsity)

    def prune(w, stats, i, ctx):
        mask = (
            ctx[i]
            if ctx is not None
            else magnitude_mask(w, sparsity, n=n, m=m, granularity=granularity)
        )
        return jnp.where(mask, w, jnp.zeros((), w.dtype)), mask

    name = f"magnitude{pattern_name(sparsity, n, m)}" + (
        f"_{granularity}" if granularity != "row" and n is None else ""
    )
    return PruneRecipe(name, prune, _where(where), prepare=prepare)
