"""Gradual magnitude pruning (Zhu & Gupta, 2017) as an Optax gradient transformation.

The sparsity follows the cubic schedule

    s_t = s_f + (s_i − s_f) · (1 − (t − t₀) / (n Δt))³,    t ∈ {t₀, t₀ + Δt, …, t₀ + n Δt},

held constant between mask updates (every Δt = ``frequency`` steps) and at s_f after
``end_step = t₀ + n Δt``. As in jaxpruner, the keep-masks live in the optimizer state: at a mask
update the masks are recomputed from the magnitudes of the weights the step produces (weights
already pruned rank lowest, so pruned weights stay pruned), and every step the update of a pruned
weight is replaced by ``−w``, so ``optax.apply_updates`` gives exactly 0 there. Chain it last:

    tx = optax.chain(optax.adam(1e-3), gradual_magnitude_pruning(0.9, 100, 1100, frequency=100))
    updates, state = tx.update(grads, state, params)   # params are required
    params = optax.apply_updates(params, updates)
    masks = pruning_masks(state)

References:
  Zhu & Gupta (2017), "To prune, or not to prune: exploring the efficacy of pruning for model
  compression"; Lee et al. (2024), "JaxPruner: A concise library for sparsity research".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from feynkit.compression.protocol import is_compressed
from feynkit.compression.prune.magnitude import MAGNITUDE_GRANULARITIES, global_magnitude_masks
from feynkit.compression.prune.masks import check_sparsity, topk_mask
from feynkit.compression.quant.tree import ALL_KERNELS, match_paths, path_str
from feynkit.core.types import Array, PyTree

__all__ = [
    "GradualPruningState",
    "cubic_sparsity",
    "gradual_magnitude_pruning",
    "pruning_masks",
]


class GradualPruningState(NamedTuple):
    """``count``: steps taken; ``masks``: keep-masks (None at unpruned leaves)."""

    count: Array
    masks: Any


def cubic_sparsity(
    step,
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    *,
    initial_sparsity: float = 0.0,
    frequency: int = 1,
) -> Array:
    """Zhu & Gupta's cubic schedule s_t at ``step`` (may be traced), updated every
    ``frequency`` steps: s_i before ``begin_step``, s_f from ``end_step`` on."""
    _check_schedule(final_sparsity, begin_step, end_step, initial_sparsity, frequency)
    step = jnp.asarray(step, jnp.float32)
    t = jnp.floor((step - begin_step) / frequency) * frequency
    frac = jnp.clip(t / (end_step - begin_step), 0.0, 1.0)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** 3


def _check_schedule(final_sparsity, begin_step, end_step, initial_sparsity, frequency):
    check_sparsity(final_sparsity, "final_sparsity")
    check_sparsity(initial_sparsity, "initial_sparsity")
    if initial_sparsity > final_sparsity:
        raise ValueError(
            f"initial_sparsity={initial_sparsity} exceeds final_sparsity={final_sparsity}."
        )
    if not (isinstance(begin_step, int) and isinstance(end_step, int)) or not (
        0 <= begin_step < end_step
    ):
        raise ValueError(
            f"begin_step={begin_step!r}, end_step={end_step!r}: need integers 0 ≤ begin < end."
        )
    if not isinstance(frequency, int) or frequency < 1:
        raise ValueError(f"frequency={frequency!r} must be a positive integer (steps).")


def _is_none(x) -> bool:
    return x is None


def gradual_magnitude_pruning(
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    *,
    frequency: int = 100,
    initial_sparsity: float = 0.0,
    granularity: str = "layer",
    where: str | Sequence[str] = ALL_KERNELS,
) -> optax.GradientTransformation:
    """An Optax transformation that prunes the selected kernels gradually by magnitude.

    Args:
      final_sparsity: s_f in [0, 1). begin_step, end_step: t₀ and t₀ + nΔt (optimizer steps).
      frequency: Δt, steps between mask updates. initial_sparsity: s_i (applied at t₀).
      granularity: comparison group of the magnitude ranking: "layer" (Zhu & Gupta), "row"
        (each output channel) or "global" (all selected kernels together).
      where: regexes over parameter paths, selected as by `quantize_tree`.

    Returns:
      An `optax.GradientTransformation` whose ``update`` needs ``params`` and whose state is a
      `GradualPruningState` (masks in the state; `pruning_masks`). Chain it last.

    Raises:
      ValueError: a bad schedule, granularity, or unmatched ``where`` (at ``init``); NaN
        weights at a mask update (under ``jit`` when the compiled step runs).
    """
    _check_schedule(final_sparsity, begin_step, end_step, initial_sparsity, frequency)
    if granularity not in MAGNITUDE_GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}; use one of {MAGNITUDE_GRANULARITIES}.")

    def init(params):
        selected = set(match_paths(params, where))

        def one(path, w):
            if path_str(path) not in selected:
                return None
            if jnp.ndim(w) < 2:
                raise ValueError(
                    f"{path_str(path)}: shape {jnp.shape(w)} is not a kernel; restrict `where`."
                )
            return jnp.ones(jnp.shape(w), jnp.bool_)

        masks = jax.tree_util.tree_map_with_path(one, params, is_leaf=is_compressed)
        return GradualPruningState(jnp.zeros((), jnp.int32), masks)

    def new_masks(masks, new_params, sparsity):
        m_leaves, m_def = jax.tree_util.tree_flatten(masks, is_leaf=_is_none)
        w_leaves = jax.tree_util.tree_leaves(new_params, is_leaf=is_compressed)
        pairs = [(m, w) for m, w in zip(m_leaves, w_leaves, strict=True) if m is not None]
        # already-pruned weights score −1, below every |w|: they stay pruned.
        scores = [jnp.where(m, jnp.abs(w), -1.0).reshape(-1, w.shape[-1]) for m, w in pairs]
        if granularity == "global":
            out = global_magnitude_masks(scores, sparsity)
        else:
            out = [
                topk_mask(s, sparsity, granularity=granularity, name="gradual pruning")
                for s in scores
            ]
        it = iter(o.reshape(m.shape) for o, (m, _) in zip(out, pairs, strict=True))
        return jax.tree_util.tree_unflatten(
            m_def, [None if m is None else next(it) for m in m_leaves]
        )

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("gradual_magnitude_pruning needs params: tx.update(g, state, params).")
        count = state.count
        new_params = optax.apply_updates(params, updates)
        sparsity = cubic_sparsity(
            count,
            final_sparsity,
            begin_step,
            end_step,
            initial_sparsity=initial_sparsity,
            frequency=frequency,
        )
        due = (count >= begin_step) & (count <= end_step) & ((count - begin_step) % frequency == 0)
        masks = jax.lax.cond(
            due, lambda: new_masks(state.masks, new_params, sparsity), lambda: state.masks
        )

        def mask_update(m, u, p):
            return u if m is None else jnp.where(m, u, -jnp.asarray(p, u.dtype))

        updates = jax.tree_util.tree_map(mask_update, masks, updates, params, is_leaf=_is_none)
        return updates, GradualPruningState(optax.safe_increment(count), masks)

    return optax.GradientTransformation(init, update)


def pruning_masks(state: Any) -> PyTree:
    """The keep-masks of the `GradualPruningState` inside an (optionally chained) optax state."""
    if isinstance(state, GradualPruningState):
        return state.masks
    if isinstance(state, tuple):
        for s in state:
            try:
                return pruning_masks(s)
            except ValueError:
                continue
    raise ValueError(
        "no GradualPruningState in this optimizer state; chain gradual_magnitude_pruning."
    )
