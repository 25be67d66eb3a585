"""EoRA: low-rank compensation of a compression error in the eigenspace of the input activations.

A compressed linear layer y = x Ŵ (Flax layout, W of shape (d_in, d_out)) is corrected by a
16-bit low-rank path, y = x Ŵ + (x A) B with A (d_in, r) and B (r, d_out). EoRA chooses A, B to
minimise the error the layer makes on its calibration inputs X (n, d_in),

    min_{rank(AB) ≤ r} ‖X (ΔW − A B)‖_F²,   ΔW = W − Ŵ.

With C = XᵀX = Q Λ Qᵀ, ‖X M‖_F = ‖Λ^{1/2} Qᵀ M‖_F for every M, so the problem is plain low-rank
approximation of the projected error ΔW' = (Q Λ^{1/2})ᵀ ΔW: truncated SVD ΔW' ≈ U_r S_r V_rᵀ
(Eckart–Young), mapped back through (Q Λ^{1/2})^{-ᵀ} = Q Λ^{-1/2}:

    A = Q Λ^{-1/2} U_r S_r^{1/2},   B = S_r^{1/2} V_rᵀ.

This is optimal for the activation-weighted error (when C is non-singular), while the plain SVD
of ΔW (`svd_compensation`) is optimal only for ‖ΔW − AB‖_F, which treats every input direction
as equally important.

References:
  Liu et al. (2024), "EoRA: Training-free Compensation for Compressed LLM with Eigenspace
  Low-Rank Approximation", arXiv:2410.21271.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from flax import struct

from feynkit.compression.protocol import CompressedTensor, array_bits
from feynkit.core.types import Array, ArrayLike, Float

__all__ = [
    "LowRankCompensated",
    "LowRankCompensation",
    "activation_weighted_error",
    "apply_compensation",
    "eora_compensation",
    "svd_compensation",
]


class LowRankCompensation(NamedTuple):
    """The low-rank correction x ↦ (x A) B added to a compressed layer's output.

    Attributes:
      a: shape (d_in, r).
      b: shape (r, d_out).
    """

    a: Array
    b: Array


@struct.dataclass
class LowRankCompensated(CompressedTensor):
    """A compressed kernel plus a low-rank correction: Ŵ = base.dequantize() + A B.

    Serves y = base.matmul(x) + (x A) B (the correction through the rank-r bottleneck, so an
    activation-quantizing base keeps quantizing its own part). Storage = base + A, B at their
    stored dtype (fp16 by `eora_recipe`).

    Attributes:
      base: any compressed 2-D container (QuantizedArray, SpQRArray, VQArray, ...).
      a: (d_in, r); b: (r, d_out).

    References:
      Liu et al. (2024), "EoRA".
    """

    base: CompressedTensor
    a: Array
    b: Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    @property
    def quantizes_activations(self) -> bool:  # type: ignore[override]
        return self.base.quantizes_activations

    @property
    def nbits(self) -> int:
        return self.base.nbits + array_bits(self.a, self.b)

    def dequantize(self) -> Float[Array, "d_in d_out"]:
        w = self.base.dequantize()
        lowrank = self.a.astype(jnp.float32) @ self.b.astype(jnp.float32)
        return (w.astype(jnp.float32) + lowrank).astype(w.dtype)

    def matmul(self, x: Float[ArrayLike, "... d_in"]) -> Float[Array, "... d_out"]:
        x = jnp.asarray(x)
        y = self.base.matmul(x)
        return y + apply_compensation(x, LowRankCompensation(self.a, self.b)).astype(y.dtype)


def _check(delta_w, rank):
    delta_w = jnp.asarray(delta_w)
    if delta_w.ndim != 2:
        raise ValueError(f"the weight error must be a (d_in, d_out) matrix, got {delta_w.shape}.")
    if not 1 <= rank <= min(delta_w.shape):
        raise ValueError(f"rank must be in [1, {min(delta_w.shape)}], got {rank}.")
    return delta_w.astype(jnp.float32)


def _split_svd(u, s, vt, rank):
    root = jnp.sqrt(s[:rank])
    return u[:, :rank] * root[None, :], root[:, None] * vt[:rank]


def svd_compensation(delta_w: Float[ArrayLike, "d_in d_out"], rank: int) -> LowRankCompensation:
    """Plain truncated SVD of the weight error, ΔW ≈ A B (the baseline EoRA improves on).

        ΔW = U S Vᵀ,   A = U_r S_r^{1/2},   B = S_r^{1/2} V_rᵀ,

    optimal for ‖ΔW − AB‖_F, blind to which input directions the layer actually sees.

    Args:
      delta_w: W − Ŵ, shape (d_in, d_out).
      rank: r.

    Returns:
      `LowRankCompensation(a (d_in, r), b (r, d_out))` in float32.

    References:
      Eckart & Young (1936); the "SVD" baseline of Liu et al. (2024), EoRA.
    """
    delta_w = _check(delta_w, rank)
    u, s, vt = jnp.linalg.svd(delta_w, full_matrices=False)
    return LowRankCompensation(*_split_svd(u, s, vt, rank))


def eora_compensation(
    delta_w: Float[ArrayLike, "d_in d_out"],
    cov: Float[ArrayLike, "d_in d_in"],
    rank: int,
    *,
    eps: float = 1e-6,
) -> LowRankCompensation:
    """EoRA: the rank-r correction minimising the activation-weighted error ‖X(ΔW − AB)‖_F.

        C = Q Λ Qᵀ,  ΔW' = (Q Λ^{1/2})ᵀ ΔW ≈ U_r S_r V_rᵀ,
        A = Q Λ^{-1/2} U_r S_r^{1/2},   B = S_r^{1/2} V_rᵀ.

    Eigenvalues below ``eps · max(λ)`` (directions the calibration data never visits, and
    round-off negatives) are raised to that floor, so the back-projection stays finite. Any
    positive multiple of XᵀX (e.g. the GPTQ Hessian 2/n·XᵀX) gives the same A B.

    Args:
      delta_w: W − Ŵ, shape (d_in, d_out) (Flax kernel layout).
      cov: C = XᵀX of the layer inputs, shape (d_in, d_in), symmetric positive semidefinite.
      rank: r.
      eps: relative eigenvalue floor.

    Returns:
      `LowRankCompensation(a (d_in, r), b (r, d_out))` in float32.

    References:
      Liu et al. (2024), "EoRA: Training-free Compensation for Compressed LLM with Eigenspace
      Low-Rank Approximation".
    """
    delta_w = _check(delta_w, rank)
    cov = jnp.asarray(cov, jnp.float32)
    if cov.shape != (delta_w.shape[0],) * 2:
        raise ValueError(
            f"cov must be ({delta_w.shape[0]}, {delta_w.shape[0]}) to match the weight error "
            f"{delta_w.shape}, got {cov.shape}."
        )
    lam, q = jnp.linalg.eigh(0.5 * (cov + cov.T))
    lam = jnp.maximum(lam, eps * jnp.maximum(lam[-1], jnp.finfo(jnp.float32).tiny))
    root = jnp.sqrt(lam)
    projected = (q * root[None, :]).T @ delta_w  # (Q Λ^{1/2})ᵀ ΔW
    u, s, vt = jnp.linalg.svd(projected, full_matrices=False)
    a, b = _split_svd(u, s, vt, rank)
    return LowRankCompensation((q / root[None, :]) @ a, b)


def apply_compensation(
    x: Float[ArrayLike, "... d_in"], comp: LowRankCompensation
) -> Float[Array, "... d_out"]:
    """The correction term (x A) B, computed through the rank-r bottleneck."""
    x = jnp.asarray(x)
    return (x @ comp.a.astype(x.dtype)) @ comp.b.astype(x.dtype)


def activation_weighted_error(
    delta_w: Float[ArrayLike, "d_in d_out"], cov: Float[ArrayLike, "d_in d_in"]
) -> Float[Array, ""]:
    """‖X ΔW‖_F² = tr(ΔWᵀ C ΔW), the squared output error of a weight error on inputs X."""
    delta_w = jnp.asarray(delta_w, jnp.float32)
    return jnp.sum(delta_w * (jnp.asarray(cov, jnp.float32) @ delta_w))
