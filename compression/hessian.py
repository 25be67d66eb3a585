"""Shared second-order (Optimal Brain Surgeon) machinery for GPTQ, SparseGPT and OBS pruning.

For a linear layer y = W x (reference layout: W is (out, in), one row per output channel) and the
layer-wise objective ‖W X − Ŵ X‖², the Hessian with respect to each row is H = 2/n · Σ x xᵀ.
Processing input columns left to right, OBS fixes column j to a value q_j and compensates the
remaining columns optimally:

    δ_{j:} = −(w_j − q_j) / [H_F⁻¹]_jj · [H_F⁻¹]_{j, j:}

where F are the not-yet-processed columns. With U the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU),
the rows of U hold exactly these successive inverses: [H_F⁻¹]_{j,j:} / [H_F⁻¹]_jj = U_{j,j:} / U_jj
(GPTQ's Cholesky reformulation), so one sweep reads

    err_j = (w_j − q_j) / U_jj,      W_{:, j:} ← W_{:, j:} − err_j U_{j, j:},
    loss_j = Σ_rows (w_j − q_j)² / (2 U_jj²).

Lazy batching: inside a block of B columns (default 128) the updates touch the block only (a
`lax.fori_loop` over its columns); afterwards all later columns get W_{:, later} −= Err_block
U_{block, later} in one matrix product. Blocks run in a `lax.scan`, so one compilation serves
any number of blocks. Flax kernels are (in, out): transpose before calling
`obs_sweep` (gptq.py does this).

References:
  Hassibi & Stork (1993), "Second order derivatives for network pruning: Optimal Brain Surgeon";
  Frantar & Alistarh (2022), "Optimal Brain Compression";
  Frantar et al. (2023), "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
  Transformers"; Frantar & Alistarh (2023), "SparseGPT".
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from feynkit.core.types import Array, ArrayLike, Float, PyTree
from feynkit.core.validation import fail_if

__all__ = [
    "damped_hessian",
    "dead_columns",
    "inverse_hessian_cholesky",
    "obs_sweep",
]

_HIGHEST = lax.Precision.HIGHEST


def _as_float(x: ArrayLike) -> Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_square(H: Array) -> None:
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square (d, d) matrix, got shape {H.shape}.")


def dead_columns(H: Float[ArrayLike, "d d"]) -> Array:
    """Boolean mask of inputs never active in calibration: diag(H) == 0 (GPTQ zeroes them)."""
    H = jnp.asarray(H)
    _check_square(H)
    return jnp.diagonal(H) == 0


def damped_hessian(H: Float[ArrayLike, "d d"], percdamp: float = 0.01) -> Float[Array, "d d"]:
    """H with dead inputs fixed and the diagonal damped, as GPTQ does before inverting.

    H_jj ← 1 where H_jj = 0 (dead column; its weights must be zeroed by the caller, see
    `dead_columns`), then H ← H + λ I with λ = percdamp · mean(diag H).

    Args:
      H: the (d, d) Hessian 2/n · Σ x xᵀ (symmetric PSD).
      percdamp: relative damping (GPTQ's default 0.01); must be ≥ 0.

    Returns:
      The damped Hessian in float32 (float64 if H is float64).

    References:
      Frantar et al. (2023), "GPTQ", Section 4 (Step 3) and reference code.
    """
    if not percdamp >= 0:
        raise ValueError(f"percdamp={percdamp!r} must be ≥ 0 (GPTQ uses 0.01).")
    H = _as_float(H)
    _check_square(H)
    diag = jnp.diagonal(H)
    diag = jnp.where(diag == 0, 1.0, diag)
    damp = percdamp * jnp.mean(diag)
    return H - jnp.diag(jnp.diagonal(H)) + jnp.diag(diag + damp)


def _hessian_ok(H: Array, U: Array) -> Array:
    """True when H is finite and symmetric and the damped H is positive definite (U finite
    with a positive diagonal): the conditions GPTQ's sweep silently relies on."""
    scale = jnp.max(jnp.abs(H))
    symmetric = jnp.all(jnp.abs(H - H.T) <= 1e-5 * scale + 1e-30)
    diag = jnp.diagonal(U)
    return jnp.all(jnp.isfinite(H)) & symmetric & jnp.all(jnp.isfinite(U)) & jnp.all(diag > 0)


HESSIAN_ERROR = (
    "H must be a finite, symmetric Hessian that is positive definite after damping (the "
    "Cholesky factorisation of H + λI failed or H is asymmetric); symmetrise H, increase "
    "percdamp (now {percdamp}) or use more calibration data."
)


def inverse_hessian_cholesky(
    H: Float[ArrayLike, "d d"], percdamp: float = 0.01, *, return_status: bool = False
) -> Float[Array, "d d"] | tuple[Float[Array, "d d"], Array]:
    """Upper Cholesky factor U of the inverse damped Hessian: (H + λI)⁻¹ = Uᵀ U.

    Args:
      H: (d, d) Hessian; percdamp: relative damping (see `damped_hessian`).
      return_status: also return a boolean scalar ``ok`` (H finite and symmetric, H + λI
        positive definite) instead of raising, for jitted callers (GPTQ, SpQR) whose eager
        wrapper raises on it.

    Returns:
      Upper-triangular U (exact zeros below the diagonal); ``(U, ok)`` with ``return_status``.

    Raises:
      ValueError: H is not finite and symmetric, or the damped H is not positive definite
        (raise percdamp). Checked eagerly on concrete H and, under ``jit``, when the compiled
        code runs (`feynkit.core.validation.fail_if`: a JaxRuntimeError carrying the message).

    References:
      Frantar et al. (2023), "GPTQ", Section 4 (Cholesky reformulation).
    """
    Hd = damped_hessian(H, percdamp)
    L = jnp.linalg.cholesky(Hd)
    eye = jnp.eye(Hd.shape[0], dtype=Hd.dtype)
    Hinv = jax.scipy.linalg.cho_solve((L, True), eye)
    U = jnp.triu(jnp.linalg.cholesky(0.5 * (Hinv + Hinv.T)).T)
    ok = _hessian_ok(_as_float(H), U)
    if return_status:
        return U, ok
    fail_if(~ok, HESSIAN_ERROR.format(percdamp=percdamp))
    return U


def obs_sweep(
    W: Float[ArrayLike, "rows cols"],
    hinv_u: Float[ArrayLike, "cols cols"],
    column_fn: Callable[..., object],
    block_size: int = 128,
    *,
    group_size: int | None = None,
    group_fn: Callable[[Array, Array, Array], PyTree] | None = None,
    has_aux: bool = False,
) -> tuple[Array, Array] | tuple[Array, Array, PyTree]:
    """GPTQ/OBS column sweep with lazy block updates: fix each column, spread its error right.

    For each block of ``block_size`` columns, a `lax.fori_loop` over its columns j does
    q_j = column_fn(w_j, j), err_j = (w_j − q_j) / U_jj, W_{:, j:block_end} −= err_j U_{j, j:},
    then W_{:, block_end:} −= Err_block U_{block, block_end:}.

    Args:
      W: (rows, cols) weights in the reference layout, one row per output channel (transpose a
        Flax (in, out) kernel first).
      hinv_u: (cols, cols) upper Cholesky factor of H⁻¹ (`inverse_hessian_cholesky`).
      column_fn: ``(w_col (rows,), j) -> q_col`` (quantize for GPTQ, mask for SparseGPT); with
        ``group_fn`` it is called as ``column_fn(w_col, j, aux)``; with ``has_aux`` it returns
        ``(q_col, extras)``, extras a pytree of per-column arrays stacked on a last axis.
      block_size: lazy-batch width B (a multiple of ``group_size`` when groups are used).
      group_size, group_fn: every ``group_size`` columns, ``aux = group_fn(W_group (rows, g),
        diag(U)_group (g,), j)`` is recomputed from the current (fully updated) columns of the
        group, e.g. GPTQ group scales or SparseGPT's N:M / per-block masks.
      has_aux: column_fn also returns per-column extras (e.g. integer codes).

    Returns:
      (Q, losses) or (Q, losses, extras): Q (rows, cols) the fixed columns, losses (cols,)
      Σ_rows (w_j − q_j)² / (2 U_jj²), extras stacked along a last axis of length cols.

    References:
      Frantar et al. (2023), "GPTQ", Algorithm 1; Frantar & Alistarh (2023), "SparseGPT".
    """
    W = _as_float(W)
    U = jnp.asarray(hinv_u, W.dtype)
    rows, cols = W.shape
    if U.shape != (cols, cols):
        raise ValueError(f"hinv_u has shape {U.shape}; expected ({cols}, {cols}) for W {W.shape}.")
    if not isinstance(block_size, int | np.integer) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive integer.")
    if group_fn is not None:
        if group_size is None or cols % group_size or block_size % group_size:
            raise ValueError(
                f"group_fn needs a group_size dividing both cols={cols} and "
                f"block_size={block_size}; got group_size={group_size}."
            )

    def call(w, j, aux):
        out = column_fn(w, j) if group_fn is None else column_fn(w, j, aux)
        return out if has_aux else (out, ())

    def group_aux(W1, d1, i, j):
        g = group_size
        return group_fn(lax.dynamic_slice_in_dim(W1, i, g, 1), lax.dynamic_slice(d1, (i,), (g,)), j)

    # Blocks run in a lax.scan (one compilation whatever the width). The last block is padded
    # with zero columns and an identity Hessian factor: their errors only reach other padding
    # columns, which are dropped at the end.
    B = min(block_size, cols)
    nb = -(-cols // B)
    pad = nb * B - cols
    Wp = jnp.pad(W, ((0, 0), (0, pad)))
    Up = jnp.pad(U, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(cols + pad) >= cols).astype(W.dtype)
    cols_idx = jnp.arange(B)
    all_idx = jnp.arange(cols + pad)
    aux0 = None
    if group_fn is not None:
        aux0 = jax.eval_shape(lambda w, d: group_aux(w, d, 0, 0), Wp[:, :B], jnp.diagonal(Up)[:B])
    zero_col = jnp.zeros((rows,), W.dtype)
    ex_shape = jax.eval_shape(lambda w, a: call(w, jnp.int32(0), a)[1], zero_col, aux0)

    def block(Wp, b):
        i1 = b * B
        W1 = lax.dynamic_slice_in_dim(Wp, i1, B, 1)
        U1 = lax.dynamic_slice(Up, (i1, i1), (B, B))
        d1 = jnp.diagonal(U1)

        def body(i, carry):
            W1, Q1, E1, L1, ex, aux = carry
            j = i1 + i
            if group_fn is not None:
                aux = lax.cond(i % group_size == 0, lambda: group_aux(W1, d1, i, j), lambda: aux)
            w = lax.dynamic_index_in_dim(W1, i, 1, keepdims=False)
            q, e = call(w, j, aux)
            q = q.astype(W1.dtype)
            d = d1[i]
            err = (w - q) / d
            row = jnp.where(cols_idx >= i, lax.dynamic_index_in_dim(U1, i, 0, keepdims=False), 0)
            W1 = W1 - err[:, None] * row[None, :]
            Q1 = lax.dynamic_update_index_in_dim(Q1, q, i, 1)
            E1 = lax.dynamic_update_index_in_dim(E1, err, i, 1)
            L1 = L1.at[i].set(jnp.sum((w - q) ** 2) / (2 * d**2))
            ex = jax.tree_util.tree_map(
                lambda a, v: lax.dynamic_update_index_in_dim(a, v, i, a.ndim - 1), ex, e
            )
            return W1, Q1, E1, L1, ex, aux

        zeros = jnp.zeros_like(W1)
        ex0 = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape + (B,), s.dtype), ex_shape)
        aux = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), aux0)
        init = (W1, zeros, zeros, jnp.zeros((B,), W.dtype), ex0, aux)
        _, Q1, E1, L1, ex, _ = lax.fori_loop(0, B, body, init)
        # lazy batch update of every later column: W_{:, i2:} −= Err_block U_{block, i2:}
        U_rows = lax.dynamic_slice_in_dim(Up, i1, B, 0)
        U_later = jnp.where(all_idx[None, :] >= i1 + B, U_rows, 0)
        Wp = Wp - jnp.matmul(E1, U_later, precision=_HIGHEST)
        return Wp, (Q1, L1, ex)

    _, (Qb, Lb, exb) = lax.scan(block, Wp, jnp.arange(nb))
    Q = jnp.moveaxis(Qb, 0, 1).reshape(rows, nb * B)[:, :cols]
    loss = Lb.reshape(nb * B)[:cols]
    if not has_aux:
        return Q, loss

    def unblock(a):  # (nb, ..., B) -> (..., cols)
        a = jnp.moveaxis(a, 0, -2)
        return a.reshape(a.shape[:-2] + (nb * B,))[..., :cols]

    return Q, loss, jax.tree_util.tree_map(unblock, exb)
