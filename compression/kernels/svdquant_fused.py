"""SVDQuant's fused product: 4-bit residual + 16-bit low-rank branch in one Pallas kernel.

    y = x_low · L₁ · L₂  +  x_q · dequant(R)        (x_q = x_low when activations stay float)

SVDQuant (`compression/quant/svdquant.py`) runs the rank-r branch as two extra small matmuls,
which re-read the activations and cost ≈ 57% extra latency at rank 32 per the SVDQuant authors.
Here the weight-only kernel of `quantized_matmul` carries a second accumulator: on each K step it
adds x_tile · L₁[k-tile] (bm × r) next to the int4 product (from the very x tiles it already
loaded when x_q = x_low), and after the K loop adds low · L₂[:, n-tile] to the output tile. The
branch is linear, so split-K partial tiles still sum to the right answer. Each N tile recomputes
x·L₁ for its rows (K·r·bm extra FLOPs, L₁ read from L2 cache): at r = 32 that is r/N_tile of
the main product's FLOPs and nothing extra from device memory beyond L₁, L₂ themselves.
Hopper has no int4 tensor cores, so the 4-bit codes are upcast to bf16 in registers: W4A4 is an
accuracy/memory feature here, not a speed one (x_q is the fake-quantized activation).

References:
  Li, Lin et al. (2025), "SVDQuant: Absorbing Outliers by Low-Rank Components for 4-Bit
  Diffusion Models", ICLR, Sec. 4.3 (Nunchaku: fusing the low-rank branch into the 4-bit kernel).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from feynkit.compression.kernels import _common as C
from feynkit.compression.kernels.quantized_matmul import (
    QMatmulBlocks,
    _launch,
    _normalize,
    _plan,
    weight_only_matmul_reference,
)

__all__ = ["svdquant_fused_matmul", "svdquant_fused_matmul_reference"]


def _check_lowrank(x_low, x_quant, l1, l2, k, n):
    if l1.ndim != 2 or l1.shape[0] != k or l2.ndim != 2 or l2.shape != (l1.shape[1], n):
        raise ValueError(
            f"l1 must be (K, r) = ({k}, r) and l2 (r, N) = (r, {n}); got {l1.shape}, {l2.shape}."
        )
    if x_quant is not None and x_quant.shape != x_low.shape:
        raise ValueError(f"x_quant has shape {x_quant.shape}; it must match x_low {x_low.shape}.")


def svdquant_fused_matmul_reference(
    x_low,
    l1,
    l2,
    codes,
    scale,
    zero=None,
    *,
    x_quant=None,
    bits: int = 4,
    group_size: int,
    k: int,
    out_dtype=None,
):
    """(x_low · L₁) · L₂ + x_q · dequant(R) as separate XLA products (`svdquant_apply`'s order)."""
    x_low = jnp.asarray(x_low)
    cd = x_low.dtype
    low = (x_low @ jnp.asarray(l1).astype(cd)) @ jnp.asarray(l2).astype(cd)
    xq = x_low if x_quant is None else jnp.asarray(x_quant)
    main = weight_only_matmul_reference(
        xq, codes, scale, zero, bits=bits, group_size=group_size, k=k
    )
    return (low + main).astype(out_dtype or cd)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "k", "blocks", "out_dtype"))
def _pallas(x_low, x_quant, l1, l2, codes, scale, zero, *, bits, group_size, k, blocks, out_dtype):
    lead, n = x_low.shape[:-1], codes.shape[1]
    main = x_low if x_quant is None else x_quant
    xl = None if x_quant is None else x_low.reshape(-1, k)
    y = _launch(
        main.reshape(-1, k),
        codes,
        scale,
        zero,
        bits=bits,
        group_size=group_size,
        k=k,
        blocks=blocks,
        cd=x_low.dtype,
        out_dtype=jnp.dtype(out_dtype),
        lowrank=(xl, l1, l2),
    )
    return y.reshape(lead + (n,))


def svdquant_fused_matmul(
    x_low,
    l1,
    l2,
    codes,
    scale,
    zero=None,
    *,
    x_quant=None,
    bits: int = 4,
    group_size: int,
    k: int,
    implementation: str | None = None,
    blocks: QMatmulBlocks | None = None,
    out_dtype=None,
):
    """y = x_low · L₁ · L₂ + x_q · dequant(R) in one kernel (implementation="pallas").

    Args:
      x_low: (..., K) smoothed activations X̂ (the branch's input; also the main product's
        when ``x_quant`` is None). l1: (K, r); l2: (r, N) (bf16 in SVDQuant).
      codes, scale, zero, bits, group_size, k: the residual R as in `weight_only_matmul`.
      x_quant: Q_a(X̂), the fake-quantized activations of the W4A4 path, or None.
      implementation: "pallas", "reference" or None (kernel on GPU, reference elsewhere).
      blocks: `QMatmulBlocks`; out_dtype: default x_low's dtype (also the compute dtype).
    """
    x_low = jnp.asarray(x_low)
    codes, l1, l2 = jnp.asarray(codes), jnp.asarray(l1), jnp.asarray(l2)
    x_quant = None if x_quant is None else jnp.asarray(x_quant)
    scale, zero = _normalize(x_low, codes, scale, zero, bits, group_size, k)
    _check_lowrank(x_low, x_quant, l1, l2, k, codes.shape[1])
    out_dtype = jnp.dtype(out_dtype or x_low.dtype)
    if C.resolve_implementation(implementation) == "reference":
        return svdquant_fused_matmul_reference(
            x_low,
            l1,
            l2,
            codes,
            scale,
            zero,
            x_quant=x_quant,
            bits=bits,
            group_size=group_size,
            k=k,
            out_dtype=out_dtype,
        )
    blocks = blocks or QMatmulBlocks()
    _plan(1, k, codes.shape[1], bits, group_size, blocks)
    return _pallas(
        x_low,
        x_quant,
        l1,
        l2,
        codes,
        scale,
        zero,
        bits=bits,
        group_size=group_size,
        k=k,
        blocks=blocks,
        out_dtype=out_dtype,
    )
