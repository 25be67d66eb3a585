"""Pruning masks: boolean pytrees, score → mask selection, and applying masks exactly.

Conventions (shared by every method in `feynkit.compression.prune`):

* A mask is a boolean array of its leaf's shape, ``True`` = keep, ``False`` = pruned.
* A mask tree has the structure of the parameter tree with ``None`` at the leaves that are not
  pruned (so ``jax.tree_util.tree_map(f, masks, params, is_leaf=lambda x: x is None)`` pairs
  them; `apply_masks` does that).
* Kernels are read in the Flax layout (d_in, d_out); an N-D kernel (a Conv's (kh, kw, c_in,
  c_out)) as its im2col matrix ``w.reshape(-1, d_out)``, exactly as `QuantRecipe` does. "Per
  output row" (the reference layout's row, Wanda's comparison group) is one output channel: a
  column of the Flax kernel, so ``granularity="row"`` ranks scores along axis 0.
* N:M: at most N nonzeros in every M consecutive inputs of one output channel (2:4 keeps 2 of
  each 4, the Ampere sparse-tensor-core pattern); groups run along axis 0, so M must divide d_in.
* A sparsity s prunes ⌊s·n⌋ entries of each comparison group of n entries (Wanda's and
  SparseGPT's rounding); ties are broken by position (a stable sort), so the count is exact.

References:
  Zhu & Gupta (2017), "To prune, or not to prune"; Mishra et al. (2021), "Accelerating Sparse
  Deep Neural Networks" (2:4); Lee et al. (2024), jaxpruner (masks in pytrees).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from feynkit.compression.quant.tree import path_str
from feynkit.core.types import Array, ArrayLike, PyTree
from feynkit.core.validation import fail_if

__all__ = [
    "GRANULARITIES",
    "apply_masks",
    "check_masks",
    "check_nm",
    "check_pattern",
    "check_sparsity",
    "is_nm_sparse",
    "kernel_matrix",
    "mask_sparsity",
    "nm_mask",
    "pattern_mask",
    "pattern_name",
    "sparse_storage_bits",
    "topk_mask",
]

GRANULARITIES = ("row", "layer")
"""Comparison groups of one kernel: each output channel ("row") or the whole kernel ("layer");
"global" (one threshold over every selected kernel) is a tree-level choice of `magnitude`."""


def _is_none(x) -> bool:
    return x is None


def check_sparsity(sparsity, name: str = "sparsity") -> None:
    """ValueError unless ``sparsity`` is a number in [0, 1) (a traced value passes)."""
    if isinstance(sparsity, jax.core.Tracer):
        return
    s = np.asarray(sparsity)
    if s.ndim != 0 or not np.issubdtype(s.dtype, np.number) or not 0 <= float(s) < 1:
        raise ValueError(
            f"{name}={sparsity!r} must be a number in [0, 1) (the fraction of weights set to "
            "zero; 1 would remove the layer)."
        )


def check_nm(n, m, size: int | None = None, name: str = "") -> None:
    """ValueError unless 1 ≤ n ≤ m are integers and m divides ``size`` (the input axis)."""
    where = f"{name}: " if name else ""
    ok = all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in (n, m))
    if not ok or not 1 <= n <= m:
        raise ValueError(
            f"{where}N:M = {n!r}:{m!r} needs integers 1 ≤ N ≤ M (N kept of every M, e.g. 2:4)."
        )
    if size is not None and size % m:
        raise ValueError(
            f"{where}M={m} does not divide the input axis of length {size}; use an M that "
            f"divides {size} or unstructured sparsity."
        )


def kernel_matrix(w: ArrayLike, name: str = "w") -> Array:
    """``w`` as its (d_in, d_out) matrix: Flax Dense kernels as they are, N-D kernels as
    ``w.reshape(-1, w.shape[-1])`` (im2col order)."""
    w = jnp.asarray(w)
    if w.ndim < 2:
        raise ValueError(f"{name}: shape {w.shape} is not a kernel (needs ≥ 2 axes).")
    return w.reshape(-1, w.shape[-1])


def _num_pruned(sparsity, n: int) -> Array:
    return jnp.floor(jnp.asarray(sparsity, jnp.float32) * n).astype(jnp.int32)


def _ranks(scores: Array, axis: int | None) -> Array:
    """Rank of every entry (0 = smallest) along ``axis`` (None: over the flattened array)."""
    flat = scores.reshape(-1) if axis is None else scores
    ax = 0 if axis is None else axis
    order = jnp.argsort(flat, axis=ax, stable=True)
    ranks = jnp.argsort(order, axis=ax, stable=True)
    return ranks.reshape(scores.shape)


def _pre(name: str) -> str:
    return f"{name}: " if name else ""


def _check_scores(scores: Array, name: str) -> None:
    fail_if(
        jnp.any(jnp.isnan(scores)),
        f"{_pre(name)}pruning scores contain NaN (NaN weights or calibration statistics); "
        "check the parameters and the calibration data.",
    )


def topk_mask(scores: ArrayLike, sparsity, *, granularity: str = "row", name: str = "") -> Array:
    """Keep mask of a 2-D score matrix (d_in, d_out): the ⌊s·n⌋ lowest scores of each
    comparison group are pruned.

    Args:
      scores: (d_in, d_out) importance scores (higher = keep), e.g. |W| or Wanda's |W|·‖X‖.
      sparsity: in [0, 1); may be traced (gradual pruning under ``jit``).
      granularity: "row" (each output channel, along axis 0) or "layer" (the whole matrix).
      name: the parameter's name for error messages.

    Returns:
      Boolean (d_in, d_out) mask, True = keep, with exactly ⌊s·n⌋ False per group.
    """
    scores = jnp.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"{_pre(name)}scores must be a (d_in, d_out) matrix, got {scores.shape}.")
    if granularity not in GRANULARITIES:
        raise ValueError(f"{_pre(name)}granularity={granularity!r}; use one of {GRANULARITIES}.")
    check_sparsity(sparsity)
    _check_scores(scores, name)
    if granularity == "row":
        return _ranks(scores, 0) >= _num_pruned(sparsity, scores.shape[0])
    return _ranks(scores, None) >= _num_pruned(sparsity, scores.size)


def nm_mask(scores: ArrayLike, n: int, m: int, *, name: str = "") -> Array:
    """Keep mask with N of every M consecutive inputs of each output channel (the N largest
    scores of the group; ties by position).

    Args:
      scores: (d_in, d_out) importance scores; M must divide d_in.
      n, m: N kept of every M (2:4, 4:8).

    Returns:
      Boolean (d_in, d_out) mask, exactly N True in every group of M along axis 0.
    """
    scores = jnp.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"{_pre(name)}scores must be a (d_in, d_out) matrix, got {scores.shape}.")
    check_nm(n, m, scores.shape[0], name)
    _check_scores(scores, name)
    d_in, d_out = scores.shape
    g = scores.reshape(d_in // m, m, d_out)
    return (_ranks(g, 1) >= m - n).reshape(d_in, d_out)


def check_pattern(sparsity, n, m) -> None:
    """ValueError unless the pattern is either unstructured (``sparsity`` in [0, 1), n = m =
    None) or N:M (both n and m given; ``sparsity`` then ignored)."""
    if (n is None) != (m is None):
        raise ValueError(f"give both n and m for N:M sparsity (e.g. n=2, m=4), got n={n}, m={m}.")
    if n is None:
        check_sparsity(sparsity)
    else:
        check_nm(n, m)


def pattern_name(sparsity, n, m) -> str:
    """ "50" for 50 % unstructured, "2:4" for N:M (used in recipe names)."""
    return f"{n}:{m}" if n is not None else f"{round(100 * float(sparsity)):d}"


def pattern_mask(
    scores: ArrayLike,
    sparsity=None,
    n: int | None = None,
    m: int | None = None,
    *,
    granularity: str = "row",
    name: str = "",
) -> Array:
    """`nm_mask` when n, m are given, else `topk_mask` at ``sparsity``."""
    if n is not None or m is not None:
        if n is None or m is None:
            raise ValueError(f"{_pre(name)}give both n and m for N:M sparsity, got n={n}, m={m}.")
        return nm_mask(scores, n, m, name=name)
    return topk_mask(scores, sparsity, granularity=granularity, name=name)


def is_nm_sparse(w: ArrayLike, n: int, m: int) -> bool:
    """Whether every group of M consecutive inputs of each output channel of the kernel matrix
    has at most N nonzeros."""
    w2 = kernel_matrix(w)
    check_nm(n, m, w2.shape[0])
    nz = (w2 != 0).reshape(w2.shape[0] // m, m, w2.shape[1]).sum(axis=1)
    return bool(jnp.all(nz <= n))


def check_masks(params: PyTree, masks: PyTree) -> None:
    """ValueError unless ``masks`` has the structure of ``params`` (None where unpruned) and
    every mask is boolean with its leaf's shape (the message names the path)."""
    from feynkit.compression.protocol import is_compressed

    p_def = jax.tree_util.tree_structure(params, is_leaf=is_compressed)
    m_leaves, m_def = jax.tree_util.tree_flatten(masks, is_leaf=_is_none)
    if m_def.num_leaves != p_def.num_leaves:
        raise ValueError(
            f"masks has {m_def.num_leaves} leaves (None included) but params has "
            f"{p_def.num_leaves}; build masks with the same structure (None for unpruned leaves)."
        )
    flat_p = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_compressed)[0]
    for (path, leaf), mask in zip(flat_p, m_leaves, strict=True):
        if mask is None:
            continue
        name = path_str(path)
        if jnp.shape(mask) != jnp.shape(leaf):
            raise ValueError(
                f"mask for {name} has shape {jnp.shape(mask)}; the parameter has shape "
                f"{jnp.shape(leaf)}."
            )
        if jnp.asarray(mask).dtype != jnp.bool_:
            raise ValueError(f"mask for {name} has dtype {jnp.asarray(mask).dtype}; use bool.")


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """``params`` with every masked-out entry set to exactly 0 (shapes and dtypes kept).

    Args:
      params: parameter tree (float leaves where masks are not None).
      masks: boolean tree of the same structure, None where a leaf is not pruned.

    Raises:
      ValueError: structure, shape or dtype mismatch (naming the parameter path).
    """
    check_masks(params, masks)

    def one(mask, w):
        return w if mask is None else jnp.where(mask, w, jnp.zeros((), jnp.asarray(w).dtype))

    return jax.tree_util.tree_map(one, masks, params, is_leaf=_is_none)


