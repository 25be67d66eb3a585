"""Quantization recipes: one factory per method, each returning a `QuantRecipe`.

A recipe maps a float parameter tree to a compressed one,

    qparams = recipe(params, calibration=None),

compressing every leaf its ``where`` regexes select (default: every Dense and Conv kernel) with
its method; ``recipe.needs_calibration`` says whether it reads statistics from `calibrate`
(Hessians for GPTQ/SpQR/VPTQ/EoRA, activation maxima for SmoothQuant/SVDQuant). An N-D kernel
(a Conv's (kh, kw, c_in, c_out)) is compressed as its im2col matrix (kh·kw·c_in, c_out), whose
Hessian `calibrate` collects from im2col patches, and stored as a `ReshapedKernel`. The
factories' arguments are plain values, so they are the ``_target_`` of the Hydra ``quant/``
config group.

    recipe = gptq_recipe(bits=4, group_size=32)
    calib = calibrate(model.forward, params, (x, t, label), where=recipe.where)
    qparams = recipe(params, calib)
    eps = jax.jit(compressed_apply(model.forward))(qparams, x, t, label)

References:
  Frantar et al. (2023), "GPTQ"; Dettmers et al. (2024), "SpQR"; Liu et al. (2024), "VPTQ";
  Xiao et al. (2023), "SmoothQuant"; Li, Lin et al. (2025), "SVDQuant"; Zhang et al. (2025),
  "DFloat11"; Liu et al. (2024), "EoRA".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from feynkit.compression.protocol import CompressedTensor, ReshapedKernel, is_compressed
from feynkit.compression.quant.calibration import Calibration
from feynkit.compression.quant.dfloat11 import dfloat11_compress
from feynkit.compression.quant.eora import (
    LowRankCompensated,
    eora_compensation,
    svd_compensation,
)
from feynkit.compression.quant.gptq import gptq_quantize
from feynkit.compression.quant.qarray import MAX_BITS, MIN_BITS, quantize
from feynkit.compression.quant.smoothquant import smoothquant_linear
from feynkit.compression.quant.spqr import spqr_quantize
from feynkit.compression.quant.svdquant import svdquant_linear
from feynkit.compression.quant.tree import ALL_KERNELS, map_matching, match_paths
from feynkit.compression.quant.vptq import vptq_quantize
from feynkit.core.types import Array, PyTree

__all__ = [
    "RECIPES",
    "LeafStats",
    "QuantRecipe",
    "dfloat11_recipe",
    "eora_recipe",
    "gptq_recipe",
    "rtn_recipe",
    "smoothquant_recipe",
    "spqr_recipe",
    "svdquant_recipe",
    "vptq_recipe",
]


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


def _name(base: str, **parts) -> str:
    return base + "".join(f"_{k}{v}" for k, v in parts.items() if v is not None)


def _finish(recipe: QuantRecipe, eora_rank: int | None) -> QuantRecipe:
    return recipe if eora_rank is None else eora_recipe(recipe, rank=eora_rank)


def rtn_recipe(
    bits: int = 4,
    *,
    group_size: int | None = None,
    group_rule: str = "exact",
    symmetric: bool = True,
    where: str | Sequence[str] = ALL_KERNELS,
    eora_rank: int | None = None,
) -> QuantRecipe:
    """Round-to-nearest weights, c = clip(round(w / s) + z), per output channel × group.

    Args:
      bits: 2..8. group_size: group length along d_in (None: one group per output channel).
      group_rule: "exact" (group_size must divide d_in) or "divisor" (the largest divisor of
        d_in not above group_size, for models with mixed widths).
      symmetric: signed codes without zero point. where: paths to compress.
      eora_rank: add an EoRA low-rank correction of this rank (then needs calibration).

    Returns:
      A `QuantRecipe` producing `QuantizedArray` leaves.

    References:
      Jacob et al. (2018); Dettmers et al. (2022), "LLM.int8()".
    """
    _check_bits("bits", bits)
    _check_group("group_size", group_size, group_rule)

    def compress(w, stats, i):
        gs = _group(w.shape[0], group_size, group_rule)
        return quantize(w, bits, group_size=gs, axis=0, symmetric=symmetric)

    name = _name(f"rtn{bits}", g=group_size) + ("" if symmetric else "_asym")
    return _finish(QuantRecipe(name, compress, _where(where)), eora_rank)


def gptq_recipe(
    bits: int = 4,
    *,
    group_size: int | None = None,
    group_rule: str = "exact",
    symmetric: bool = True,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    where: str | Sequence[str] = ALL_KERNELS,
    eora_rank: int | None = None,
) -> QuantRecipe:
    """GPTQ: second-order rounding with the input Hessian of each kernel (`gptq_quantize`).

    Args:
      bits, group_size, group_rule, symmetric, where, eora_rank: as in `rtn_recipe`.
      percdamp, block_size, act_order: as in `gptq_quantize`.

    Returns:
      A `QuantRecipe` (needs calibration: Hessians) producing `QuantizedArray` leaves.

    References:
      Frantar et al. (2023), "GPTQ".
    """
    _check_bits("bits", bits)
    _check_group("group_size", group_size, group_rule)
    if not percdamp >= 0:
        raise ValueError(f"percdamp={percdamp!r} must be ≥ 0 (GPTQ uses 0.01).")

    def compress(w, stats, i):
        gs = _group(w.shape[0], group_size, group_rule)
        return gptq_quantize(
            w,
            stats.hessian,
            bits,
            group_size=gs,
            symmetric=symmetric,
            percdamp=percdamp,
            block_size=block_size,
            act_order=act_order,
        )

    name = _name(f"gptq{bits}", g=group_size) + ("" if symmetric else "_asym")
    recipe = QuantRecipe(name, compress, _where(where), True, ("hessian",))
    return _finish(recipe, eora_rank)


def spqr_recipe(
    bits: int = 3,
    *,
    group_size: int = 16,
    qq_bits: int = 3,
    qq_group_size: int = 16,
    outlier_threshold: float = 0.2,
    percdamp: float = 0.01,
    act_order: bool = True,
    where: str | Sequence[str] = ALL_KERNELS,
    eora_rank: int | None = None,
) -> QuantRecipe:
    """SpQR: GPTQ in tiny groups with 3-bit statistics and fp16 outliers (`spqr_quantize`).

    Returns:
      A `QuantRecipe` (needs calibration: Hessians) producing `SpQRArray` leaves.

    References:
      Dettmers et al. (2024), "SpQR".
    """
    _check_bits("bits", bits)
    _check_bits("qq_bits", qq_bits)
    if not outlier_threshold > 0:
        raise ValueError(f"outlier_threshold={outlier_threshold!r} must be > 0 (inf disables).")

    def compress(w, stats, i):
        return spqr_quantize(
            w,
            stats.hessian,
            bits,
            group_size=group_size,
            qq_bits=qq_bits,
            qq_group_size=qq_group_size,
            outlier_threshold=outlier_threshold,
            percdamp=percdamp,
            act_order=act_order,
        )

    recipe = QuantRecipe(f"spqr{bits}_g{group_size}", compress, _where(where), True, ("hessian",))
    return _finish(recipe, eora_rank)


def vptq_recipe(
    *,
    vector_len: int = 4,
    num_centroids: int = 256,
    num_res_centroids: int = 0,
    kmeans_iters: int = 25,
    hessian_weighted: bool = True,
    use_obs: bool = True,
    seed: int = 0,
    where: str | Sequence[str] = ALL_KERNELS,
    eora_rank: int | None = None,
) -> QuantRecipe:
    """VPTQ: k-means codebooks of length-v output vectors with OBS feedback (`vptq_quantize`).

    Kernel i (in path order) uses the key fold_in(key(seed), i).

    Returns:
      A `QuantRecipe` producing `VQArray` leaves; it needs calibration (Hessians) unless
      ``hessian_weighted`` and ``use_obs`` are both False.

    References:
      Liu et al. (2024), "VPTQ".
    """
    needs = bool(hessian_weighted or use_obs)

    def compress(w, stats, i):
        return vptq_quantize(
            jax.random.fold_in(jax.random.key(seed), i),
            w,
            stats.hessian,
            vector_len=vector_len,
            num_centroids=num_centroids,
            num_res_centroids=num_res_centroids,
            kmeans_iters=kmeans_iters,
            hessian_weighted=hessian_weighted,
            use_obs=use_obs,
        )

    name = _name(f"vptq_v{vector_len}_k{num_centroids}", r=num_res_centroids or None)
    recipe = QuantRecipe(name, compress, _where(where), needs, ("hessian",) if needs else ())
    return _finish(recipe, eora_rank)


def _dtype(d):
    return jnp.dtype(d)


def smoothquant_recipe(
    *,
    w_bits: int = 8,
    a_bits: int | None = 8,
    alpha: float = 0.5,
    w_group_size: int | None = None,
    a_group_size: int | None = None,
    group_rule: str = "exact",
    smooth: bool = True,
    where: str | Sequence[str] = ALL_KERNELS,
) -> QuantRecipe:
    """SmoothQuant W{w_bits}A{a_bits}: migrate activation outliers into the weights, quantize both.

    Args:
      w_bits, a_bits (None: weight-only), alpha, w_group_size, a_group_size: as in
        `smoothquant_linear`; group_rule: as in `rtn_recipe` (applies to both groups).
      smooth: False gives plain W·A· round-to-nearest (no calibration).

    Returns:
      A `QuantRecipe` producing `SmoothQuantLinear` leaves (run them with `compressed_apply`).

    References:
      Xiao et al. (2023), "SmoothQuant".
    """
    _check_bits("w_bits", w_bits)
    _check_bits("a_bits", a_bits, allow_none=True)
    _check_group("w_group_size", w_group_size, group_rule)
    _check_group("a_group_size", a_group_size, group_rule)

    def compress(w, stats, i):
        n = w.shape[0]
        return smoothquant_linear(
            w,
            stats.absmax if smooth else None,
            w_bits=w_bits,
            a_bits=a_bits,
            alpha=alpha,
            w_group_size=_group(n, w_group_size, group_rule),
            a_group_size=_group(n, a_group_size, group_rule),
        )

    name = f"smoothquant_w{w_bits}a{a_bits}" if smooth else f"rtn_w{w_bits}a{a_bits}"
    return QuantRecipe(name, compress, _where(where), smooth, ("absmax",) if smooth else ())


def svdquant_recipe(
    *,
    rank: int = 32,
    bits: int = 4,
    group_size: int | None = 64,
    alpha: float = 0.5,
    a_bits: int | None = 4,
    a_group_size: int | None = 64,
    group_rule: str = "exact",
    smooth: bool = True,
    lowrank_dtype: str = "bfloat16",
    where: str | Sequence[str] = ALL_KERNELS,
) -> QuantRecipe:
    """SVDQuant (W4A4 by default): smoothing, a 16-bit rank-r branch, a 4-bit residual.

    Args:
      rank, bits, group_size, alpha, a_bits, a_group_size, lowrank_dtype: as in
        `svdquant_linear` (rank capped at min(d_in, d_out) for small kernels); group_rule: as
        in `rtn_recipe`; smooth: False skips smoothing (no calibration).

    Returns:
      A `QuantRecipe` producing `SVDQuantLinear` leaves (run them with `compressed_apply`).

    References:
      Li, Lin et al. (2025), "SVDQuant".
    """
    _check_bits("bits", bits)
    _check_bits("a_bits", a_bits, allow_none=True)
    _check_group("group_size", group_size, group_rule)
    _check_group("a_group_size", a_group_size, group_rule)
    if not isinstance(rank, int | np.integer) or rank < 1:
        raise ValueError(f"rank={rank!r} must be a positive integer.")
    dt = _dtype(lowrank_dtype)

    def compress(w, stats, i):
        n = w.shape[0]
        return svdquant_linear(
            w,
            stats.absmax if smooth else None,
            min(rank, min(w.shape)),
            bits,
            _group(n, group_size, group_rule),
            alpha,
            a_bits=a_bits,
            a_group_size=_group(n, a_group_size, group_rule),
            lowrank_dtype=dt,
        )

    name = f"svdquant_w{bits}a{a_bits}_r{rank}"
    return QuantRecipe(name, compress, _where(where), smooth, ("absmax",) if smooth else ())


def dfloat11_recipe(
    *, block_size: int = 512, where: str | Sequence[str] = ALL_KERNELS
) -> QuantRecipe:
    """DFloat11: bf16 weights with Huffman-coded exponents, decoded bit-exactly.

    Float32 weights are rounded to bf16 first (the only loss); ``dequantize()`` returns the
    leaf's original dtype.

    References:
      Zhang et al. (2025), "70% Size, 100% Accuracy" (DFloat11).
    """
    if not isinstance(block_size, int | np.integer) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive integer.")

    def compress(w, stats, i):
        d = dfloat11_compress(np.asarray(w.astype(jnp.bfloat16)), block_size=block_size)
        return d.replace(dtype=np.dtype(w.dtype))

    return QuantRecipe("dfloat11", compress, _where(where), kernel_only=False)


def eora_recipe(
    base: QuantRecipe, *, rank: int = 8, method: str = "eora", factor_dtype: str = "float16"
) -> QuantRecipe:
    """``base`` plus a rank-r correction of its error, Ŵ = base(W) + A B (`LowRankCompensated`).

    ``method="eora"`` minimises ‖X(ΔW − AB)‖ with the calibration Hessian (EoRA);
    ``method="svd"`` the plain ‖ΔW − AB‖ (truncated SVD, no statistics needed beyond base's).
    The rank is capped at min(d_in, d_out) for small kernels.

    Returns:
      A `QuantRecipe` producing `LowRankCompensated` leaves; factors stored in factor_dtype.

    References:
      Liu et al. (2024), "EoRA".
    """
    if not isinstance(base, QuantRecipe) or not base.kernel_only:
        raise ValueError("eora_recipe needs a kernel QuantRecipe as base (rtn, gptq, spqr, ...).")
    if method not in ("eora", "svd"):
        raise ValueError(f"method={method!r}: use 'eora' or 'svd'.")
    if not isinstance(rank, int | np.integer) or rank < 1:
        raise ValueError(f"rank={rank!r} must be a positive integer.")
    dt = _dtype(factor_dtype)
    needs_h = method == "eora"

    def compress(w, stats, i):
        c = base.compress(w, stats, i)
        delta = w.astype(jnp.float32) - c.dequantize().astype(jnp.float32)
        r = min(rank, min(w.shape))
        comp = eora_compensation(delta, stats.hessian, r) if needs_h else svd_compensation(delta, r)
        return LowRankCompensated(c, comp.a.astype(dt), comp.b.astype(dt))

    stats = tuple(dict.fromkeys(base.stats + (("hessian",) if needs_h else ())))
    return QuantRecipe(
        f"{base.name}+{method}{rank}",
        compress,
        base.where,
        base.needs_calibration or needs_h,
        stats,
    )


RECIPES: dict[str, Callable[..., QuantRecipe]] = {
    "rtn": rtn_recipe,
    "gptq": gptq_recipe,
    "spqr": spqr_recipe,
    "vptq": vptq_recipe,
    "smoothquant": smoothquant_recipe,
    "svdquant": svdquant_recipe,
    "dfloat11": dfloat11_recipe,
}
"""Method name → recipe factory (``eora_recipe`` wraps any of them)."""
