"""Pruning method name → `PruneRecipe` factory (the ``_target_`` of the Hydra ``prune/`` group)."""

from __future__ import annotations

from collections.abc import Callable

from feynkit.compression.prune.magnitude import magnitude_recipe
from feynkit.compression.prune.obert import obert_recipe
from feynkit.compression.prune.recipe import PruneRecipe
from feynkit.compression.prune.sparsegpt import sparsegpt_recipe
from feynkit.compression.prune.wanda import wanda_recipe

__all__ = ["RECIPES"]

RECIPES: dict[str, Callable[..., PruneRecipe]] = {
    "magnitude": magnitude_recipe,
    "wanda": wanda_recipe,
    "sparsegpt": sparsegpt_recipe,
    "obert": obert_recipe,
}
"""Unstructured / N:M pruning recipes by name."""
