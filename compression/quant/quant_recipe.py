"""`QuantRecipe`: a compression method bound to its settings and the parameter paths it acts on.

``recipe(params, calibration)`` checks the selection (every ``where`` pattern matches, selected
leaves are float kernels, not already compressed), the calibration (present when needed, one
entry per selected path, Hessians of the kernel's im2col width) and compresses each leaf with the
method's ``compress(w, stats, index)``; N-D kernels go in as (∏ shape[:-1], shape[-1]) matrices
and come back as `ReshapedKernel`. The factories live in `feynkit.compression.quant.recipes`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from feynkit.compression.protocol import CompressedTensor, ReshapedKernel, is_compressed
from feynkit.compression.quant.calibration import Calibration
from feynkit.compression.quant.qarray import MAX_BITS, MIN_BITS
from feynkit.compression.quant.tree import ALL_KERNELS, map_matching, match_paths
from feynkit.core.types import Array, PyTree

__all__ = ["LeafStats", "QuantRecipe"]


class LeafStats(NamedTuple):
    """Calibration statistics of one kernel: Hessian (d_in, d_in) and absmax (d_in,), or None."""

    hessian: Array | None
    absmax: Array | None


LeafFn = Callable[[Array, LeafStats, int], CompressedTensor]


@dataclasses.dataclass(frozen=True)
class QuantRecipe:
    """A compression method bound to its settings and the paths it applies to.

    Attributes:
      name: for reports and configs (e.g. "gptq4_g32").
      compress: ``(w (d_in, d_out) float, stats, leaf_index) -> container``.
      where: regexes over '/'-joined paths; each must match a leaf (factories map None to
        `ALL_KERNELS`).
      needs_calibration: whether ``__call__`` requires a `Calibration`.
      stats: the statistics it reads, a subset of ("hessian", "absmax").
      kernel_only: selected leaves must have ≥ 2 axes; N-D ones are compressed as im2col
        matrices (False: any shape as is, e.g. DFloat11).
    """

    name: str
    compress: LeafFn = dataclasses.field(repr=False)
    where: str | tuple[str, ...] = ALL_KERNELS
    needs_calibration: bool = False
    stats: tuple[str, ...] = ()
    kernel_only: bool = True

    def with_where(self, where: str | Sequence[str]) -> QuantRecipe:
        """The same recipe on other paths."""
        return dataclasses.replace(self, where=_where(where))

    def __call__(self, params: PyTree, calibration: Calibration | dict | None = None) -> PyTree:
        """``params`` with every selected leaf replaced by its compressed container.

        Args:
          params: float parameter tree (compressed leaves outside ``where`` are kept).
          calibration: from `calibrate` (or a dict path → Hessian) when needed.

        Raises:
          ValueError: an unmatched pattern, missing calibration or statistics for a path, a
            selected leaf that is already compressed or not a float kernel, or a bad setting
            for a leaf (the message names the path).
        """
        calib = _as_calibration(calibration)
        if self.needs_calibration and calib is None:
            raise ValueError(
                f"recipe {self.name!r} needs calibration statistics ({', '.join(self.stats)}); "
                "pass calibration=calibrate(apply_fn, params, inputs, where=recipe.where)."
            )
        selected = match_paths(params, self.where)
        index = {p: i for i, p in enumerate(selected)}

        def one(path, w):
            if is_compressed(w):
                raise ValueError(
                    f"{path}: already compressed ({type(w).__name__}); recipe {self.name!r} "
                    "needs float weights — apply it to the float params or leave this path "
                    "out of `where`."
                )
            w = jnp.asarray(w)
            if not jnp.issubdtype(w.dtype, jnp.floating):
                raise ValueError(f"{path}: dtype {w.dtype} is not floating; exclude it.")
            if self.kernel_only and w.ndim < 2:
                raise ValueError(
                    f"{path}: shape {w.shape} is not a kernel (needs ≥ 2 axes); restrict "
                    "`where` to Dense/Conv kernels, e.g. r'(.*/)?kernel'."
                )
            w2 = w.reshape(-1, w.shape[-1]) if self.kernel_only else w
            stats = _leaf_stats(self, calib, path, w2)
            try:
                c = self.compress(w2, stats, index[path])
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from e
            return ReshapedKernel(c, tuple(w.shape)) if w2.shape != w.shape else c

        return map_matching(one, params, self.where)


def _where(where) -> str | tuple[str, ...]:
    if where is None:  # a config's `where: null`: every Dense/Conv kernel
        return ALL_KERNELS
    if isinstance(where, str):
        return where
    where = tuple(where)
    if not where or not all(isinstance(p, str) for p in where):
        raise ValueError(f"where={where!r}: give a regex or a non-empty list of regexes.")
    return where


def _as_calibration(c) -> Calibration | None:
    if c is None or isinstance(c, Calibration):
        return c
    if isinstance(c, dict):
        return Calibration(hessians=dict(c), absmax={}, num_samples=0)
    raise ValueError(
        f"calibration must be a Calibration (from calibrate) or a dict path → Hessian, got "
        f"{type(c).__name__}."
    )


def _leaf_stats(recipe, calib, path, w2) -> LeafStats:
    if calib is None:
        return LeafStats(None, None)
    got = {}
    for kind, table in (("hessian", calib.hessians), ("absmax", calib.absmax)):
        if kind not in recipe.stats:
            got[kind] = None
            continue
        if path not in table:
            raise ValueError(
                f"no calibration {kind} for {path}; it has {sorted(table)[:6]} — calibrate with "
                "the recipe's where (calibrate(..., where=recipe.where))."
            )
        got[kind] = jnp.asarray(table[path])
    h = got["hessian"]
    if h is not None and h.shape != (w2.shape[0],) * 2:
        raise ValueError(
            f"{path}: Hessian {h.shape} does not fit the kernel matrix {w2.shape} (d_in = "
            f"{w2.shape[0]}); was it calibrated on this model?"
        )
    return LeafStats(h, got["absmax"])


def _check_bits(name: str, bits, allow_none: bool = False) -> None:
    if bits is None and allow_none:
        return
    if not isinstance(bits, int | np.integer) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name}={bits!r}: allowed are integers {MIN_BITS}..{MAX_BITS}.")


def _check_group(name: str, group_size, rule: str) -> None:
    if group_size is not None and (not isinstance(group_size, int | np.integer) or group_size < 1):
        raise ValueError(f"{name}={group_size!r}: a positive integer or None (per channel).")
    if rule not in ("exact", "divisor"):
        raise ValueError(f"group_rule={rule!r}: use 'exact' or 'divisor'.")


def _group(n: int, group_size: int | None, rule: str) -> int | None:
    """The group length for a reduction axis of length n ('divisor': largest divisor ≤ g)."""
    if group_size is None or rule == "exact":
        return group_size
    return max(g for g in range(1, min(n, group_size) + 1) if n % g == 0)
