"""Quantize the leaves of a parameter pytree selected by regex over their '/'-joined paths.

Paths are the dictionary keys joined by '/', e.g. ``layers_0/self_attn/q_proj/kernel`` for
`feynkit.models.transformer.TransformerLM`. Every pattern must fully match at least one leaf
(big_vision's ``make_mask_trees`` check), so a typo fails loudly instead of quantizing nothing.

The reference execution path is dequantize-on-use: `quantized_apply(forward)` turns
``forward(params, *args)`` into ``forward_q(qparams, *args)`` that dequantizes inside (under the
caller's ``jit`` the dequantization is fused into the forward pass).

References:
  Frantar et al. (2023), "GPTQ"; Dettmers et al. (2022), "LLM.int8()" (weight-only, per-group).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from feynkit.compression.quant.qarray import (
    MAX_BITS,
    MIN_BITS,
    QuantizedArray,
    dequantize,
    quantize,
)
from feynkit.core.types import Array, PyTree

__all__ = [
    "LINEAR_KERNELS",
    "QuantRecipe",
    "dequantize_tree",
    "is_quantized",
    "map_matching",
    "match_paths",
    "path_str",
    "quantize_tree",
    "quantized_apply",
    "tree_nbytes",
    "tree_paths",
]

LINEAR_KERNELS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"
"""The attention and MLP kernels of `TransformerLM` (embeddings, norms and lm_head excluded)."""


@dataclasses.dataclass(frozen=True)
class QuantRecipe:
    """How to quantize a selected weight (see `feynkit.compression.quant.quantize`).

    Attributes:
      bits: 2..8. group_size: group length along ``axis`` (None: per output channel).
      symmetric: signed codes without zero point. axis: reduction axis (0 for Flax kernels).
      per_tensor: one scale per array (group_size ignored).
    """

    bits: int = 4
    group_size: int | None = None
    symmetric: bool = True
    axis: int = 0
    per_tensor: bool = False

    def __post_init__(self):
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"QuantRecipe.bits={self.bits!r}: allowed are {MIN_BITS}..{MAX_BITS}.")
        if self.group_size is not None and (
            not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise ValueError(
                f"QuantRecipe.group_size={self.group_size!r}: a positive integer or None."
            )


def is_quantized(x) -> bool:
    """True for a `QuantizedArray` (use as ``is_leaf`` in tree maps)."""
    return isinstance(x, QuantizedArray)


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
    """The '/'-joined paths of the leaves of ``tree`` (QuantizedArray counts as a leaf)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]
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

    return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=is_quantized)


def quantize_tree(
    params: PyTree,
    recipe: QuantRecipe,
    where: str | Sequence[str] = LINEAR_KERNELS,
    *,
    quantizer: Callable[[Array], QuantizedArray] | None = None,
) -> PyTree:
    """``params`` with every leaf matching ``where`` replaced by its `QuantizedArray`.

    Args:
      params: a parameter pytree (nested dicts, as Flax returns).
      recipe: bits, group size, symmetry and axis for round-to-nearest.
      where: regex (or list) over '/'-joined paths; each must match at least one leaf.
      quantizer: optional ``w -> QuantizedArray`` used instead of round-to-nearest.

    Returns:
      The same tree structure with QuantizedArray leaves at the selected paths.

    Raises:
      ValueError: unmatched pattern, or bad recipe for a leaf (the message names its path).
    """

    def quant(path, w):
        try:
            if quantizer is not None:
                return quantizer(w)
            return quantize(
                w,
                recipe.bits,
                group_size=recipe.group_size,
                axis=recipe.axis,
                symmetric=recipe.symmetric,
                per_tensor=recipe.per_tensor,
            )
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    return map_matching(quant, params, where)


def dequantize_tree(tree: PyTree) -> PyTree:
    """Every `QuantizedArray` leaf replaced by its dequantized array; other leaves unchanged."""
    return jax.tree_util.tree_map(
        lambda x: dequantize(x) if is_quantized(x) else x, tree, is_leaf=is_quantized
    )


def quantized_apply(forward: Callable[..., object]) -> Callable[..., object]:
    """``forward(params, *args, **kw)`` → ``f(qparams, *args, **kw)`` that dequantizes inside.

    E.g. ``quantized_apply(model.forward)(qparams, tokens)`` for a `TransformerLM`.
    """

    def apply(qparams, *args, **kwargs):
        return forward(dequantize_tree(qparams), *args, **kwargs)

    return apply


def tree_nbytes(tree: PyTree, *, float_dtype=None) -> int:
    """Bytes of all leaves: `QuantizedArray.nbytes` for quantized ones, ``size·itemsize`` else.

    Args:
      tree: a (partly) quantized parameter tree.
      float_dtype: if given, count unquantized floating leaves as stored in this dtype (e.g.
        ``jnp.bfloat16`` for the bf16 baseline).
    """
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_quantized):
        if is_quantized(leaf):
            total += leaf.nbytes
            continue
        dtype = np.dtype(leaf.dtype)
        if float_dtype is not None and jnp.issubdtype(dtype, jnp.floating):
            dtype = np.dtype(float_dtype)
        total += int(np.prod(np.shape(leaf), dtype=np.int64)) * dtype.itemsize
    return total
