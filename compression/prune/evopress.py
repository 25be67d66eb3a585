"""EvoPress: evolutionary search over per-layer sparsity levels under an average budget.

Each selected kernel ("unit") can take one of the sparsity levels s_0 < s_1 < … of a uniform
grid. The database of pruned variants — every unit pruned at every level, by any per-layer
pruner (magnitude, Wanda, SparseGPT) — is computed once (`build_database`); a candidate is a
vector of level indices, and the model it stands for is assembled by indexing the database
(`assemble`, jit-able with traced levels, so one compilation scores every candidate).

The search (`evopress_search`) is EvoPress's (1 + λ) scheme with multi-step selection:

  * mutation = level switch: inside a group of units of equal size, one unit goes one level up
    and another one level down, so the parameter-weighted average sparsity never changes;
  * each generation draws λ offspring of the parent; selection stage k scores the survivors of
    stage k − 1 with fitness function k (typically the same loss on more calibration tokens) and
    keeps the best `survivors[k]` (the last stage keeps one); the parent competes in every
    stage (elitism), so the search never moves to a candidate it scored worse.

Fitness is a calibration loss of the assembled model, e.g. the KL divergence of its next-token
distribution from the dense model's (EvoPress's default) or the NLL.

References:
  Sieberling et al. (2025), "EvoPress: Towards Optimal Dynamic Model Compression via
  Evolutionary Search" (level-switch mutation, multi-step selection with growing token budgets,
  KL fitness; reference script: 64 offspring, survivors 8/2/1 on 2k/16k/64k tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from feynkit.compression.quant.tree import match_paths
from feynkit.core.types import Array, Key, PyTree

__all__ = [
    "EvoPressDatabase",
    "EvoPressResult",
    "assemble",
    "average_sparsity",
    "build_database",
    "evopress_search",
    "kl_fitness",
    "kl_search_from_uniform",
    "level_switch",
    "size_groups",
]


class EvoPressDatabase(NamedTuple):
    """Every selected kernel pruned at every level, computed once.

    Attributes:
      paths: the units' '/'-joined kernel paths (search order).
      levels: (L,) the sparsity grid.
      variants: path → (L, *kernel shape) pruned kernels, variant j at sparsity levels[j].
      sizes: path → number of weights of the kernel.
    """

    paths: tuple[str, ...]
    levels: np.ndarray
    variants: dict[str, Array]
    sizes: dict[str, int]


class EvoPressResult(NamedTuple):
    """The searched allocation: `levels` (level index per unit), its last-stage `fitness`, and
    `history`, the parent's fitness after each generation."""

    levels: np.ndarray
    fitness: float
    history: list[float]


def build_database(
    params: PyTree,
    where: str | Sequence[str],
    levels: Sequence[float],
    prune_fn: Callable[[str, Array, float], Array],
) -> EvoPressDatabase:
    """Prune each kernel `where` selects at each sparsity of `levels` with
    ``prune_fn(path, kernel, sparsity) -> pruned kernel`` (same shape), once.

    Raises:
      ValueError: levels not strictly increasing in [0, 1), fewer than two levels, or a
        prune_fn result whose shape differs from the kernel's.
    """
    grid = np.asarray(levels, np.float64)
    if grid.ndim != 1 or len(grid) < 2 or np.any(np.diff(grid) <= 0):
        raise ValueError(f"levels must be ≥ 2 strictly increasing sparsities, got {levels!r}.")
    if grid[0] < 0 or grid[-1] >= 1:
        raise ValueError(f"levels must lie in [0, 1), got {levels!r}.")
    paths = tuple(match_paths(params, where))
    flat = traverse_util.flatten_dict(params, sep="/")
    variants, sizes = {}, {}
    for p in paths:
        w = jnp.asarray(flat[p])
        outs = [jnp.asarray(prune_fn(p, w, float(s))) for s in grid]
        if any(o.shape != w.shape for o in outs):
            raise ValueError(f"prune_fn changed the shape of {p!r}; it must return {w.shape}.")
        variants[p] = jnp.stack(outs)
        sizes[p] = int(w.size)
    return EvoPressDatabase(paths, grid, variants, sizes)


def assemble(params: PyTree, db: EvoPressDatabase, levels: Array) -> PyTree:
    """`params` with unit i replaced by its variant at level index ``levels[i]`` (traceable)."""
    flat = dict(traverse_util.flatten_dict(params, sep="/"))
    lv = jnp.asarray(levels)
    for i, p in enumerate(db.paths):
        flat[p] = jnp.take(db.variants[p], lv[i], axis=0)
    return traverse_util.unflatten_dict(flat, sep="/")


def average_sparsity(db: EvoPressDatabase, levels) -> float:
    """Parameter-weighted mean sparsity Σ_i n_i s_{levels[i]} / Σ_i n_i."""
    lv = np.asarray(levels)
    n = np.array([db.sizes[p] for p in db.paths], np.float64)
    return float(np.sum(n * db.levels[lv]) / n.sum())


def size_groups(db: EvoPressDatabase) -> list[np.ndarray]:
    """Unit indices grouped by kernel size (mutations move sparsity only inside a group)."""
    by: dict[int, list[int]] = {}
    for i, p in enumerate(db.paths):
        by.setdefault(db.sizes[p], []).append(i)
    return [np.asarray(v) for v in by.values()]


