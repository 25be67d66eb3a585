"""SparseGPT: one-shot pruning with OBS reconstruction through the shared column sweep.

For a linear layer with input Hessian H = 2/N Σ x xᵀ (reference layout W: (out, in)), SparseGPT
sweeps the input columns left to right with the GPTQ/OBS update of
`feynkit.compression.hessian.obs_sweep` (U the upper Cholesky factor of (H + λI)⁻¹):

    q_j = w_j · mask_j  [then rounded to the b-bit grid with joint quantization],
    W_{:, j:} ← W_{:, j:} − (w_j − q_j) / U_jj · U_{j, j:}.

The mask is chosen adaptively with the sweep's ``group_fn`` hook, from the current (already
compensated) weights and the OBS saliency w² / U_jj² (U_jj² = [H_F⁻¹]_jj):

* unstructured: at the start of every mask block of B_s columns (128 by default) the ⌊s·rows·B_s⌋
  lowest saliencies of the block (all rows together) are pruned;
* N:M: at the start of every group of M columns, the M − N lowest saliencies of each row.

Joint sparsity + quantization (``bits``): kept weights are rounded with per-output-channel
round-to-nearest scales computed from the (dead-column-zeroed) weights before the sweep, as the
reference code's quantizer, and the rounding error is compensated in the same sweep; pruned
weights get the code of 0, so they dequantize to exactly 0.

Dead inputs (H_jj = 0) are zeroed first (they get the lowest saliency and are pruned first).
When B_s does not divide d_in, the mask block is the largest divisor of d_in not above B_s.

Sharded over devices by layer: given the calibration Hessians, the layers' sweeps are
independent problems, so `sparsegpt_recipe` places layer i's kernel and Hessian on
``devices[i % len(devices)]`` (round-robin over ``jax.devices()`` by default) and runs its
sweep there; JAX dispatches asynchronously, so the sweeps of different devices run at the same
time, and each result is moved back to its input kernel's device. Every device runs the same
compiled program on the same inputs, so the result equals the single-device one exactly.

References:
  Frantar & Alistarh (2023), "SparseGPT: Massive Language Models Can Be Accurately Pruned in
  One-Shot" (ICML), Algorithm 1 and Section 3.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from feynkit.compression.hessian import inverse_hessian_cholesky, obs_sweep
from feynkit.compression.prune.masks import (
    _check_scores,
    _num_pruned,
    _ranks,
    check_nm,
    check_pattern,
    pattern_name,
)
from feynkit.compression.prune.recipe import PruneRecipe
from feynkit.compression.quant.qarray import _from_codes
from feynkit.compression.quant.quant_recipe import _check_bits, _where
from feynkit.compression.quant.rtn import compute_qparams, dequantize_codes, quantize_codes
from feynkit.compression.quant.tree import ALL_KERNELS
from feynkit.core.types import ArrayLike, Float

__all__ = ["mask_block", "sparsegpt_prune", "sparsegpt_recipe"]


def mask_block(d_in: int, block_size: int) -> int:
    """The unstructured mask block: ``block_size`` if it divides d_in, else the largest
    divisor of d_in below it."""
    return max(g for g in range(1, min(d_in, block_size) + 1) if d_in % g == 0)


@functools.partial(
    jax.jit,
    static_argnames=("sparsity", "n", "m", "bits", "symmetric", "percdamp", "block_size", "gs"),
)
def _sparsegpt(w, H, *, sparsity, n, m, bits, symmetric, percdamp, block_size, gs):
    dt = jnp.promote_types(w.dtype, jnp.float32)
    W = w.T.astype(dt)  # (out, in)
    H = H.astype(dt)
    dead = jnp.diagonal(H) == 0
    W = jnp.where(dead[None, :], 0.0, W)
    U = inverse_hessian_cholesky(H, percdamp)
    if bits is not None:
        scale, zero = compute_qparams(W, bits, axis=1, symmetric=symmetric)
        s_col, z_col = scale[:, 0], None if zero is None else zero[:, 0]

    def group_fn(Wg, dg, j):  # keep mask (rows, gs) from the current weights
        sal = Wg**2 / dg[None, :] ** 2
        if n is not None:  # the M − N lowest of each row's group of M
            return _ranks(sal, 1) >= m - n
        return _ranks(sal, None) >= _num_pruned(sparsity, sal.size)

    def column_fn(col, j, keep):
        k = keep[:, j % gs]
        if bits is None:
            return jnp.where(k, col, 0.0), (k, jnp.zeros(col.shape, jnp.int32))
        c = quantize_codes(col, s_col, z_col, bits)
        c = jnp.where(k, c, quantize_codes(jnp.zeros_like(col), s_col, z_col, bits))
        return dequantize_codes(c, s_col, z_col), (k, c)

    Q, losses, (keep, codes) = obs_sweep(
        W, U, column_fn, block_size, group_size=gs, group_fn=group_fn, has_aux=True
    )
    if bits is None:
        return Q.T.astype(w.dtype), keep.T, losses, None
    q = _from_codes(
        codes.T,
        scale.T,
        None if zero is None else zero.T,
        shape=w.shape,
        dtype=w.dtype,
        bits=bits,
        group_size=w.shape[0],
        axis=0,
        per_tensor=False,
    )
    return Q.T.astype(w.dtype), keep.T, losses, q


def sparsegpt_prune(
    w: Float[ArrayLike, "d_in d_out"],
    H: Float[ArrayLike, "d_in d_in"],
    sparsity: float = 0.5,
    *,
    n: int | None = None,
    m: int | None = None,
    bits: int | None = None,
    symmetric: bool = True,
    percdamp: float = 0.01,
    block_size: int = 128,
    return_losses: bool = False,
):
    """Prune (and optionally quantize) a Flax (d_in, d_out) kernel with SparseGPT.

    Args:
      w: the kernel; H: its (d_in, d_in) input Hessian (`calibrate`).
      sparsity: unstructured fraction pruned, in [0, 1) (ignored for N:M).
      n, m: N:M pattern along the input axis (M must divide d_in).
      bits: also quantize the kept weights to this many bits in the same sweep (None: float).
      symmetric: signed codes without zero point (with ``bits``).
      percdamp: relative damping λ = percdamp · mean diag H.
      block_size: the lazy-batch width and the unstructured mask block B_s (128).
      return_losses: also return the per-input-column OBS losses.

    Returns:
      ``(w_pruned, keep_mask)``: the reconstructed float kernel with exact zeros where the mask
      is False, and the mask; with ``bits`` the first entry is a `QuantizedArray` whose pruned
      entries dequantize to 0. With ``return_losses`` a third entry, the losses (d_in,).

    References:
      Frantar & Alistarh (2023), "SparseGPT", Algorithm 1.
    """
    w = jnp.asarray(w)
    H = jnp.asarray(H)
    if w.ndim != 2:
        raise ValueError(f"sparsegpt_prune needs a 2-D (d_in, d_out) kernel, got {w.shape}.")
    d_in = w.shape[0]
    if H.shape != (d_in, d_in):
        raise ValueError(
            f"H has shape {H.shape}; expected ({d_in}, {d_in}) for the kernel {w.shape}."
        )
    check_pattern(sparsity, n, m)
    if n is not None:
        check_nm(n, m, d_in)
    if bits is not None:
        _check_bits("bits", bits)
    if not percdamp >= 0:
        raise ValueError(f"percdamp={percdamp!r} must be ≥ 0 (SparseGPT uses 0.01).")
    if not isinstance(block_size, int | np.integer) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive integer.")
    _check_scores(w, "weights")
    if not isinstance(H, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(H))):
        raise ValueError("H contains NaN or Inf; check the calibration data.")
    if n is not None:
        gs = m
        block_size = -(-block_size // m) * m
    else:
        gs = mask_block(d_in, block_size)
        block_size = gs
    out, keep, losses, q = _sparsegpt(
        w,
        H,
        sparsity=None if n is not None else float(sparsity),
        n=n,
        m=m,
        bits=bits,
        symmetric=bool(symmetric),
        percdamp=float(percdamp),
        block_size=int(block_size),
        gs=int(gs),
    )
    first = out if bits is None else q
    return (first, keep, losses) if return_losses else (first, keep)


def sparsegpt_recipe(
    sparsity: float = 0.5,
    *,
    n: int | None = None,
    m: int | None = None,
    bits: int | None = None,
    symmetric: bool = True,
    percdamp: float = 0.01,
    block_size: int = 128,
    where: str | Sequence[str] | None = ALL_KERNELS,
    devices: Sequence[jax.Device] | None = None,
) -> PruneRecipe:
    """SparseGPT on the selected kernels (needs calibration Hessians); see `sparsegpt_prune`.

    With ``bits`` the pruned leaves are `QuantizedArray` containers (joint sparsity +
    quantization, the paper's 50 % + 4-bit). The layers are distributed round-robin over
    `devices` (default: ``jax.devices()``; the selected kernel i on ``devices[i % len]``), each
    result brought back to its input's device (see the module docstring).
    """
    check_pattern(sparsity, n, m)
    if bits is not None:
        _check_bits("bits", bits)
    if devices is not None and not list(devices):
        raise ValueError("devices is empty: pass None (all of jax.devices()) or some devices.")

    def prune(w, stats, i, ctx):
        devs = jax.devices() if devices is None else list(devices)
        home = w.sharding if isinstance(w, jax.Array) else None
        w_i, h_i = jax.device_put((w, stats.hessian), devs[i % len(devs)])
        out = sparsegpt_prune(
            w_i,
            h_i,
            sparsity,
            n=n,
            m=m,
            bits=bits,
            symmetric=symmetric,
            percdamp=percdamp,
            block_size=block_size,
        )
        return out if home is None else jax.device_put(out, home)

    name = f"sparsegpt{pattern_name(sparsity, n, m)}" + (f"_w{bits}" if bits else "")
    return PruneRecipe(name, prune, _where(where), True, ("hessian",))
