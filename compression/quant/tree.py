"""Parameter pytrees with compressed leaves: path selection and the tree functions.

Paths are the dictionary keys joined by '/', e.g. ``layers_0/self_attn/q_proj/kernel`` for
`feynkit.models.transformer.TransformerLM`. Every pattern must fully match at least one leaf
(big_vision's ``make_mask_trees`` check), so a typo fails loudly instead of quantizing nothing.
Every compressed container (`feynkit.compression.protocol`) is a leaf here, so
`dequantize_tree`, `tree_nbytes` and `tree_bits_per_weight` treat all of them alike; a
`QuantRecipe` (`feynkit.compression.quant.recipes`) compresses the selected leaves, and
`compressed_apply` (`feynkit.compression.quant.apply`) runs a model's own ``apply`` on the
result.

References:
  Frantar et al. (2023), "GPTQ"; Dettmers et al. (2022), "LLM.int8()" (weight-only, per-group).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from feynkit.compression.protocol import is_compressed
from feynkit.core.types import Array, PyTree

__all__ = [
    "ALL_KERNELS",
    "LINEAR_KERNELS",
    "dequantize_tree",
    "is_compressed",
    "is_quantized",
    "map_matching",
    "match_paths",
    "path_str",
    "quantize_tree",
    "tree_bits_per_weight",
    "tree_nbytes",
    "tree_paths",
]

LINEAR_KERNELS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"
"""The attention and MLP kernels of `TransformerLM` (embeddings, norms and lm_head excluded)."""

ALL_KERNELS = r"(.*/)?kernel"
"""Every leaf named ``kernel``: all Dense and Conv kernels of a Flax model."""


def is_quantized(x) -> bool:
    """Alias of `is_compressed` (any compressed container)."""
    return is_compressed(x)


def path_str(path: Sequence) -> str:
    """'/'-join a `jax.tree_util` key path (dict keys, attribute names, sequence indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def tree_paths(tree: PyTree) -> list[str]:
    """The '/'-joined paths of the leaves of ``tree`` (a compressed container is one leaf)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_compressed)[0]
    return [path_str(p) for p, _ in leaves]


def match_paths(tree: PyTree, where: str | Sequence[str]) -> list[str]:
    """Paths of ``tree`` that fully match one of the regexes ``where``.

    Raises:
      ValueError: a pattern matches no leaf (the message lists some available paths).
    """
    patterns = [where] if isinstance(where, str) else list(where)
    if not patterns:
        raise ValueError("where is empty: give at least one regex over '/'-joined paths.")
    paths = tree_paths(tree)
    selected = set()
    for pat in patterns:
        hits = [p for p in paths if re.fullmatch(pat, p)]
        if not hits:
            raise ValueError(
                f"where pattern {pat!r} matches no parameter path; available paths include: "
                f"{paths[:12]}{' …' if len(paths) > 12 else ''}"
            )
        selected.update(hits)
    return [p for p in paths if p in selected]


def map_matching(
    fn: Callable[[str, Array], object], tree: PyTree, where: str | Sequence[str]
) -> PyTree:
    """Replace each leaf whose path matches ``where`` by ``fn(path, leaf)``; others unchanged."""
    selected = set(match_paths(tree, where))

    def visit(path, leaf):
        p = path_str(path)
        return fn(p, leaf) if p in selected else leaf

    return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=is_compressed)


def quantize_tree(
    params: PyTree,
    recipe: Callable[..., PyTree],
    where: str | Sequence[str] | None = None,
    *,
    calibration=None,
) -> PyTree:
    """``recipe(params, calibration)``, optionally on other paths than the recipe's own.

    Args:
      params: a parameter pytree (nested dicts, as Flax returns).
      recipe: a `QuantRecipe` (e.g. ``rtn_recipe(bits=4, group_size=64)``).
      where: regex (or list) over '/'-joined paths replacing ``recipe.where``; each pattern
        must match at least one leaf.
      calibration: statistics from `calibrate` when ``recipe.needs_calibration``.

    Returns:
      The same tree structure with compressed leaves at the selected paths.

    Raises:
      ValueError: unmatched pattern, missing calibration, a selected leaf already compressed,
        or a bad setting for a leaf (the message names its path).
    """
    if not callable(recipe) or not hasattr(recipe, "needs_calibration"):
        raise ValueError(
            f"recipe must be a QuantRecipe (e.g. rtn_recipe(bits=4)), got {type(recipe).__name__}."
        )
    if where is not None:
        recipe = recipe.with_where(where)
    return recipe(params, calibration)


def dequantize_tree(tree: PyTree) -> PyTree:
    """Every compressed leaf replaced by ``leaf.dequantize()``; float leaves unchanged."""
    return jax.tree_util.tree_map(
        lambda x: x.dequantize() if is_compressed(x) else x, tree, is_leaf=is_compressed
    )


def _leaf_bits(leaf, float_dtype) -> tuple[int, int]:
    """(storage bits, represented values) of one leaf."""
    if is_compressed(leaf):
        return int(leaf.nbits), leaf.size
    dtype = np.dtype(leaf.dtype)
    if float_dtype is not None and jnp.issubdtype(dtype, jnp.floating):
        dtype = np.dtype(float_dtype)
    n = int(np.prod(np.shape(leaf), dtype=np.int64))
    return n * dtype.itemsize * 8, n


def tree_nbytes(tree: PyTree, *, float_dtype=None) -> int:
    """Bytes of all leaves: ``nbytes`` for compressed ones, ``size·itemsize`` for arrays.

    Args:
      tree: a (partly) compressed parameter tree.
      float_dtype: if given, count uncompressed floating leaves as stored in this dtype (e.g.
        ``jnp.bfloat16`` for the bf16 baseline).
    """
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_compressed):
        total += leaf.nbytes if is_compressed(leaf) else _leaf_bits(leaf, float_dtype)[0] // 8
    return total


def tree_bits_per_weight(
    tree: PyTree, where: str | Sequence[str] | None = None, *, float_dtype=None
) -> float:
    """Average storage bits per value over the selected leaves, Σ bits / Σ values.

    Args:
      tree: a (partly) compressed parameter tree.
      where: regexes over paths (each must match); None: every compressed leaf.
      float_dtype: count selected float leaves in this dtype (default: their own).

    Raises:
      ValueError: nothing selected (``where`` None and no compressed leaf).
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_compressed)[0]
    if where is None:
        chosen = [leaf for _, leaf in leaves if is_compressed(leaf)]
        if not chosen:
            raise ValueError("tree_bits_per_weight: the tree has no compressed leaf; pass where=.")
    else:
        selected = set(match_paths(tree, where))
        chosen = [leaf for p, leaf in leaves if path_str(p) in selected]
    bits, values = map(sum, zip(*(_leaf_bits(x, float_dtype) for x in chosen), strict=True))
    return bits / max(values, 1)
