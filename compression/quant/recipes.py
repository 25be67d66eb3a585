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

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from feynkit.compression.quant.dfloat11 import dfloat11_compress
from feynkit.compression.quant.eora import (
    LowRankCompensated,
    eora_compensation,
    svd_compensation,
)
from feynkit.compression.quant.gptq import gptq_quantize
from feynkit.compression.quant.qarray import quantize
from feynkit.compression.quant.quant_recipe import (
    LeafStats,
    QuantRecipe,
    _check_bits,
    _check_group,
    _group,
    _where,
)
from feynkit.compression.quant.smoothquant import smoothquant_linear
from feynkit.compression.quant.spqr import spqr_quantize
from feynkit.compression.quant.svdquant import svdquant_linear
from feynkit.compression.quant.tree import ALL_KERNELS
from feynkit.compression.quant.vptq import vptq_quantize

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
