"""`PruneRecipe` and `prune_tree`: a pruning method bound to its settings and parameter paths.

``pruned, masks = recipe(params, calibration)`` selects leaves with the same regex path filter as
`QuantRecipe` / `quantize_tree` (`feynkit.compression.quant.tree.match_paths`: every pattern must
match a leaf), reads the same calibration (`calibrate`: Hessians H = 2/N Σ x xᵀ, whose diagonal
gives Wanda's ‖X_j‖₂² up to a constant), and prunes each selected kernel as its (d_in, d_out)
matrix. Methods that only choose a mask (magnitude, Wanda) return the masked weights; methods that
also move weights (SparseGPT, oBERT) return reconstructed weights with exact zeros where the mask
is False (or a quantized container for SparseGPT's joint sparsity + quantization).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from feynkit.compression.protocol import ReshapedKernel, is_compressed
from feynkit.compression.quant.quant_recipe import LeafStats, _as_calibration, _leaf_stats, _where
from feynkit.compression.quant.tree import ALL_KERNELS, match_paths, path_str
from feynkit.core.types import Array, PyTree

__all__ = [
    "FisherCalibration",
    "GradientStats",
    "PruneRecipe",
    "PruneResult",
    "prune_layerwise",
    "prune_tree",
]


class FisherCalibration(NamedTuple):
    """Per-kernel gradients for empirical-Fisher methods (oBERT): path → (m, *kernel shape),
    one gradient per calibration mini-batch (`collect_gradients`)."""

    gradients: dict[str, Array]
    num_samples: int


class PruneResult(NamedTuple):
    """``params``: the pruned tree (same structure); ``masks``: boolean keep-masks of the
    pruned leaves' shapes, None at the others (see `feynkit.compression.prune.masks`)."""

    params: PyTree
    masks: PyTree


# (w (d_in, d_out), stats, leaf index, context) -> (new leaf (d_in, d_out) or container, keep mask)
LeafPrune = Callable[[Array, LeafStats, int, Any], tuple[Any, Array]]


@dataclasses.dataclass(frozen=True)
class PruneRecipe:
    """A pruning method bound to its settings and the paths it applies to.

    Attributes:
      name: for reports and configs (e.g. "sparsegpt50", "wanda_2:4").
      prune: ``(w (d_in, d_out), stats, leaf_index, context) -> (leaf, keep_mask)``.
      where: regexes over '/'-joined paths (None → `ALL_KERNELS`); each must match a leaf.
      needs_calibration: whether ``__call__`` requires a `Calibration`.
      stats: the calibration statistics read, a subset of ("hessian", "absmax").
      prepare: optional ``(list of selected (d_in, d_out) matrices) -> context`` run once over
        all selected kernels before the leaves are pruned (global magnitude thresholds).
    """

    name: str
    prune: LeafPrune = dataclasses.field(repr=False)
    where: str | tuple[str, ...] = ALL_KERNELS
    needs_calibration: bool = False
    stats: tuple[str, ...] = ()
    prepare: Callable[[list[Array]], Any] | None = dataclasses.field(default=None, repr=False)

    def with_where(self, where: str | Sequence[str]) -> PruneRecipe:
        """The same recipe on other paths."""
        return dataclasses.replace(self, where=_where(where))

    def __call__(self, params: PyTree, calibration=None) -> PruneResult:
        """Prune every selected leaf; see `prune_tree`."""
        fisher = calibration if isinstance(calibration, FisherCalibration) else None
        if "gradients" in self.stats:
            if fisher is None:
                raise ValueError(
                    f"recipe {self.name!r} needs per-batch gradients; pass calibration="
                    "collect_gradients(loss_fn, params, batches, where=recipe.where)."
                )
            calib = None
        else:
            if fisher is not None:
                raise ValueError(
                    f"recipe {self.name!r} reads Hessians, not gradients; pass "
                    "calibration=calibrate(apply_fn, params, inputs, where=recipe.where)."
                )
            calib = _as_calibration(calibration)
        if self.needs_calibration and calib is None and fisher is None:
            raise ValueError(
                f"recipe {self.name!r} needs calibration statistics ({', '.join(self.stats)}); "
                "pass calibration=calibrate(apply_fn, params, inputs, where=recipe.where)."
            )
        selected = match_paths(params, self.where)
        flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_compressed)
        leaves = {path_str(p): leaf for p, leaf in flat}
        mats = {}
        for path in selected:
            w = leaves[path]
            if is_compressed(w):
                raise ValueError(
                    f"{path}: already compressed ({type(w).__name__}); prune the float params "
                    "first, then quantize, or leave this path out of `where`."
                )
            w = jnp.asarray(w)
            if not jnp.issubdtype(w.dtype, jnp.floating):
                raise ValueError(f"{path}: dtype {w.dtype} is not floating; exclude it.")
            if w.ndim < 2:
                raise ValueError(
                    f"{path}: shape {w.shape} is not a kernel (needs ≥ 2 axes); restrict "
                    "`where` to Dense/Conv kernels, e.g. r'(.*/)?kernel'."
                )
            mats[path] = w.reshape(-1, w.shape[-1])
        ctx = self.prepare(list(mats.values())) if self.prepare is not None else None
        new_leaves, masks = [], []
        for p, leaf in flat:
            path = path_str(p)
            if path not in mats:
                new_leaves.append(leaf)
                masks.append(None)
                continue
            w2 = mats[path]
            stats = (
                _leaf_stats(self, calib, path, w2)
                if fisher is None
                else _grad_stats(fisher, path, w2)
            )
            try:
                out, mask = self.prune(w2, stats, selected.index(path), ctx)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from e
            shape = tuple(jnp.shape(leaf))
            if is_compressed(out):
                out = ReshapedKernel(out, shape) if tuple(out.shape) != shape else out
            else:
                out = jnp.asarray(out, jnp.asarray(leaf).dtype).reshape(shape)
            new_leaves.append(out)
            masks.append(jnp.asarray(mask, jnp.bool_).reshape(shape))
        return PruneResult(
            jax.tree_util.tree_unflatten(treedef, new_leaves),
            jax.tree_util.tree_unflatten(treedef, masks),
        )


