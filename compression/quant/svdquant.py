"""SVDQuant: absorb outliers into a 16-bit low-rank branch, quantize the rest to 4 bits (W4A4).

For y = X W (Flax layout, W of shape (d_in, d_out)):

1. Smooth as SmoothQuant does, moving activation outliers into the weights:
   X̂ = X diag(λ)⁻¹, Ŵ = diag(λ) W, λ_j = max|X_j|^α / max|W_j|^(1−α).
2. Split the smoothed weight with its rank-r truncated SVD, Ŵ = L₁L₂ + R,
   L₁ = U_r S_r^{1/2} (d_in, r), L₂ = S_r^{1/2} V_rᵀ (r, d_out), kept in 16 bits. The residual
   R = Ŵ − L₁L₂ has the outlier directions removed, so its range is small.
3. Quantize R to 4 bits (symmetric, groups of 64 along d_in) and the activations X̂ to 4 bits
   (per token × group of 64 channels):

       ŷ = X̂ L₁ L₂  +  Q(X̂) Q(R).

The error is ‖X̂ R − Q(X̂) Q(R)‖ only, with ‖R‖ ≤ ‖Ŵ‖ and the largest singular directions gone;
plain W4A4 and SmoothQuant W4A4 have to quantize the outliers themselves.

References:
  Li, Lin et al. (2025), "SVDQuant: Absorbing Outliers by Low-Rank Components for 4-Bit
  Diffusion Models", ICLR (reference code: mit-han-lab/deepcompressor, nunchaku).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct

from feynkit.compression.protocol import CompressedTensor, _check_matmul_input, array_bits
from feynkit.compression.quant.qarray import QuantizedArray, dequantize, quantize
from feynkit.compression.quant.smoothquant import quantize_activations, smooth_scales
from feynkit.core.types import Array, ArrayLike, Float

__all__ = ["SVDQuantLinear", "svdquant_apply", "svdquant_linear"]


@struct.dataclass
class SVDQuantLinear(CompressedTensor):
    """y = (x/λ) L₁ L₂ + Q_a(x/λ) · dequantize(residual).

    Protocol: ``matmul`` is `svdquant_apply` (``quantizes_activations`` when ``a_bits`` is set);
    ``dequantize()`` the effective float kernel diag(1/λ)(L₁L₂ + Q(R)); storage = residual +
    low-rank factors + smoothing vector at their stored dtypes.

    Attributes:
      inv_smooth: 1 / λ, shape (d_in,).
      l1: (d_in, r) and l2: (r, d_out), the low-rank branch in ``lowrank_dtype``.
      residual: the 4-bit quantized R = Ŵ − L₁L₂.
      a_bits, a_group_size: activation quantization (None bits: float activations).
    """

    inv_smooth: Array
    l1: Array
    l2: Array
    residual: QuantizedArray
    a_bits: int | None = struct.field(pytree_node=False, default=4)
    a_group_size: int | None = struct.field(pytree_node=False, default=64)

    @property
    def rank(self) -> int:
        return self.l1.shape[1]

    @property
    def quantizes_activations(self) -> bool:  # type: ignore[override]
        return self.a_bits is not None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.residual.shape

    @property
    def dtype(self):
        return self.residual.dtype

    @property
    def nbits(self) -> int:
        """Bits of the quantized residual, the low-rank factors and the smoothing vector."""
        return self.residual.nbits + array_bits(self.l1, self.l2, self.inv_smooth)

    def dequantize(self) -> Float[Array, "d_in d_out"]:
        f32 = jnp.float32
        w = self.l1.astype(f32) @ self.l2.astype(f32) + dequantize(self.residual).astype(f32)
        return (self.inv_smooth[:, None] * w).astype(self.dtype)

    def matmul(
        self, x: Float[ArrayLike, "... d_in"], implementation: str | None = None
    ) -> Float[Array, "... d_out"]:
        return svdquant_apply(self, x, implementation)


def svdquant_linear(
    w: Float[ArrayLike, "d_in d_out"],
    act_absmax: Float[ArrayLike, " d_in"] | None,
    rank: int = 32,
    bits: int = 4,
    group_size: int | None = 64,
    alpha: float = 0.5,
    *,
    a_bits: int | None = 4,
    a_group_size: int | None = 64,
    lowrank_dtype=jnp.bfloat16,
) -> SVDQuantLinear:
    """Build the SVDQuant layer: smoothing, rank-r SVD branch, 4-bit residual.

        Ŵ = diag(λ) W = U S Vᵀ,  L₁ = U_r S_r^{1/2},  L₂ = S_r^{1/2} V_rᵀ,
        residual = Q_{bits, group}(Ŵ − L₁L₂)   (L₁, L₂ rounded to ``lowrank_dtype`` first).

    Args:
      w: kernel (d_in, d_out).
      act_absmax: per-channel max|X_j| (`smoothquant.activation_absmax`); None: no smoothing.
      rank: r of the low-rank branch (0 < r ≤ min(d_in, d_out)).
      bits, group_size: residual quantization (symmetric RTN, groups along d_in).
      alpha: smoothing strength.
      a_bits, a_group_size: activation quantization applied by `svdquant_apply`.
      lowrank_dtype: storage dtype of L₁, L₂ (16-bit in the paper).

    Returns:
      An `SVDQuantLinear` pytree.

    References:
      Li, Lin et al. (2025), SVDQuant, Sec. 4 (Eq. 5–6).
    """
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w must be a (d_in, d_out) kernel, got shape {w.shape}.")
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank must be in [1, {min(w.shape)}] for a {w.shape} kernel, got {rank}.")
    d_in = w.shape[0]
    if act_absmax is None:
        lam = jnp.ones((d_in,), jnp.float32)
    else:
        lam = smooth_scales(act_absmax, w, alpha)
    ws = w.astype(jnp.float32) * lam[:, None]
    u, s, vt = jnp.linalg.svd(ws, full_matrices=False)
    root = jnp.sqrt(s[:rank])
    l1 = (u[:, :rank] * root[None, :]).astype(lowrank_dtype)
    l2 = (root[:, None] * vt[:rank]).astype(lowrank_dtype)
    resid = ws - l1.astype(jnp.float32) @ l2.astype(jnp.float32)
    rq = quantize(resid.astype(w.dtype), bits, group_size=group_size, axis=0, symmetric=True)
    return SVDQuantLinear(1.0 / lam, l1, l2, rq, a_bits, a_group_size)


def svdquant_apply(
    layer: SVDQuantLinear, x: Float[ArrayLike, "... d_in"], implementation: str | None = None
) -> Float[Array, "... d_out"]:
    """ŷ = X̂ L₁ L₂ (16-bit branch, unquantized activations) + Q_a(X̂) · Q(R), X̂ = x / λ.

    implementation: "pallas" runs both products in one kernel
    (`feynkit.compression.kernels.svdquant_fused`; interpret mode off a GPU), "reference" as
    separate XLA products, None: the kernel on a GPU when it serves the residual's layout.
    """
    from feynkit.compression.kernels._common import resolve_implementation
    from feynkit.compression.kernels.quantized_matmul import supports_quantized_array
    from feynkit.compression.kernels.svdquant_fused import svdquant_fused_matmul

    x = jnp.asarray(x)
    _check_matmul_input(x, layer.inv_smooth.shape[0], "SVDQuantLinear")
    xs = x * layer.inv_smooth.astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,))
    xq = xs if layer.a_bits is None else quantize_activations(xs, layer.a_bits, layer.a_group_size)
    r = layer.residual
    if resolve_implementation(implementation) == "pallas":
        reason = supports_quantized_array(r)
        if reason is None:
            return svdquant_fused_matmul(
                xs, layer.l1, layer.l2, r.codes, r.scale, r.zero,
                x_quant=None if layer.a_bits is None else xq, bits=r.bits,
                group_size=r.group_size, k=r.shape[0], implementation="pallas",
            )
        if implementation == "pallas":
            raise ValueError(f"svdquant_apply(implementation='pallas'): {reason}.")
    low = (xs @ layer.l1.astype(x.dtype)) @ layer.l2.astype(x.dtype)
    return low + xq @ dequantize(r).astype(x.dtype)
