"""GPTQ: second-order rounding of weights, column by column, with OBS error compensation.

For a Dense layer with inputs X and Hessian H = 2/n · Σ x xᵀ (`linear_hessians`), GPTQ minimises
‖X W − X Ŵ‖² one input column at a time: it rounds column j to the quantization grid and moves
the rounding error onto the not-yet-quantized columns with the inverse-Hessian row (see
`feynkit.compression.hessian.obs_sweep`, shared with SparseGPT). Details follow the reference
implementation: dead inputs (H_jj = 0) are zeroed, damping λ = percdamp · mean diag H, lazy
blocks of 128 columns, per-channel scales computed once from the original weights.

Layout: Flax kernels are (in, out) with reduction axis 0; the sweep runs on the transpose
(out, in), the reference layout, and the result is transposed back, so the returned
`QuantizedArray` has the usual (groups, out) scales.

Groups: with ``group_size`` the scale of a group is computed when the sweep reaches the group's
first column, from the group's columns as updated by every column processed so far. (The
reference code reads the group from a copy that misses the updates made earlier inside the
same 128-block, which only differs when groups start mid-block and makes the result depend on
the block size; here blocking never changes the result.) With ``act_order`` and groups the
groups stay contiguous in the original column order and their scales are computed before the
sweep (the reference's ``static_groups``), so the result is an ordinary grouped array without
a column permutation index.

References:
  Frantar, Ashkboos, Hoefler & Alistarh (2023), "GPTQ: Accurate Post-Training Quantization for
  Generative Pre-trained Transformers" (ICLR).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from feynkit.compression.hessian import HESSIAN_ERROR, inverse_hessian_cholesky, obs_sweep
from feynkit.compression.quant.qarray import QuantizedArray, _from_codes
from feynkit.compression.quant.rtn import (
    _check,
    compute_qparams,
    dequantize_codes,
    quantize_codes,
)
from feynkit.core.types import Array, ArrayLike, Float
from feynkit.core.validation import check_finite, fail_if

__all__ = ["gptq_quantize"]


@functools.partial(
    jax.jit,
    static_argnames=("bits", "gs", "symmetric", "percdamp", "block_size", "act_order", "axis"),
)
def _gptq(w, H, *, bits, gs, symmetric, percdamp, block_size, act_order, axis):
    dt = jnp.promote_types(w.dtype, jnp.float32)
    W0 = (w.T if axis == 0 else w).astype(dt)
    H = H.astype(dt)
    rows, cols = W0.shape
    grouped = gs < cols
    diag = jnp.diagonal(H)
    dead = diag == 0
    if not grouped:  # per-channel scales from the original weights (reference order)
        scale, zero = compute_qparams(W0, bits, axis=1, symmetric=symmetric)
    W = jnp.where(dead[None, :], 0.0, W0)
    perm = None
    if grouped and act_order:
        scale, zero = compute_qparams(W, bits, group_size=gs, axis=1, symmetric=symmetric)
    if act_order:
        perm = jnp.argsort(-jnp.where(dead, 1.0, diag))
        W, H = W[:, perm], H[perm][:, perm]
    U, ok = inverse_hessian_cholesky(H, percdamp, return_status=True)

    def fix(w, s, z):
        c = quantize_codes(w, s, z, bits)
        return dequantize_codes(c, s, z), (c, s, z)

    def col_param(p, j):
        if p is None:
            return None
        g = 0 if not grouped else perm[j] // gs
        return jnp.take(p, g, axis=1)

    kw = {}
    if grouped and not act_order:

        def group_fn(wg, _dg, _j):
            s, z = compute_qparams(wg, bits, axis=1, symmetric=symmetric)
            return s[:, 0], None if z is None else z[:, 0]

        def column_fn(w, _j, aux):
            return fix(w, *aux)

        kw = dict(group_size=gs, group_fn=group_fn)
    else:

        def column_fn(w, j):
            return fix(w, col_param(scale, j), col_param(zero, j))

    _, losses, (codes, s_cols, z_cols) = obs_sweep(W, U, column_fn, block_size, has_aux=True, **kw)
    if grouped and not act_order:
        scale = s_cols[:, ::gs]
        zero = None if z_cols is None else z_cols[:, ::gs]
    if act_order:
        inv = jnp.argsort(perm)
        codes, losses = codes[:, inv], losses[inv]
    if axis == 0:
        codes, scale = codes.T, scale.T
        zero = None if zero is None else zero.T
    q = _from_codes(
        codes,
        scale,
        zero,
        shape=w.shape,
        dtype=w.dtype,
        bits=bits,
        group_size=gs,
        axis=axis,
        per_tensor=False,
    )
    return q, losses, ok


def gptq_quantize(
    w: Float[ArrayLike, "..."],
    H: Float[ArrayLike, "d_in d_in"],
    bits: int,
    *,
    group_size: int | None = None,
    symmetric: bool = True,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    axis: int = 0,
    return_losses: bool = False,
) -> QuantizedArray | tuple[QuantizedArray, Float[Array, " d_in"]]:
    """Quantize a 2-D kernel with GPTQ given its input Hessian.

    Minimises ‖X W − X Ŵ‖² column by column: q_j = round(w_j), then
    W_{:, j:} −= (w_j − q_j) / U_jj · U_{j, j:} with (H + λI)⁻¹ = Uᵀ U, λ = percdamp · mean diag H.

    Args:
      w: kernel, (in, out) for ``axis=0`` (Flax Dense) or (out, in) for ``axis=1``.
      H: (in, in) Hessian 2/n · Σ x xᵀ of the layer inputs (`linear_hessians`).
      bits: 2..8. group_size: group length along the input axis (None: per output channel).
      symmetric: signed codes without zero point. percdamp: relative damping (≥ 0).
      block_size: lazy-batch width (rounded up to a multiple of group_size); does not change
        the result. act_order: process columns by decreasing H_jj (static groups, see module).
      axis: the reduction (input) axis. return_losses: also return the per-input-column
        losses Σ_out (w − q)² / (2 U_jj²).

    Returns:
      The `QuantizedArray` (same layout as `quantize`), and the losses if asked.

    Raises:
      ValueError: at once (also while tracing under ``jit``) for a kernel that is not 2-D or
        not floating point, an empty kernel, bad ``bits``/``group_size``/``axis``/``H`` shape,
        ``percdamp`` < 0, ``block_size`` < 1. Data checks — NaN/Inf in ``w`` or ``H``, and an
        ``H`` that is asymmetric or not positive definite after damping (the jitted sweep
        returns a status) — raise eagerly on concrete input; under an outer ``jit`` they stop
        the compiled run with a JaxRuntimeError carrying the same message
        (`feynkit.core.validation.fail_if`).

    References:
      Frantar et al. (2023), "GPTQ", Algorithm 1.
    """
    w = jnp.asarray(w)
    H = jnp.asarray(H)
    if w.ndim != 2:
        raise ValueError(f"gptq_quantize needs a 2-D kernel, got shape {w.shape}.")
    axis, gs = _check(w, bits, axis, group_size, False)
    n_in = w.shape[axis]
    if H.shape != (n_in, n_in):
        raise ValueError(
            f"H has shape {H.shape}; expected ({n_in}, {n_in}) for the input axis {axis} of "
            f"the kernel {w.shape}."
        )
    check_finite(H, "H", "pass the finite Hessian 2/n Σ x xᵀ of the layer inputs")
    if not percdamp >= 0:
        raise ValueError(f"percdamp={percdamp!r} must be ≥ 0 (GPTQ uses 0.01).")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive integer.")
    if gs < n_in:
        block_size = -(-block_size // gs) * gs
    q, losses, ok = _gptq(
        w,
        H,
        bits=int(bits),
        gs=gs,
        symmetric=bool(symmetric),
        percdamp=float(percdamp),
        block_size=block_size,
        act_order=bool(act_order),
        axis=axis,
    )
    fail_if(~ok, HESSIAN_ERROR.format(percdamp=percdamp))
    return (q, losses) if return_losses else q