class GradientStats(NamedTuple):
    """What an empirical-Fisher recipe's ``prune`` receives: (m, d_in, d_out) gradients."""

    gradients: Array


def _grad_stats(fisher: FisherCalibration, path: str, w2: Array):
    if path not in fisher.gradients:
        raise ValueError(
            f"no gradients for {path}; they cover {sorted(fisher.gradients)[:6]} — collect them "
            "with the recipe's where."
        )
    g = jnp.asarray(fisher.gradients[path])
    if g.ndim < 2 or g.shape[1:] != w2.shape and int(np.prod(g.shape[1:])) != w2.size:
        raise ValueError(f"{path}: gradients {g.shape} do not fit the kernel {w2.shape}.")
    return GradientStats(g.reshape(g.shape[0], *w2.shape))


def prune_tree(
    params: PyTree,
    recipe: PruneRecipe,
    where: str | Sequence[str] | None = None,
    *,
    calibration=None,
) -> PruneResult:
    """``recipe(params, calibration)``, optionally on other paths than the recipe's own.

    Args:
      params: a float parameter pytree (nested dicts, as Flax returns).
      recipe: a `PruneRecipe` (e.g. ``magnitude_recipe(0.5)``, ``sparsegpt_recipe(n=2, m=4)``).
      where: regex (or list) over '/'-joined paths replacing ``recipe.where``, selected exactly
        as by `quantize_tree`; each pattern must match at least one leaf.
      calibration: statistics from `calibrate` when ``recipe.needs_calibration``.

    Returns:
      `PruneResult` ``(params, masks)``: the same tree structure with pruned leaves (exact zeros
      where the mask is False, shapes and dtypes kept) and the boolean keep-masks (None at
      unselected leaves).

    Raises:
      ValueError: unmatched pattern, missing calibration, a selected leaf that is compressed or
        not a float kernel, a bad setting or NaN scores for a leaf (the message names its path).
    """
    if not isinstance(recipe, PruneRecipe):
        raise ValueError(
            f"recipe must be a PruneRecipe (e.g. magnitude_recipe(0.5)), got "
            f"{type(recipe).__name__}."
        )
    if where is not None:
        recipe = recipe.with_where(where)
    return recipe(params, calibration)


def prune_layerwise(
    recipe: PruneRecipe,
    apply_fn: Callable,
    params: PyTree,
    inputs,
    layers: Sequence[str],
    *,
    batch_size: int | None = 8,
) -> PruneResult:
    """Prune one layer at a time, calibrating each on the model with the earlier layers pruned.

    For each regex in ``layers`` (e.g. ``r"layers_0/.*"``, in forward order) the recipe's
    selected kernels inside it are calibrated with `calibrate` on ``apply_fn(params_so_far,
    *inputs)`` and pruned, so a layer sees the inputs the pruned layers before it produce (the
    sequential scheme of the SparseGPT and Wanda reference code). Selection and errors as in
    `prune_tree`.

    Returns:
      `PruneResult` of the whole tree (masks of every pruned leaf).
    """
    from feynkit.compression.layerwise import compress_layerwise

    if "gradients" in recipe.stats:
        raise ValueError(f"recipe {recipe.name!r} reads gradients; use prune_tree.")
    params, steps = compress_layerwise(
        recipe,
        apply_fn,
        params,
        inputs,
        layers,
        batch_size=batch_size,
        split=lambda r: (r.params, r.masks),
    )
    masks = steps[0]
    for new in steps[1:]:
        masks = jax.tree_util.tree_map(
            lambda a, b: b if a is None else a, masks, new, is_leaf=lambda x: x is None
        )
    return PruneResult(params, masks)
