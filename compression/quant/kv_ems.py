"""EMS: head-wise evict-then-merge KV-cache compression driven by a global-local importance score.

For one head with n cached tokens, keys K (n, d), values V (n, d) and the prefill attention
probabilities A (t queries × n keys, causal; t = n after a prefill), EMS keeps a budget of B
tokens:

1. Global-local score. The accumulated attention of key j is biased towards early tokens (more
   queries can see them); the global part averages it over the queries that can attend to j,
   the local part sums the attention of the last w queries (an observation window):

       g_j = Σ_i A_ij / #{i : i can attend to j},   l_j = Σ_{i ≥ t − w} A_ij,
       score_j = (1 − λ) g_j / Σ g + λ l_j / Σ l.

2. Evict. The last w tokens are always kept; the rest of the budget goes to the highest scores.
   The kept tokens are the class centers.
3. Merge. Each evicted token e joins the kept token c(e) whose key is most similar (cosine), or
   the zero class when that similarity is below the threshold τ (a pure eviction: the head is
   sparse there, nothing similar to merge into). A center absorbs its class as a
   similarity-weighted average,

       K̂_c = (K_c + Σ_{e→c} σ_e K_e) / (1 + Σ_{e→c} σ_e),  σ_e = max(cos(K_e, K_c), 0),

   likewise V̂_c, and counts the tokens it stands for, m_c = 1 + #{e → c}. The assignment is one
   (n × (B + 1)) one-hot matrix per head — the zero class is the extra column that is thrown
   away — so every head is compressed by the same fixed-shape matrix products, in parallel.

This is a reconstruction from the paper's abstract (the method section was not available): the
exact score normalisation, λ and the merge weights of the paper may differ. Attention over a
merged cache gives center c the weight m_c · exp(q·K̂_c) (a log m_c logit bias), which
`ems_expand` realises without a mask by writing K̂_c, V̂_c into the slots of every token of the
class (zero-class slots need a key mask; see `ems_expand`).

References:
  Li et al. (2024), "EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression
  Based on Global-Local Importance", arXiv:2412.08521.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from feynkit.core.types import Array, ArrayLike, Float

__all__ = ["EmsCache", "ems_bytes", "ems_compress", "ems_expand", "global_local_scores"]


class EmsCache(NamedTuple):
    """The compressed tokens of one head (or a batch of heads: leading axes on every field).

    Attributes:
      k, v: (..., B, d) merged keys and values of the kept tokens, in position order.
      counts: (..., B) int32, how many original tokens each kept token stands for.
      positions: (..., B) int32, the kept tokens' original positions.
      assignment: (..., n) int32, the kept slot each original token went to, −1 for the zero
        class (evicted without merging).
    """

    k: Array
    v: Array
    counts: Array
    positions: Array
    assignment: Array


def global_local_scores(
    probs: Float[ArrayLike, "*batch t n"], *, window: int, local_weight: float = 0.5
) -> Float[Array, "*batch n"]:
    """score_j = (1 − λ) g_j / Σg + λ l_j / Σl from causal attention probabilities.

    g_j = Σ_i A_ij / #{queries that can attend to j} (query i sits at position n − t + i),
    l_j = Σ over the last ``window`` queries of A_ij.

    Args:
      probs: attention probabilities, (..., t queries, n keys), rows summing to 1, causal.
      window: w ≥ 1, the local observation window (the last w queries).
      local_weight: λ in [0, 1].

    Returns:
      Scores (..., n), summing to 1 over n.

    References:
      Li et al. (2024), "EMS", arXiv:2412.08521 (Global-Local score).
    """
    probs = jnp.asarray(probs, jnp.float32)
    t, n = probs.shape[-2:]
    if not 1 <= window <= t:
        raise ValueError(f"window must be in [1, {t}] (the number of queries), got {window}.")
    if not 0.0 <= local_weight <= 1.0:
        raise ValueError(f"local_weight must be in [0, 1], got {local_weight}.")
    q_pos = np.arange(n - t, n)
    visible = (np.arange(n)[None, :] <= q_pos[:, None]).sum(0)  # queries seeing each key
    visible = np.maximum(visible, 1).reshape((1,) * (probs.ndim - 2) + (n,))
    g = probs.sum(-2) / jnp.asarray(visible, jnp.float32)
    loc = probs[..., t - window :, :].sum(-2)
    tiny = jnp.finfo(jnp.float32).tiny
    g = g / jnp.maximum(g.sum(-1, keepdims=True), tiny)
    loc = loc / jnp.maximum(loc.sum(-1, keepdims=True), tiny)
    return (1.0 - local_weight) * g + local_weight * loc


def _compress_head(k, v, scores, *, budget, window, merge_threshold):
    n, _ = k.shape
    forced = jnp.arange(n) >= n - window
    priority = jnp.where(forced, jnp.inf, scores.astype(jnp.float32))
    _, kept = jax.lax.top_k(priority, budget)
    kept = jnp.sort(kept).astype(jnp.int32)
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    unit = kf / jnp.maximum(jnp.linalg.norm(kf, axis=-1, keepdims=True), 1e-12)
    sim = unit @ unit[kept].T  # (n, B)
    best = jnp.argmax(sim, axis=-1)
    best_sim = jnp.max(sim, axis=-1)
    is_kept = jnp.zeros((n,), bool).at[kept].set(True)
    slot_of_kept = jnp.zeros((n,), jnp.int32).at[kept].set(jnp.arange(budget, dtype=jnp.int32))
    merged = ~is_kept & (best_sim >= merge_threshold)
    assignment = jnp.where(is_kept, slot_of_kept, jnp.where(merged, best, -1)).astype(jnp.int32)
    # Column B is the zero class: tokens assigned there are dropped.
    cls = jnp.where(assignment < 0, budget, assignment)
    onehot = jax.nn.one_hot(cls, budget + 1, dtype=jnp.float32)[:, :budget]  # (n, B)
    weight = jnp.where(is_kept, 1.0, jnp.maximum(best_sim, 0.0))
    w = onehot * weight[:, None]
    denom = w.sum(0)  # ≥ 1: each center carries its own weight 1
    k_hat = (w.T @ kf) / denom[:, None]
    v_hat = (w.T @ vf) / denom[:, None]
    counts = onehot.sum(0).astype(jnp.int32)
    return EmsCache(k_hat.astype(k.dtype), v_hat.astype(v.dtype), counts, kept, assignment)


def ems_compress(
    k: Float[ArrayLike, "*batch n d"],
    v: Float[ArrayLike, "*batch n d"],
    scores: Float[ArrayLike, "*batch n"],
    *,
    budget: int,
    window: int = 8,
    merge_threshold: float = 0.0,
) -> EmsCache:
    """Evict all but ``budget`` tokens per head, merging evicted ones into their nearest kept one.

    Kept: the last ``window`` tokens and the highest-scoring others. Evicted token e merges into
    c(e) = argmax_c cos(K_e, K_c) when cos ≥ τ, as K̂_c = (K_c + Σ σ_e K_e) / (1 + Σ σ_e) with
    σ_e = max(cos, 0) (likewise V), else it is dropped (zero class).

    Args:
      k, v: keys and values (..., n, d); leading axes (layers, batch, heads) are independent.
      scores: token importance (..., n), e.g. `global_local_scores`.
      budget: B, tokens kept per head, window ≤ B ≤ n.
      window: w ≥ 0 most recent tokens always kept.
      merge_threshold: τ in [−1, 1]; −1 merges every evicted token (no zero class), > 1 never
        merges (pure eviction).

    Returns:
      An `EmsCache` with B tokens per head.

    References:
      Li et al. (2024), "EMS", arXiv:2412.08521.
    """
    k, v, scores = jnp.asarray(k), jnp.asarray(v), jnp.asarray(scores)
    if k.ndim < 2 or k.shape != v.shape or scores.shape != k.shape[:-1]:
        raise ValueError(
            f"need k, v of equal shape (..., n, d) and scores (..., n); got {k.shape}, "
            f"{v.shape}, {scores.shape}."
        )
    n = k.shape[-2]
    if not 0 <= window <= budget <= n:
        raise ValueError(f"need 0 ≤ window ({window}) ≤ budget ({budget}) ≤ n ({n}).")
    return _ems_jit(k, v, scores, budget=budget, window=window, merge_threshold=merge_threshold)


@functools.partial(jax.jit, static_argnames=("budget", "window"))
def _ems_jit(k, v, scores, *, budget, window, merge_threshold):
    fn = functools.partial(_compress_head, budget=budget, window=window)
    fn2 = lambda a, b, s: fn(a, b, s, merge_threshold=merge_threshold)  # noqa: E731
    for _ in range(k.ndim - 2):
        fn2 = jax.vmap(fn2)
    return fn2(k, v, scores)


def ems_expand(ems: EmsCache) -> tuple[Float[Array, "*batch n d"], Float[Array, "*batch n d"]]:
    """Write each class's merged (K̂_c, V̂_c) into the slots of all its n original tokens.

    Softmax attention over the expanded keys equals attention over the B merged tokens with a
    log m_c bias (center c appears m_c times), so an unmodified model runs on the compressed
    cache. Zero-class slots are filled with zeros, which a model without a key mask still
    attends to (logit 0): use merge_threshold = −1 for such models.

    Args:
      ems: an `EmsCache`.

    Returns:
      (k, v) of shape (..., n, d).

    References:
      Bolya et al. (2023), "Token Merging: Your ViT But Faster" (proportional attention).
    """

    return _expand_jit(ems)


@jax.jit
def _expand_jit(ems):
    def one(kh, vh, assignment):
        idx = jnp.maximum(assignment, 0)
        keep = (assignment >= 0)[:, None]
        k = jnp.where(keep, kh[idx], 0).astype(kh.dtype)
        return k, jnp.where(keep, vh[idx], 0).astype(vh.dtype)

    fn = one
    for _ in range(ems.k.ndim - 2):
        fn = jax.vmap(fn)
    return fn(ems.k, ems.v, ems.assignment)


def ems_bytes(ems: EmsCache) -> int:
    """Storage in bytes: fp16 keys and values of the kept tokens + int32 counts and positions.

    Args:
      ems: an `EmsCache`.

    Returns:
      2·(|K̂| + |V̂|) + 4·(|counts| + |positions|).
    """
    size = lambda a: int(np.prod(a.shape, dtype=np.int64))  # noqa: E731
    return 2 * (size(ems.k) + size(ems.v)) + 4 * (size(ems.counts) + size(ems.positions))
