"""M-FAC: matrix-free inverse-Fisher-vector products from m gradients (the static algorithm).

The empirical Fisher of m gradients g_1..g_m ∈ ℝ^d with damping λ is

    F = λ I + (1/m) Σ_k g_k g_kᵀ.

Adding the gradients one at a time, Sherman–Morrison gives with a_k = F_{k−1}⁻¹ g_k and
den_k = m + g_kᵀ a_k

    F⁻¹ v = v / λ − Σ_k a_k (a_kᵀ v) / den_k,      diag F⁻¹ = 1/λ − Σ_k a_k² / den_k.

M-FAC never forms F: writing a_k = Σ_i B_ki g_i (B lower triangular, m × m), the recursion

    B_k = e_k / λ − Σ_{i<k} ((B K)_ik / den_i) B_i,      den_k = m + (B K)_kk,   K = G Gᵀ,

costs O(m² d + m³), and each product F⁻¹ v = v/λ − Gᵀ Bᵀ D B (G v) with D = diag(1/den) costs
O(m d). `mfac` applies it block-diagonally (oBERT's blocks of B consecutive weights): ``grads``
(m, n_blocks, B) with one independent Fisher per block.

References:
  Frantar, Kurtic & Alistarh (2021), "M-FAC: Efficient Matrix-Free Approximations of
  Second-Order Information" (NeurIPS), Section 3 (static algorithm).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from feynkit.core.types import Array, ArrayLike, Float

__all__ = ["MFAC", "mfac", "mfac_diag", "mfac_ifvp"]

_HI = jax.lax.Precision.HIGHEST


class MFAC(NamedTuple):
    """Factors of a block-diagonal empirical inverse Fisher.

    Attributes:
      grads: (n_blocks, m, B) the gradients per block.
      coef: (n_blocks, m, m) lower-triangular B with a_k = Σ_i B_ki g_i.
      den: (n_blocks, m) the denominators m + g_kᵀ a_k.
      damp: λ (a float, or a traced scalar under ``jit``).
    """

    grads: Array
    coef: Array
    den: Array
    damp: float


def _factor_block(G: Array, damp) -> tuple[Array, Array]:
    m = G.shape[0]
    K = jnp.matmul(G, G.T, precision=_HI)
    eye = jnp.eye(m, dtype=G.dtype)

    def step(carry, k):
        Bm, den = carry
        c = jnp.matmul(Bm, K[:, k], precision=_HI)  # (B K)_{ik} = a_iᵀ g_k for i < k
        w = jnp.where(jnp.arange(m) < k, c / den, 0.0)
        row = eye[k] / damp - jnp.matmul(w, Bm, precision=_HI)
        Bm = Bm.at[k].set(row)
        den = den.at[k].set(m + jnp.dot(row, K[:, k], precision=_HI))
        return (Bm, den), None

    init = (jnp.zeros((m, m), G.dtype), jnp.ones((m,), G.dtype))
    (Bm, den), _ = jax.lax.scan(step, init, jnp.arange(m))
    return Bm, den


def mfac(grads: Float[ArrayLike, "m d"], damp: float = 1e-4, block_size: int | None = None) -> MFAC:
    """Factor the (block-diagonal) damped empirical Fisher of ``grads``.

    Args:
      grads: (m, d) gradients, one per row.
      damp: λ > 0.
      block_size: B dividing d for a block-diagonal Fisher (None: one block of size d).

    Returns:
      `MFAC` factors for `mfac_ifvp` and `mfac_diag`.
    """
    g = jnp.asarray(grads)
    g = g.astype(jnp.promote_types(g.dtype, jnp.float32))
    if g.ndim != 2 or g.shape[0] < 1:
        raise ValueError(f"grads must be (m, d) with m ≥ 1 gradients, got shape {g.shape}.")
    if not isinstance(damp, jax.core.Tracer) and not damp > 0:
        raise ValueError(f"damp={damp!r} must be > 0 (the Fisher is singular for m < d).")
    m, d = g.shape
    B = d if block_size is None else int(block_size)
    if B < 1 or d % B:
        raise ValueError(f"block_size={block_size!r} must divide the dimension d={d}.")
    blocks = jnp.moveaxis(g.reshape(m, d // B, B), 1, 0)  # (nb, m, B)
    coef, den = jax.vmap(_factor_block, in_axes=(0, None))(blocks, damp)
    return MFAC(blocks, coef, den, damp if isinstance(damp, jax.core.Tracer) else float(damp))


def mfac_ifvp(f: MFAC, v: Float[ArrayLike, " d"]) -> Array:
    """F⁻¹ v for a (d,) vector (blocks of `mfac`'s block size)."""
    nb, m, B = f.grads.shape
    v = jnp.asarray(v, f.grads.dtype)
    if v.shape != (nb * B,):
        raise ValueError(f"v has shape {v.shape}; expected ({nb * B},).")
    vb = v.reshape(nb, B)
    Gv = jnp.einsum("nmb,nb->nm", f.grads, vb, precision=_HI)
    BGv = jnp.einsum("nkm,nm->nk", f.coef, Gv, precision=_HI) / f.den
    a_coef = jnp.einsum("nkm,nk->nm", f.coef, BGv, precision=_HI)  # Bᵀ D B G v
    out = vb / f.damp - jnp.einsum("nm,nmb->nb", a_coef, f.grads, precision=_HI)
    return out.reshape(-1)


def mfac_diag(f: MFAC) -> Array:
    """diag F⁻¹, (d,)."""
    A = jnp.einsum("nkm,nmb->nkb", f.coef, f.grads, precision=_HI)  # rows a_k per block
    diag = 1.0 / f.damp - jnp.sum(A**2 / f.den[..., None], axis=1)
    return diag.reshape(-1)
