"""SpQR: GPTQ with tiny groups, bilevel (quantized) statistics and fp16 outlier weights.

Working in the reference layout W (out, in) (a Flax kernel (in, out) is transposed), the GPTQ/OBS
sweep (`feynkit.compression.hessian.obs_sweep`) fixes input columns j in order (optionally by
decreasing H_jj, "act order") and spreads their error over later columns with the upper Cholesky
factor U of H⁻¹. SpQR changes what "fix" means:

* First level: every group of β₁ (16) consecutive columns gets, per output row, an asymmetric
  min–max scale and zero, s = (max − min)/(2^b − 1), z = −min/s, codes c = clip(round(w/s + z)).
* Second level (bilevel): the β₁-group's s and z vectors (one value per output row) are
  themselves quantized to 3 bits, asymmetric min–max over blocks of β₂ (16) consecutive rows,
  with fp16 second-level scale and zero. The first level then uses the dequantized s, z.
* Outliers: a weight whose rounding would cost more than τ in the OBS saliency,
  ((w − q(w)) / U_jj)² > τ, is kept exactly (fp16) in a sparse side matrix. The threshold is
  relative, τ = ρ · mean_j(Var_rows W_{:,j} / U_jj²). Before fitting a group's statistics,
  weights whose removal would lower the group's saliency-weighted error by more than τ
  (leave-one-out refit of min/max) are replaced by the row mean of the others, so outliers do
  not stretch the grid.

Average bits per weight (Dettmers et al., reference code `get_average_number_of_bits`):

    b + (b_s + b_z)/β₁ + 2·(16 + 16)/(β₁β₂) + 32·r_outlier

(codes; 3-bit first-level statistics; fp16 second-level statistics for both s and z; 16-bit value
+ 16-bit index per outlier). `spqr_bits_per_weight` counts this from the stored arrays, so ragged
last groups are charged in full.

References:
  Dettmers, Svirschevski et al. (2024), "SpQR: A Sparse-Quantized Representation for
  Near-Lossless LLM Weight Compression", ICLR (reference code: Vahe1994/SpQR, spqr_engine.py,
  quant_groups.py); Frantar et al. (2023), "GPTQ".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from feynkit.compression.hessian import HESSIAN_ERROR, inverse_hessian_cholesky, obs_sweep
from feynkit.compression.protocol import CompressedTensor
from feynkit.compression.quant.rtn import check_float_weights
from feynkit.core.types import Array, ArrayLike, Float
from feynkit.core.validation import check_finite, fail_if

__all__ = ["SpQRArray", "spqr_bits_per_weight", "spqr_dequantize", "spqr_quantize"]


def _minmax_params(x, maxq, axis, valid=None):
    """Asymmetric min–max (s, z) along ``axis`` (z not rounded, as SpQR's quantizer)."""
    lo_src = x if valid is None else jnp.where(valid, x, jnp.inf)
    hi_src = x if valid is None else jnp.where(valid, x, -jnp.inf)
    lo, hi = jnp.min(lo_src, axis=axis), jnp.max(hi_src, axis=axis)
    same = lo == hi
    lo, hi = jnp.where(same, -1.0, lo), jnp.where(same, 1.0, hi)
    s = (hi - lo) / maxq
    return s, -lo / s


def _qdq(x, s, z, maxq):
    c = jnp.clip(jnp.round(x / jnp.maximum(s, 1e-9) + z), 0, maxq)
    return s * (c - z), c


def _bilevel(v, qq_bits, qq_group):
    """Quantize a per-row statistic v (rows,) in blocks of ``qq_group`` rows to ``qq_bits``."""
    rows = v.shape[0]
    pad = (-rows) % qq_group
    vp = jnp.pad(v, (0, pad), mode="edge").reshape(-1, qq_group)
    s2, z2 = _minmax_params(vp, 2**qq_bits - 1, axis=1)
    s2, z2 = s2.astype(jnp.float16).astype(v.dtype), z2.astype(jnp.float16).astype(v.dtype)
    deq, codes = _qdq(vp, s2[:, None], z2[:, None], 2**qq_bits - 1)
    return deq.reshape(-1)[:rows], codes.reshape(-1)[:rows], jnp.stack([s2, z2], -1)


@struct.dataclass
class SpQRArray(CompressedTensor):
    """A kernel stored the SpQR way (codes unpacked in memory; storage counts packed bits).

    Protocol storage (``nbits``) follows the reference count of the module docstring: b-bit
    codes, b_qq-bit statistics, fp16 second-level statistics, 32 bits per outlier (value +
    index); the act-order permutation is not counted (as in the reference).

    Attributes:
      codes: (d_in, d_out) uint8 first-level codes, in the processing (permuted) row order.
      stat_codes: (groups, 2, d_out) uint8 3-bit codes of the first-level scale and zero.
      stat_params: (groups, 2, ⌈d_out/β₂⌉, 2) float16 second-level (scale, zero) of each.
      outlier_rows, outlier_cols: int32 positions (original layout) of the fp16 outliers.
      outlier_values: float16.
      perm: (d_in,) int32 processing order of the input rows (identity without act order).
      bits, group_size, qq_bits, qq_group_size: static.
    """

    codes: Array
    stat_codes: Array
    stat_params: Array
    outlier_rows: Array
    outlier_cols: Array
    outlier_values: Array
    perm: Array
    bits: int = struct.field(pytree_node=False)
    group_size: int = struct.field(pytree_node=False)
    qq_bits: int = struct.field(pytree_node=False)
    qq_group_size: int = struct.field(pytree_node=False)
    dtype: np.dtype = struct.field(pytree_node=False, default=np.dtype(np.float32))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def nbits(self) -> int:
        n = self.shape[0] * self.shape[1]
        bits = self.bits * n + self.qq_bits * self.stat_codes.size + 16 * self.stat_params.size
        return int(bits + 32 * self.outlier_values.size)

    def dequantize(self) -> Float[Array, "d_in d_out"]:
        return spqr_dequantize(self)


def spqr_dequantize(q: SpQRArray) -> Float[Array, "d_in d_out"]:
    """Ŵ: bilevel stats → first-level (s, z) per (group, output) → s·(c − z), then outliers."""
    d_in, d_out = q.shape
    sp = q.stat_params.astype(jnp.float32)  # (groups, 2, blocks, 2)
    blk = jnp.arange(d_out) // q.qq_group_size
    s2, z2 = sp[:, :, blk, 0], sp[:, :, blk, 1]  # (groups, 2, d_out)
    stats = s2 * (q.stat_codes.astype(jnp.float32) - z2)
    s, z = stats[:, 0], stats[:, 1]  # (groups, d_out)
    g = jnp.arange(d_in) // q.group_size
    w = s[g] * (q.codes.astype(jnp.float32) - z[g])
    w = w[jnp.argsort(q.perm)]
    w = w.at[q.outlier_rows, q.outlier_cols].set(q.outlier_values.astype(jnp.float32))
    return w.astype(q.dtype)


def spqr_bits_per_weight(q: SpQRArray) -> float:
    """(b·n + b_qq·|stat codes| + 16·|second-level stats| + 32·#outliers) / n, n = d_in·d_out."""
    return q.bits_per_weight


@functools.partial(
    jax.jit,
    static_argnames=("bits", "gs", "qq_bits", "qq_gs", "percdamp", "block_size", "act_order"),
)
def _spqr(w, H, tau_rel, *, bits, gs, qq_bits, qq_gs, percdamp, block_size, act_order):
    d_in, d_out = w.shape
    maxq = 2**bits - 1
    W = w.T.astype(jnp.float32)  # (rows = out, cols = in)
    H = H.astype(jnp.float32)
    diag = jnp.diagonal(H)
    dead = diag == 0
    W = jnp.where(dead[None, :], 0.0, W)
    perm = jnp.argsort(-jnp.where(dead, 1.0, diag)) if act_order else jnp.arange(d_in)
    W, H = W[:, perm], H[perm][:, perm]
    U, ok = inverse_hessian_cholesky(H, percdamp, return_status=True)
    d = jnp.diagonal(U)
    tau = tau_rel * jnp.mean(jnp.var(W, axis=0, ddof=1) / d**2)
    # Pad the columns to whole groups: identity rows of U keep padded columns from touching
    # real ones, and `valid` keeps them out of the group statistics.
    pad = (-d_in) % gs
    Wp = jnp.pad(W, ((0, 0), (0, pad)))
    Up = jnp.pad(U, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(d_in + pad) >= d_in)

    def group_fn(wg, dg, j):
        valid = (j + jnp.arange(gs) < d_in)[None, :]
        base_s, base_z = _minmax_params(wg, maxq, 1, valid)
        e = (_qdq(wg, base_s[:, None], base_z[:, None], maxq)[0] - wg) / dg[None, :]
        base_err = jnp.sum(jnp.where(valid, e, 0.0) ** 2, axis=1, keepdims=True)
        # Leave-one-out: refit min/max without weight k, error of the others.
        keep = valid[:, None, :] & ~jnp.eye(gs, dtype=bool)[None]  # (1, gs_left_out, gs)
        wl = jnp.broadcast_to(wg[:, None, :], (wg.shape[0], gs, gs))
        s_l, z_l = _minmax_params(wl, maxq, 2, keep)
        e_l = (_qdq(wl, s_l[..., None], z_l[..., None], maxq)[0] - wl) / dg[None, None, :]
        loo_err = jnp.sum(jnp.where(keep, e_l, 0.0) ** 2, axis=2)
        likely = (base_err - loo_err > tau) & valid
        n_in = jnp.maximum(jnp.sum(valid & ~likely, axis=1, keepdims=True), 1)
        mean = jnp.sum(jnp.where(valid & ~likely, wg, 0.0), axis=1, keepdims=True) / n_in
        s, z = _minmax_params(jnp.where(likely, mean, wg), maxq, 1, valid)
        s, s_codes, s_par = _bilevel(s, qq_bits, qq_gs)
        z, z_codes, z_par = _bilevel(z, qq_bits, qq_gs)
        return s, z, jnp.stack([s_codes, z_codes]), jnp.stack([s_par, z_par])

    def column_fn(col, j, aux):
        s, z, stat_codes, stat_par = aux
        qv, c = _qdq(col, s, z, maxq)
        out = ((col - qv) / d_pad[j]) ** 2 > tau
        return jnp.where(out, col, qv), (c.astype(jnp.uint8), out, stat_codes, stat_par)

    d_pad = jnp.diagonal(Up)
    Q, _, (codes, outl, stat_codes, stat_par) = obs_sweep(
        Wp, Up, column_fn, block_size, group_size=gs, group_fn=group_fn, has_aux=True
    )
    sl = slice(None, d_in)
    ok = ok & jnp.all(jnp.isfinite(Q))
    return Q[:, sl], codes[:, sl], outl[:, sl], stat_codes[..., ::gs], stat_par[..., ::gs], perm, ok


def spqr_quantize(
    w: Float[ArrayLike, "d_in d_out"],
    H: Float[ArrayLike, "d_in d_in"],
    bits: int = 3,
    *,
    group_size: int = 16,
    qq_bits: int = 3,
    qq_group_size: int = 16,
    outlier_threshold: float = 0.2,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
) -> SpQRArray:
    """SpQR-quantize a Flax kernel given its input Hessian (see the module docstring).

    Args:
      w: kernel (d_in, d_out).
      H: (d_in, d_in) Hessian 2/n Σ x xᵀ (`linear_hessians`).
      bits: first-level bits b (2..8). group_size: β₁ input columns per statistic.
      qq_bits: bits of the quantized statistics. qq_group_size: β₂ rows per second-level block.
      outlier_threshold: ρ, relative to mean_j Var(W_{:,j}) / U_jj² (inf: no outliers).
      percdamp, block_size: as in GPTQ (block_size is rounded up to a multiple of β₁).
      act_order: process inputs by decreasing H_jj (SpQR's default permutation).

    Returns:
      An `SpQRArray`; `spqr_dequantize` gives the kernel, `spqr_bits_per_weight` its cost.

    Raises:
      ValueError: for a kernel that is not a non-empty floating-point 2-D array, bad shapes
        or parameters; for NaN/Inf in ``w`` or ``H`` and for an ``H`` that is asymmetric or not
        positive definite after damping (a status from the jitted sweep). SpQR builds its
        sparse outlier matrix on the host, so it runs eagerly only and every check raises here.

    References:
      Dettmers et al. (2024), "SpQR", Alg. 1.
    """
    w = jnp.asarray(w)
    H = jnp.asarray(H, jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"w must be a (d_in, d_out) kernel, got shape {w.shape}.")
    check_float_weights(w)
    d_in, d_out = w.shape
    if H.shape != (d_in, d_in):
        raise ValueError(f"H must be ({d_in}, {d_in}) for a kernel {w.shape}, got {H.shape}.")
    if not 2 <= bits <= 8 or not 2 <= qq_bits <= 8:
        raise ValueError(f"bits={bits} and qq_bits={qq_bits} must be in 2..8.")
    if group_size < 2 or qq_group_size < 1:
        raise ValueError(f"group_size={group_size} must be ≥ 2 and qq_group_size ≥ 1.")
    if not outlier_threshold > 0:
        raise ValueError(f"outlier_threshold={outlier_threshold} must be > 0 (inf disables).")
    if not percdamp >= 0:
        raise ValueError(f"percdamp={percdamp!r} must be ≥ 0 (GPTQ/SpQR use 0.01).")
    if not isinstance(block_size, int | np.integer) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive integer.")
    check_finite(w, "w", "SpQR needs finite weights")
    check_finite(H, "H", "pass the finite Hessian 2/n Σ x xᵀ of the layer inputs")
    block_size = -(-block_size // group_size) * group_size
    Q, codes, outl, stat_codes, stat_par, perm, ok = _spqr(
        w,
        H,
        jnp.float32(outlier_threshold),
        bits=int(bits),
        gs=int(group_size),
        qq_bits=int(qq_bits),
        qq_gs=int(qq_group_size),
        percdamp=float(percdamp),
        block_size=int(block_size),
        act_order=bool(act_order),
    )
    fail_if(~ok, HESSIAN_ERROR.format(percdamp=percdamp))
    # Sparse side matrix (host side: its size is data dependent). Positions in original order.
    outl = np.asarray(outl)
    perm_np = np.asarray(perm)
    out_idx, perm_idx = np.nonzero(outl)
    values = np.asarray(Q)[out_idx, perm_idx]
    return SpQRArray(
        codes=jnp.asarray(np.asarray(codes).T),
        stat_codes=jnp.asarray(np.transpose(np.asarray(stat_codes), (2, 0, 1)).astype(np.uint8)),
        stat_params=jnp.asarray(
            np.transpose(np.asarray(stat_par), (3, 0, 1, 2)).astype(np.float16)
        ),
        outlier_rows=jnp.asarray(perm_np[perm_idx].astype(np.int32)),
        outlier_cols=jnp.asarray(out_idx.astype(np.int32)),
        outlier_values=jnp.asarray(values.astype(np.float16)),
        perm=jnp.asarray(perm_np.astype(np.int32)),
        bits=int(bits),
        group_size=int(group_size),
        qq_bits=int(qq_bits),
        qq_group_size=int(qq_group_size),
        dtype=np.dtype(w.dtype),
    )
