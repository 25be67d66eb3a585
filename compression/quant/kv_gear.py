"""GEAR: KV-cache compression by quantization + a low-rank residual + sparse outliers.

Each (token × channel) matrix D of one head (keys or values of one layer) is stored as

    D̂ = Quant_b(D − S) + L + S,

  S   the sparse outliers: the ⌊s·n·d / 2⌋ largest and ⌊s·n·d / 2⌋ smallest entries of D, kept
      (values in fp16, flat indices in int32) and zeroed before quantization, so they no longer
      stretch the quantization ranges;
  Quant_b  uniform b-bit round-to-nearest (`feynkit.compression.quant.qarray`), asymmetric by
      default, grouped along ``axis``: axis 0 (groups run over tokens, one scale per channel
      and group — "per-channel", used for keys, whose outliers sit in fixed channels) or axis 1
      (groups run over channels, one scale per token — "per-token", used for values), as in
      KIVI and GEAR;
  L = A B  the best rank-r approximation (truncated SVD, Eckart–Young) of the quantization
      residual R = D − S − Quant_b(D − S), factors stored in fp16.

GEAR computes L with a few power iterations; the matrices here are small, so the exact SVD is
used (the best rank-r L, which power iteration approximates). With r = 0 and s = 0 GEAR is plain
uniform quantization (the baseline). `compressed_bytes` counts what the storage holds: b-bit
codes, fp16 scales and zero points, fp16 low-rank factors and fp16 outlier values with int32
indices.

References:
  Kang et al. (2024), "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless
  Generative Inference of LLM", arXiv:2403.05527;
  Liu et al. (2024), "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from feynkit.compression.protocol import CompressedTensor
from feynkit.compression.quant.qarray import QuantizedArray, dequantize, quantize
from feynkit.core.types import Array, ArrayLike, Float

__all__ = [
    "GearTensor",
    "compressed_bytes",
    "fp16_bytes",
    "gear_bytes",
    "gear_compress",
    "gear_decompress",
    "num_outliers",
]

SCALE_BYTES = 2  # scales and zero points are counted as fp16
FACTOR_BYTES = 2  # low-rank factors, fp16
OUTLIER_BYTES = 2 + 4  # fp16 value + int32 flat index


@struct.dataclass
class GearTensor(CompressedTensor):
    """One GEAR-compressed (n, d) matrix, or a batch of them (leading axes on every leaf).

    Protocol: ``shape`` is the full (..., n, d); ``dequantize()`` is `gear_decompress`;
    ``matmul(x)`` = jnp.matmul(x, D̂) over the leading axes, computed term by term as
    x Q̂ + (x A) B + x S; storage is `compressed_bytes` (GEAR's convention: b-bit codes, fp16
    scales and zero points, fp16 factors, fp16 + int32 per outlier).

    Attributes:
      quantized: the b-bit `QuantizedArray` of D − S.
      a, b: low-rank factors, shapes (..., n, r) and (..., r, d), L = a @ b.
      outlier_values: (..., 2k) the outliers' values S_ij.
      outlier_indices: (..., 2k) int32 flat indices i·d + j of the outliers.
      matrix_shape: (n, d) of one matrix; dtype: the input dtype (decompress returns it).
    """

    quantized: QuantizedArray
    a: Array
    b: Array
    outlier_values: Array
    outlier_indices: Array
    matrix_shape: tuple[int, int] = struct.field(pytree_node=False)
    dtype: np.dtype = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.a.shape[:-2]) + tuple(self.matrix_shape)

    @property
    def nbits(self) -> int:
        return 8 * compressed_bytes(self)

    def dequantize(self) -> Float[Array, "*batch n d"]:
        return gear_decompress(self)

    def matmul(self, x: Float[ArrayLike, "*batch m n"]) -> Float[Array, "*batch m d"]:
        """jnp.matmul(x, D̂) = x Q̂ + (x A) B + x S over the leading axes (x's broadcast)."""
        x = jnp.asarray(x)
        n, d = self.matrix_shape
        if x.ndim < 1 or x.shape[-1] != n:
            raise ValueError(
                f"GearTensor.matmul: x has shape {x.shape}; its last axis must be n = {n}."
            )
        dt = jnp.promote_types(x.dtype, self.dtype)
        return _gear_matmul(self, x.astype(dt)).astype(dt)


def num_outliers(n: int, d: int, outlier_fraction: float) -> int:
    """k = ⌊s·n·d / 2⌋ outliers kept on each side (largest and smallest), 2k in all."""
    if not 0.0 <= outlier_fraction <= 1.0:
        raise ValueError(f"outlier_fraction must be in [0, 1], got {outlier_fraction}.")
    return int(np.floor(outlier_fraction * n * d / 2 + 1e-9))


def _check(x, bits, rank, group_size, axis):
    if x.ndim < 2:
        raise ValueError(f"GEAR compresses (..., tokens, channels) matrices, got shape {x.shape}.")
    n, d = x.shape[-2:]
    if axis not in (0, 1, -1, -2):
        raise ValueError(f"axis must be 0 (per-channel, over tokens) or 1 (per-token), got {axis}.")
    if not 0 <= rank <= min(n, d):
        raise ValueError(f"rank must be in [0, {min(n, d)}] for ({n}, {d}) matrices, got {rank}.")
    length = (n, d)[axis % 2]
    if group_size is not None and (group_size < 1 or length % group_size):
        raise ValueError(
            f"group_size={group_size} must divide the quantization axis length {length} "
            f"(axis {axis % 2} of ({n}, {d})); use None for one group over the whole axis."
        )
    del bits  # checked by `quantize`
    return n, d, axis % 2


def _compress_2d(x, *, bits, rank, k_out, group_size, axis, symmetric, factor_dtype):
    n, d = x.shape
    x32 = x.astype(jnp.float32)
    flat = x32.reshape(-1)
    if k_out > 0:
        top_v, top_i = jax.lax.top_k(flat, k_out)
        bot_v, bot_i = jax.lax.top_k(-flat, k_out)
        idx = jnp.concatenate([top_i, bot_i]).astype(jnp.int32)
        vals = jnp.concatenate([top_v, -bot_v]).astype(factor_dtype)
        sparse = jnp.zeros_like(flat).at[idx].set(vals.astype(jnp.float32)).reshape(n, d)
    else:
        idx = jnp.zeros((0,), jnp.int32)
        vals = jnp.zeros((0,), factor_dtype)
        sparse = jnp.zeros_like(x32)
    dense = x32 - sparse
    q = quantize(dense, bits, group_size=group_size, axis=axis, symmetric=symmetric)
    if rank > 0:
        residual = dense - dequantize(q)
        u, s, vt = jnp.linalg.svd(residual, full_matrices=False)
        a = (u[:, :rank] * s[None, :rank]).astype(factor_dtype)
        b = vt[:rank].astype(factor_dtype)
    else:
        a = jnp.zeros((n, 0), factor_dtype)
        b = jnp.zeros((0, d), factor_dtype)
    return q, a, b, vals, idx


def gear_compress(
    x: Float[ArrayLike, "*batch n d"],
    *,
    bits: int,
    rank: int = 0,
    outlier_fraction: float = 0.0,
    group_size: int | None = None,
    axis: int = 0,
    symmetric: bool = False,
    factor_dtype=jnp.float16,
) -> GearTensor:
    """Compress each (n, d) matrix D of ``x`` into D̂ = Quant_b(D − S) + L + S.

    S: the ⌊s·n·d/2⌋ largest and smallest entries of D; Quant_b: round-to-nearest b-bit groups
    along ``axis``; L: the truncated SVD of R = D − S − Quant_b(D − S) to rank r.

    Args:
      x: keys or values, shape (..., n tokens, d channels); leading axes (layers, batch, heads)
        are compressed independently.
      bits: b, 2..8.
      rank: r ≥ 0 (0: no low-rank part).
      outlier_fraction: s in [0, 1] (0: no outliers).
      group_size: group length along ``axis`` (dividing its length); None: the whole axis.
      axis: 0 per-channel (groups over tokens, keys), 1 per-token (groups over channels, values).
      symmetric: symmetric codes (no zero point); GEAR/KIVI use asymmetric (False).
      factor_dtype: dtype the low-rank factors and outlier values are stored in (fp16).

    Returns:
      A `GearTensor` (a pytree; leaves carry the leading axes of ``x``).

    References:
      Kang et al. (2024), "GEAR", arXiv:2403.05527.
    """
    x = jnp.asarray(x)
    n, d, axis = _check(x, bits, rank, group_size, axis)
    k_out = num_outliers(n, d, outlier_fraction)
    return _gear_compress_jit(
        x,
        bits=bits,
        rank=rank,
        k_out=k_out,
        group_size=group_size,
        axis=axis,
        symmetric=symmetric,
        factor_dtype=np.dtype(factor_dtype),
    )


@functools.partial(
    jax.jit,
    static_argnames=("bits", "rank", "k_out", "group_size", "axis", "symmetric", "factor_dtype"),
)
def _gear_compress_jit(x, **kw):
    # One compiled program per configuration (eager nested vmaps dispatch op by op).
    fn = functools.partial(_compress_2d, **kw)
    for _ in range(x.ndim - 2):
        fn = jax.vmap(fn)
    q, a, b, vals, idx = fn(x)
    return GearTensor(q, a, b, vals, idx, matrix_shape=x.shape[-2:], dtype=np.dtype(x.dtype))


def _decompress_2d(q, a, b, vals, idx):
    n, d = q.shape
    dense = dequantize(q).astype(jnp.float32)
    if a.shape[-1] > 0:
        dense = dense + a.astype(jnp.float32) @ b.astype(jnp.float32)
    if idx.shape[0] > 0:
        dense = (dense.reshape(-1).at[idx].add(vals.astype(jnp.float32))).reshape(n, d)
    return dense


def gear_decompress(g: GearTensor) -> Float[Array, "*batch n d"]:
    """D̂ = dequantize(Quant_b(D − S)) + A B + S, in the compressed array's dtype.

    Args:
      g: a `GearTensor` from `gear_compress`.

    Returns:
      The reconstruction, shape (..., n, d).

    References:
      Kang et al. (2024), "GEAR", arXiv:2403.05527.
    """
    return _gear_decompress_jit(g)


@jax.jit
def _gear_decompress_jit(g):
    fn = _decompress_2d
    for _ in range(g.a.ndim - 2):
        fn = jax.vmap(fn)
    return fn(g.quantized, g.a, g.b, g.outlier_values, g.outlier_indices).astype(g.dtype)


@jax.jit
def _gear_matmul(g, x):
    def one(q, a, b, vals, idx, xm):
        n, d = q.shape
        out = xm @ dequantize(q).astype(xm.dtype)
        if a.shape[-1] > 0:
            out = out + (xm @ a.astype(xm.dtype)) @ b.astype(xm.dtype)
        if idx.shape[0] > 0:  # x S: column j of S holds the outliers with idx % d == j
            rows, cols = idx // d, idx % d
            contrib = xm[..., rows] * vals.astype(xm.dtype)[None, :]
            out = out + jnp.zeros(out.shape, out.dtype).at[..., cols].add(contrib)
        return out

    lead_shape = g.a.shape[:-2]
    vec = x.ndim == 1
    xm = x[None] if vec else x
    if not len(xm.shape) - 2 <= len(lead_shape):
        raise ValueError(
            f"GearTensor.matmul: x {x.shape} has more leading axes than the tensor {g.shape}."
        )
    xm = jnp.broadcast_to(xm, lead_shape + xm.shape[-2:])
    fn = one
    for _ in lead_shape:
        fn = jax.vmap(fn)
    out = fn(g.quantized, g.a, g.b, g.outlier_values, g.outlier_indices, xm)
    return out[..., 0, :] if vec else out


def gear_bytes(
    shape: tuple[int, ...],
    *,
    bits: int,
    rank: int = 0,
    outlier_fraction: float = 0.0,
    group_size: int | None = None,
    axis: int = 0,
    symmetric: bool = False,
) -> int:
    """Storage of GEAR-compressing an array of ``shape`` (..., n, d), in bytes.

    bytes = m·(⌈n·d·b / 8⌉ + G·2·(1 + [asymmetric]) + 2·r·(n + d) + 6·2k), m the number of
    matrices, G = n·d / group length the number of quantization groups, k from `num_outliers`
    (fp16 scales, zeros, factors and outlier values, int32 outlier indices).

    Args:
      shape: (..., n, d); the remaining arguments as in `gear_compress`.

    Returns:
      The byte count (an int).
    """
    *lead, n, d = shape
    m = int(np.prod(lead, dtype=np.int64)) if lead else 1
    length = (n, d)[axis % 2]
    groups = n * d // (length if group_size is None else group_size)
    per = -(-n * d * bits // 8)
    per += groups * SCALE_BYTES * (1 if symmetric else 2)
    per += FACTOR_BYTES * rank * (n + d)
    per += OUTLIER_BYTES * 2 * num_outliers(n, d, outlier_fraction)
    return m * per


def compressed_bytes(g: GearTensor) -> int:
    """Bytes a `GearTensor` occupies (as `gear_bytes`), read off its leaves' shapes.

    Codes count b bits each, scales/zeros 2 bytes (fp16) each, factors 2 bytes per entry,
    outliers 2 + 4 bytes each.

    Args:
      g: a `GearTensor`.

    Returns:
      The byte count (an int).
    """
    q = g.quantized
    n, d = g.matrix_shape
    m = int(np.prod(g.a.shape[:-2], dtype=np.int64))
    total = m * (-(-n * d * q.bits // 8))
    total += int(np.prod(q.scale.shape, dtype=np.int64)) * SCALE_BYTES
    if q.zero is not None:
        total += int(np.prod(q.zero.shape, dtype=np.int64)) * SCALE_BYTES
    total += (int(np.prod(g.a.shape)) + int(np.prod(g.b.shape))) * FACTOR_BYTES
    total += int(np.prod(g.outlier_indices.shape)) * OUTLIER_BYTES
    return total


def fp16_bytes(shape: tuple[int, ...]) -> int:
    """Bytes of ``shape`` stored in fp16 (the uncompressed reference)."""
    return 2 * int(np.prod(shape, dtype=np.int64))