def level_switch(
    rng: np.random.Generator, levels: np.ndarray, groups: Sequence[np.ndarray], num_levels: int
) -> np.ndarray:
    """One level-switch mutation: in a random group with a legal move, unit a goes one level up
    and unit b ≠ a one level down (the weighted average sparsity is unchanged)."""
    movable = [
        g
        for g in groups
        if len(g) > 1 and np.any(levels[g] < num_levels - 1) and np.any(levels[g] > 0)
    ]
    if not movable:
        raise ValueError("no level-switch move exists (every group is a single unit or stuck).")
    g = movable[rng.integers(len(movable))]
    while True:
        up = g[rng.integers(len(g))]
        down = g[rng.integers(len(g))]
        if up != down and levels[up] < num_levels - 1 and levels[down] > 0:
            out = levels.copy()
            out[up] += 1
            out[down] -= 1
            return out


def evopress_search(
    key: Key,
    db: EvoPressDatabase,
    init_levels: Sequence[int] | np.ndarray,
    fitness_fns: Sequence[Callable[[Array], float]],
    survivors: Sequence[int],
    *,
    generations: int,
    offspring: int,
    mutations: int = 1,
) -> EvoPressResult:
    """Search per-unit sparsity levels at the average sparsity of `init_levels`.

    Args:
      key: PRNG key (mutations).
      db: the database of pruned variants.
      init_levels: the starting allocation (e.g. every unit at the target level: uniform).
      fitness_fns: one ``levels (int array) -> loss`` per selection stage (lower is better),
        typically on growing calibration subsets.
      survivors: candidates kept after each stage; the last entry must be 1.
      generations: number of generations; offspring: λ, mutants drawn per generation.
      mutations: level switches applied to make one offspring.

    Returns:
      An `EvoPressResult`; its allocation has exactly the average sparsity of `init_levels`.

    Raises:
      ValueError: stage lists of different lengths, survivors not ending in 1, or a level
        index outside the grid.
    """
    if len(fitness_fns) != len(survivors) or not survivors or survivors[-1] != 1:
        raise ValueError(
            "fitness_fns and survivors must have one entry per selection stage and survivors "
            f"must end with 1; got {len(fitness_fns)} stages and survivors={list(survivors)}."
        )
    if generations < 0 or offspring < 1 or mutations < 1:
        raise ValueError("generations ≥ 0, offspring ≥ 1 and mutations ≥ 1 are required.")
    parent = np.asarray(init_levels, np.int32).copy()
    num_levels = len(db.levels)
    if parent.shape != (len(db.paths),) or parent.min() < 0 or parent.max() >= num_levels:
        raise ValueError(
            f"init_levels must hold {len(db.paths)} level indices in [0, {num_levels})."
        )
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    groups = size_groups(db)
    parent_fit = float(fitness_fns[-1](jnp.asarray(parent)))
    history = [parent_fit]
    for _ in range(generations):
        pool = [parent]
        for _ in range(offspring):
            child = parent
            for _ in range(mutations):
                child = level_switch(rng, child, groups, num_levels)
            pool.append(child)
        fits: list[float] = []
        for fit_fn, keep in zip(fitness_fns, survivors, strict=True):
            fits = [float(fit_fn(jnp.asarray(c))) for c in pool]
            order = np.argsort(fits, kind="stable")[:keep]
            pool, fits = [pool[i] for i in order], [fits[i] for i in order]
        parent, parent_fit = pool[0], fits[0]
        history.append(parent_fit)
    return EvoPressResult(parent, parent_fit, history)


def kl_fitness(
    forward: Callable[[PyTree, Array], Array], params: PyTree, db: EvoPressDatabase, windows
) -> Callable[[Array], float]:
    """EvoPress's default fitness: ``levels ↦`` mean KL(dense ‖ assembled) of the next-token
    distributions of ``forward(params, windows)`` (logits), jitted once for every candidate."""
    windows = jnp.asarray(windows)
    dense_logp = jax.nn.log_softmax(forward(params, windows))

    @jax.jit
    def kl(levels):
        logq = jax.nn.log_softmax(forward(assemble(params, db, levels), windows))
        return jnp.mean(jnp.sum(jnp.exp(dense_logp) * (dense_logp - logq), axis=-1))

    return lambda levels: float(kl(levels))


def kl_search_from_uniform(
    key: Key,
    forward: Callable[[PyTree, Array], Array],
    params: PyTree,
    db: EvoPressDatabase,
    windows,
    target_sparsity: float,
    stage_windows: Sequence[int],
    survivors: Sequence[int],
    *,
    generations: int,
    offspring: int,
) -> tuple[EvoPressResult, np.ndarray, list[Callable[[Array], float]]]:
    """EvoPress as the paper runs it: from the uniform allocation at the database level nearest
    `target_sparsity`, with the KL fitness on the first `stage_windows[i]` calibration windows
    at selection stage i. Returns the search result, the uniform allocation and the stage
    fitnesses (the last scores on the most windows)."""
    target = int(np.argmin(np.abs(np.asarray(db.levels) - target_sparsity)))
    uniform = np.full(len(db.paths), target, np.int32)
    fits = [kl_fitness(forward, params, db, windows[:w]) for w in stage_windows]
    res = evopress_search(
        key, db, uniform, fits, survivors, generations=generations, offspring=offspring
    )
    return res, uniform, fits
