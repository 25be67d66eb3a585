"""DARE: drop-and-rescale of fine-tune deltas, merging of fine-tunes (Super Mario), DAREx-q.

A fine-tune θ_ft of a base θ_0 is the base plus its delta (task vector) δ = θ_ft − θ_0. DARE
keeps each delta entry independently with probability 1 − p and rescales the survivors,

    δ̂ = m ⊙ δ / q,   m_i ~ Bernoulli(1 − p),   q = 1 − p   (so E[δ̂] = δ),

and the pruned model is θ_0 + δ̂. Merging K fine-tunes of one base (the Super Mario recipe) adds
their DARE'd deltas with weights λ_k: θ = θ_0 + Σ_k λ_k δ̂_k (λ_k = 1/K: parameter averaging;
λ_k = 1: task arithmetic).

DAREx-q (DARE the eXtreme) replaces the rescaling 1/(1 − p), which blows up at large p, by 1/q
with q ≥ 1 − p chosen on held-out data: with the drop mask fixed, q is searched over a grid to
minimise a validation objective (the paper uses a labelled metric, or unlabelled, the change of
the final outputs against the fine-tuned model) — `darex_q_search`. The per-layer analytical q of
the paper's DAREx-q variant (from a concentration bound on ⟨δ̂ − δ, x⟩) is not implemented.

References:
  Yu et al. (2024), "Language Models are Super Mario: Absorbing Abilities from Homologous Models
  as a Free Lunch" (DARE, Eq. 1-2; merging by averaging and task arithmetic);
  Deng et al. (2025), "DARE the Extreme: Revisiting Delta-Parameter Pruning For Fine-Tuned
  Models" (DAREx-q: rescale 1/q, q searched on validation data).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from feynkit.compression.quant.tree import match_paths, path_str
from feynkit.core.types import Key, PyTree

__all__ = [
    "dare",
    "dare_delta",
    "dare_merge",
    "darex_q_search",
    "delta_masks",
    "merge_deltas",
    "task_vector",
]


def _check_rate(drop_rate) -> float:
    if isinstance(drop_rate, jax.core.Tracer):
        raise ValueError(
            "drop_rate must be a concrete float in [0, 1), not a traced value; mark it static "
            "under jit (jax.jit(..., static_argnames='drop_rate'))."
        )
    p = float(drop_rate)
    if not 0.0 <= p < 1.0 or math.isnan(p):
        raise ValueError(
            f"drop_rate must lie in [0, 1), got {drop_rate!r}; it is the fraction "
            "of delta entries dropped (0.9 drops 90%)."
        )
    return p


def _check_q(q, p: float) -> float | None:
    if q is None:
        return None
    if isinstance(q, jax.core.Tracer):
        return q  # a traced q (a jitted q sweep): the caller validates the grid eagerly
    q = float(q)
    if not 0.0 < q <= 1.0 or math.isnan(q):
        raise ValueError(f"q must lie in (0, 1], got {q!r}: survivors are rescaled by 1/q.")
    return q


def _check_same_structure(a: PyTree, b: PyTree, names: str) -> None:
    ta, tb = jax.tree.structure(a), jax.tree.structure(b)
    if ta != tb:
        raise ValueError(f"{names} must have the same tree structure; got {ta} and {tb}.")
    for (path, x), y in zip(
        jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True
    ):
        if jnp.shape(x) != jnp.shape(y):
            raise ValueError(
                f"{names} differ in shape at {path_str(path)!r}: {jnp.shape(x)} vs {jnp.shape(y)}."
            )


def task_vector(base: PyTree, finetuned: PyTree) -> PyTree:
    """δ = θ_ft − θ_0, leaf by leaf (the trees must match in structure and shapes)."""
    _check_same_structure(base, finetuned, "base and finetuned")
    return jax.tree.map(lambda b, f: jnp.asarray(f) - jnp.asarray(b), base, finetuned)


def _selected(tree: PyTree, where) -> set[str] | None:
    return None if where is None else set(match_paths(tree, where))


def delta_masks(key: Key, delta: PyTree, drop_rate: float, where=None) -> PyTree:
    """Keep-masks m_i ~ Bernoulli(1 − drop_rate), one independent draw per entry and leaf
    (leaf j uses ``fold_in(key, j)``); leaves outside `where` keep everything (all True)."""
    p = _check_rate(drop_rate)
    chosen = _selected(delta, where)
    flat, treedef = jax.tree_util.tree_flatten_with_path(delta)
    masks = []
    for j, (path, leaf) in enumerate(flat):
        shape = jnp.shape(leaf)
        if chosen is not None and path_str(path) not in chosen:
            masks.append(jnp.ones(shape, bool))
        else:
            masks.append(jax.random.bernoulli(jax.random.fold_in(key, j), 1.0 - p, shape))
    return jax.tree.unflatten(treedef, masks)


def dare_delta(
    key: Key,
    delta: PyTree,
    drop_rate: float,
    *,
    rescale: bool = True,
    q: float | None = None,
    where: str | Sequence[str] | None = None,
) -> PyTree:
    """DARE on a task vector: δ̂ = m ⊙ δ / q with m ~ Bernoulli(1 − p) per entry.

    Args:
      key: PRNG key of the drop masks.
      delta: the task vector δ (a pytree of arrays).
      drop_rate: p in [0, 1), the fraction of entries dropped (concrete, static under jit).
      rescale: divide the survivors by q (False: drop only, q = 1).
      q: the rescaling denominator (default 1 − p, DARE's unbiased choice; DAREx-q: a larger q
        in (1 − p, 1] found by `darex_q_search`).
      where: regexes over '/'-joined paths of the leaves to prune (default: every leaf); the
        other leaves keep their full delta.

    Returns:
      δ̂, the same structure and dtypes as `delta`; dropped entries are exactly zero.

    References:
      Yu et al. (2024), "Language Models are Super Mario", Eq. (1)-(2); Deng et al. (2025),
      "DARE the Extreme" (rescaling by 1/q).
    """
    p = _check_rate(drop_rate)
    q = _check_q(q, p)
    q = (1.0 - p if q is None else q) if rescale else 1.0
    masks = delta_masks(key, delta, p, where)
    chosen = _selected(delta, where)

    def one(path, d, m):
        d = jnp.asarray(d)
        if chosen is not None and path_str(path) not in chosen:
            return d
        return jnp.where(m, d / jnp.asarray(q, d.dtype), jnp.zeros((), d.dtype))

    return jax.tree_util.tree_map_with_path(one, delta, masks)


def dare(
    key: Key,
    base: PyTree,
    finetuned: PyTree,
    drop_rate: float,
    *,
    rescale: bool = True,
    q: float | None = None,
    where: str | Sequence[str] | None = None,
) -> PyTree:
    """The DARE'd fine-tune θ_0 + `dare_delta`(θ_ft − θ_0) (see `dare_delta` for the args).

    Raises:
      ValueError: drop_rate outside [0, 1), q outside (0, 1], or base and finetuned trees that
        differ in structure or shapes (the message names the leaf).
    """
    delta = task_vector(base, finetuned)
    sparse = dare_delta(key, delta, drop_rate, rescale=rescale, q=q, where=where)
    return jax.tree.map(lambda b, d: (jnp.asarray(b) + d).astype(jnp.result_type(b)), base, sparse)


def merge_deltas(
    base: PyTree, deltas: Sequence[PyTree], weights: Sequence[float] | None = None
) -> PyTree:
    """θ_0 + Σ_k λ_k δ_k (default λ_k = 1/K: averaging the fine-tuned models' parameters).

    Raises:
      ValueError: no deltas, a weight count that differs from the delta count, or a delta whose
        structure or shapes differ from the base's.
    """
    deltas = list(deltas)
    if not deltas:
        raise ValueError("deltas is empty: pass at least one task vector to merge.")
    weights = [1.0 / len(deltas)] * len(deltas) if weights is None else list(weights)
    if len(weights) != len(deltas):
        raise ValueError(f"weights has {len(weights)} entries for {len(deltas)} deltas.")
    for k, d in enumerate(deltas):
        _check_same_structure(base, d, f"base and deltas[{k}]")

    def one(b, *ds):
        b = jnp.asarray(b)
        total = sum(w * jnp.asarray(d, jnp.float32) for w, d in zip(weights, ds, strict=True))
        return (b.astype(jnp.float32) + total).astype(b.dtype)

    return jax.tree.map(one, base, *deltas)


def dare_merge(
    key: Key,
    base: PyTree,
    finetuned: Sequence[PyTree],
    drop_rate: float,
    weights: Sequence[float] | None = None,
    *,
    q: float | None = None,
    where: str | Sequence[str] | None = None,
) -> PyTree:
    """Super Mario merging: DARE each fine-tune's delta (independent masks, key k folded in),
    then `merge_deltas` with `weights` (default 1/K)."""
    finetuned = list(finetuned)
    deltas = [
        dare_delta(jax.random.fold_in(key, k), task_vector(base, ft), drop_rate, q=q, where=where)
        for k, ft in enumerate(finetuned)
    ]
    return merge_deltas(base, deltas, weights)


def darex_q_search(
    objective: Callable[[float], float], drop_rate: float, qs: Sequence[float] | None = None
) -> tuple[float, dict[float, float]]:
    """DAREx-q: the rescaling q minimising `objective` over a grid (masks held fixed).

    Args:
      objective: ``q ↦ loss`` of the model rebuilt with rescaling 1/q and one fixed drop mask
        (e.g. validation NLL, or the unlabelled output change against the fine-tuned model).
      drop_rate: p; the grid must lie in [1 − p, 1] (q = 1 − p is plain DARE).
      qs: the grid (default 16 geometrically spaced points from 1 − p to 1).

    Returns:
      (best q, {q: objective(q)}).

    References:
      Deng et al. (2025), "DARE the Extreme", DAREx-q (q tuned on validation data).
    """
    p = _check_rate(drop_rate)
    if qs is None:
        qs = np.geomspace(1.0 - p, 1.0, 16)
    qs = [float(q) for q in qs]
    if not qs:
        raise ValueError("qs is empty: give at least one rescaling q in [1 − p, 1].")
    bad = [q for q in qs if not (1.0 - p - 1e-9 <= q <= 1.0)]
    if bad:
        raise ValueError(f"qs must lie in [1 - drop_rate, 1] = [{1 - p:g}, 1]; got {bad[:4]}.")
    values = {q: float(objective(q)) for q in qs}
    finite = {q: v for q, v in values.items() if math.isfinite(v)}
    if not finite:
        raise ValueError("objective returned no finite value on the q grid.")
    return min(finite, key=finite.get), values