def mask_sparsity(masks: PyTree) -> float:
    """Fraction of pruned entries over all masks of the tree (None leaves ignored)."""
    leaves = [m for m in jax.tree_util.tree_leaves(masks) if m is not None]
    total = sum(int(np.size(m)) for m in leaves)
    if total == 0:
        raise ValueError("masks holds no mask (every leaf is None).")
    return 1.0 - sum(int(jnp.sum(m)) for m in leaves) / total


def sparse_storage_bits(
    leaf, mask: ArrayLike, *, n: int | None = None, m: int | None = None, value_bits: int = 16
) -> int:
    """Bits to store a pruned leaf sparsely: the kept values plus the index metadata.

    Values: ``value_bits`` each for a float leaf (16: bf16), or a `QuantizedArray`'s code width
    plus its side arrays (scales, zero points) for a quantized one. Indices: ⌈log₂ M⌉ bits per
    kept value for N:M (2 bits for 2:4, the sparse-tensor-core metadata), else a 1-bit bitmap
    per entry.
    """
    from feynkit.compression.protocol import is_compressed

    mask = np.asarray(mask, bool)
    nnz = int(mask.sum())
    if is_compressed(leaf):
        bits = int(leaf.bits)
        values = nnz * bits + (int(leaf.nbits) - int(leaf.size) * bits)  # + scales, zeros
    else:
        values = nnz * int(value_bits)
    index = nnz * int(np.ceil(np.log2(m))) if n is not None else mask.size
    return values + index
