"""`compress_layerwise`: one sequential (layer-by-layer) calibration loop for every recipe.

The SparseGPT, Wanda, GPTQ and SpQR reference codes compress a network one block at a time,
calibrating each block on the inputs the *already compressed* blocks before it produce. This
module holds that loop once; `feynkit.compression.prune.prune_layerwise` (a `PruneRecipe`) and
quantization (`QuantRecipe`) both run through it. Calibration uses `calibrate`, which accepts
parameter trees holding compressed leaves (they run through `compressed_apply`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from feynkit.compression.quant.calibration import calibrate
from feynkit.compression.quant.tree import match_paths
from feynkit.core.types import PyTree

__all__ = ["compress_layerwise"]


def compress_layerwise(
    recipe,
    apply_fn: Callable,
    params: PyTree,
    inputs,
    layers: str | Sequence[str],
    *,
    batch_size: int | None = 8,
    split: Callable[[Any], tuple[PyTree, Any]] | None = None,
) -> tuple[PyTree, list]:
    """Compress one layer group at a time, calibrating each on the model with the earlier
    groups already compressed.

    For each regex in ``layers`` (forward order, e.g. ``r"layers_0/.*"``) the recipe's
    selected kernels inside it (not taken by an earlier pattern) are calibrated with
    `calibrate` on ``apply_fn(params_so_far, *inputs)`` and compressed by
    ``recipe.with_where(those paths)(params_so_far, calibration)``.

    Args:
      recipe: a `QuantRecipe` or `PruneRecipe` (anything with ``where``, ``with_where``,
        ``needs_calibration`` and ``__call__(params, calibration)``).
      apply_fn, params, inputs, batch_size: as in `calibrate`.
      layers: one regex or a sequence of regexes over '/'-joined paths, in forward order.
      split: maps the recipe's output to ``(new params, extra)``; default: the output is the
        new tree and extra is None (a `QuantRecipe`).

    Returns:
      ``(params, extras)``: the compressed tree and the per-group extras, in order.

    Raises:
      ValueError: ``layers`` is empty or a pattern matches none of the recipe's kernels.
    """
    split = split or (lambda out: (out, None))
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not patterns:
        raise ValueError("layers must name at least one layer pattern.")
    selected = match_paths(params, recipe.where)
    done: set[str] = set()
    extras = []
    for layer in patterns:
        paths = [p for p in selected if re.fullmatch(layer, p) and p not in done]
        if not paths:
            raise ValueError(
                f"layers: pattern {layer!r} matches none of the recipe's kernels {selected[:8]}."
            )
        where = [re.escape(p) for p in paths]
        calib = None
        if recipe.needs_calibration:
            calib = calibrate(apply_fn, params, inputs, where=where, batch_size=batch_size)
        params, extra = split(recipe.with_where(where)(params, calib))
        extras.append(extra)
        done.update(paths)
    return params, extras
