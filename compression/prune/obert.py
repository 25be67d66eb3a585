"""The Optimal BERT Surgeon (oBERT): OBS pruning with a block-wise empirical inverse Fisher.

With m gradients of the loss (one per calibration mini-batch) the inverse of the damped
empirical Fisher F = λI + (1/m) Σ g gᵀ, block-diagonal over blocks of B consecutive weights of
the flattened (out, in) matrix, is applied matrix-free with M-FAC (`feynkit.compression.prune.
mfac`). Each weight q gets the OBS saliency

    ρ_q = w_q² / (2 [F⁻¹]_qq),

the lowest saliencies are pruned (per layer, per output channel, or N:M), and the remaining
weights receive the OBS correction summed over the pruned set Q, as one inverse-Fisher-vector
product per layer,

    δw = −F⁻¹ Σ_{q ∈ Q} (w_q / [F⁻¹]_qq) e_q,

after which the pruned weights are set to exactly 0 (the summed single-weight updates ignore the
correlations between pruned weights of one block, as WoodFisher's independent variant does).

``damp`` is relative: λ = damp · mean_q(Σ_k g_kq² / m), the mean diagonal of the Fisher.

References:
  Kurtic et al. (2022), "The Optimal BERT Surgeon: Scalable and Accurate Second-Order Pruning
  for Large Language Models" (EMNLP), Section 3; Singh & Alistarh (2020), "WoodFisher";
  Frantar, Kurtic & Alistarh (2021), "M-FAC".
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from feynkit.compression.prune.masks import _check_scores, check_pattern, pattern_mask, pattern_name
from feynkit.compression.prune.mfac import mfac, mfac_diag, mfac_ifvp
from feynkit.compression.prune.recipe import FisherCalibration, PruneRecipe
from feynkit.compression.quant.quant_recipe import _where
from feynkit.compression.quant.tree import ALL_KERNELS, match_paths, path_str
from feynkit.core.types import Array, ArrayLike, PyTree

__all__ = ["collect_gradients", "obert_prune", "obert_recipe", "obert_saliency"]


def _fisher_block(d: int, block_size: int) -> int:
    return max(g for g in range(1, min(d, block_size) + 1) if d % g == 0)


def _factors(w: Array, grads: Array, damp: float, block_size: int):
    dt = jnp.promote_types(w.dtype, jnp.float32)
    G = jnp.swapaxes(jnp.asarray(grads, dt), 1, 2).reshape(grads.shape[0], -1)  # (out, in) order
    lam = damp * jnp.mean(jnp.sum(G**2, axis=0) / G.shape[0])
    lam = jnp.where(lam > 0, lam, damp)
    return mfac(G, lam, _fisher_block(w.size, block_size))


def obert_saliency(w: ArrayLike, grads: ArrayLike, *, damp: float = 1e-3, block_size: int = 32):
    """ρ = w² / (2 diag F⁻¹) of a (d_in, d_out) kernel from its (m, d_in, d_out) gradients."""
    w = jnp.asarray(w)
    f = _factors(w, jnp.asarray(grads), damp, block_size)
    diag = mfac_diag(f).reshape(w.shape[1], w.shape[0]).T
    return w**2 / (2 * diag), f


def obert_prune(
    w: ArrayLike,
    grads: ArrayLike,
    sparsity: float = 0.5,
    *,
    n: int | None = None,
    m: int | None = None,
    granularity: str = "layer",
    damp: float = 1e-3,
    block_size: int = 32,
) -> tuple[Array, Array]:
    """oBERT one-shot pruning of a (d_in, d_out) kernel.

    Args:
      w: the kernel; grads: (m, d_in, d_out) loss gradients (`collect_gradients`).
      sparsity: fraction pruned in [0, 1) (ignored for N:M). n, m: N:M pattern.
      granularity: "layer" (oBERT's ranking within the layer) or "row" (each output channel).
      damp: relative damping of the Fisher. block_size: Fisher block B (largest divisor of the
        weight count not above it).

    Returns:
      ``(w_pruned, keep_mask)`` with exact zeros where the mask is False.
    """
    w = jnp.asarray(w)
    grads = jnp.asarray(grads)
    if w.ndim != 2 or grads.ndim != 3 or grads.shape[1:] != w.shape:
        raise ValueError(
            f"grads must be (m, {w.shape[0]}, {w.shape[1]}) for the kernel {w.shape}, got "
            f"{grads.shape}."
        )
    check_pattern(sparsity, n, m)
    if not damp > 0:
        raise ValueError(f"damp={damp!r} must be > 0.")
    _check_scores(grads, "gradients")
    _check_scores(w, "weights")
    return _obert(
        w,
        grads,
        sparsity=None if n is not None else float(sparsity),
        n=n,
        m=m,
        granularity=granularity,
        damp=float(damp),
        block_size=int(block_size),
    )


@functools.partial(
    jax.jit, static_argnames=("sparsity", "n", "m", "granularity", "damp", "block_size")
)
def _obert(w, grads, *, sparsity, n, m, granularity, damp, block_size):
    rho, f = obert_saliency(w, grads, damp=damp, block_size=block_size)
    keep = pattern_mask(rho, sparsity, n, m, granularity=granularity)
    diag = mfac_diag(f)
    wt = w.T.reshape(-1).astype(diag.dtype)
    v = jnp.where(keep.T.reshape(-1), 0.0, wt / diag)
    new = (wt - mfac_ifvp(f, v)).reshape(w.shape[1], w.shape[0]).T
    return jnp.where(keep, new, 0.0).astype(w.dtype), keep


def collect_gradients(
    loss_fn: Callable[[PyTree, Any], Array],
    params: PyTree,
    batches: Any,
    where: str | Sequence[str] = ALL_KERNELS,
) -> FisherCalibration:
    """Gradients of ``loss_fn(params, batch)`` for each mini-batch, at the selected kernels.

    Args:
      loss_fn: scalar loss of one mini-batch. params: float parameters.
      batches: a pytree of arrays with a leading axis of m mini-batches (one gradient each).
      where: regexes over paths (as `prune_tree`).

    Returns:
      `FisherCalibration` with path → (m, *kernel shape) gradients (float32).
    """
    selected = set(match_paths(params, where))
    m = jax.tree_util.tree_leaves(batches)[0].shape[0]
    grad = jax.jit(jax.grad(loss_fn))
    out: dict[str, list] = {p: [] for p in selected}
    for i in range(m):
        g = grad(params, jax.tree_util.tree_map(lambda x: x[i], batches))
        for path, leaf in jax.tree_util.tree_flatten_with_path(g)[0]:
            name = path_str(path)
            if name in selected:
                out[name].append(jnp.asarray(leaf, jnp.float32))
    return FisherCalibration({k: jnp.stack(v) for k, v in out.items()}, m)


def obert_recipe(
    sparsity: float = 0.5,
    *,
    n: int | None = None,
    m: int | None = None,
    granularity: str = "layer",
    damp: float = 1e-3,
    block_size: int = 32,
    where: str | Sequence[str] | None = ALL_KERNELS,
) -> PruneRecipe:
    """oBERT on the selected kernels; calibration = `collect_gradients(...)`."""
    check_pattern(sparsity, n, m)

    def prune(w, stats, i, ctx):
        return obert_prune(
            w,
            stats.gradients,
            sparsity,
            n=n,
            m=m,
            granularity=granularity,
            damp=damp,
            block_size=block_size,
        )

    return PruneRecipe(
        f"obert{pattern_name(sparsity, n, m)}", prune, _where(where), True, ("gradients",)
    )
