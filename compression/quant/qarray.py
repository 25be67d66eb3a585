"""Round-to-nearest integer quantization and the packed `QuantizedArray` pytree.

A weight w is split along its reduction axis (``axis``, 0 for Flax ``Dense`` kernels of shape
(in, out)) into groups of ``group_size`` entries; each (group, output channel) pair has a scale s
and, when asymmetric, an integer zero point z:

    symmetric:   c = clip(round(w / s), −2^(b−1), 2^(b−1) − 1),      s = max|w| / (2^(b−1) − 1)
    asymmetric:  c = clip(round(w / s) + z, 0, 2^b − 1),              s = (hi − lo) / (2^b − 1),
                 z = round(−lo / s),  lo = min(min w, 0),  hi = max(max w, 0)
    dequantize:  ŵ = s · (c − z)    (z = 0 when symmetric)

so |w − ŵ| ≤ s / 2 inside the range (including 0 in [lo, hi] keeps z an integer in [0, 2^b − 1],
as in GPTQ's quantizer). A group that is all zero gets s = 1 (never 0, so never NaN). Codes are
stored as uint8 (signed codes offset by 2^(b−1)); for b ≤ 4 two codes share a byte along the
reduction axis (low nibble = even index). Scales and zeros have the weight's rank with the
reduction axis replaced by the number of groups: (groups, out) for a Flax kernel, the layout
weight-only GPU kernels read. ``group_size=None`` is per output channel (one group spanning the
axis); ``per_tensor=True`` is one scale for the whole array (scale shape (1, …, 1)).

References:
  Jacob et al. (2018), "Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference"; Frantar et al. (2023), "GPTQ" (quantizer conventions).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from feynkit.compression.protocol import CompressedTensor, array_bits
from feynkit.compression.quant.rtn import (
    _STATIC,
    MAX_BITS,
    MIN_BITS,
    _check,
    _expand,
    _grouped,
    _qparams,
    compute_qparams,
    dequantize_codes,
    qrange,
    quantize_codes,
)
from feynkit.core.types import Array, ArrayLike, Float, Int
from feynkit.core.validation import fail_if

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "QuantizedArray",
    "codes_of",
    "compute_qparams",
    "dequantize",
    "dequantize_codes",
    "fake_quantize",
    "pack_int4",
    "qrange",
    "quantize",
    "quantize_codes",
    "quantize_with_params",
    "unpack_int4",
]


@struct.dataclass
class QuantizedArray(CompressedTensor):
    """Integer codes with per-(group, channel) scales and optional zero points.

    Implements the compressed-tensor protocol (`feynkit.compression.protocol`): storage counts
    the codes at ``bits`` bits each (b ≤ 4 is held two per byte, so 3-bit codes occupy a nibble
    in memory), scales and zero points at their stored dtype (float32).

    Attributes:
      codes: uint8; along ``axis`` packed two per byte when ``bits ≤ 4`` (length ⌈n/2⌉).
      scale: float32, the weight's rank with ``shape[axis]`` replaced by the number of groups.
      zero: zero points (integer-valued float32) like ``scale``, or None when symmetric.
      shape, dtype: of the original array (``dequantize`` returns this dtype).
      bits, group_size (actual length of a group), axis (reduction axis, non-negative),
      symmetric, per_tensor: static metadata.
    """

    codes: Array
    scale: Array
    zero: Array | None
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    dtype: np.dtype = struct.field(pytree_node=False)
    bits: int = struct.field(pytree_node=False)
    group_size: int = struct.field(pytree_node=False)
    axis: int = struct.field(pytree_node=False, default=0)
    symmetric: bool = struct.field(pytree_node=False, default=True)
    per_tensor: bool = struct.field(pytree_node=False, default=False)

    @property
    def packed(self) -> bool:
        return self.bits <= 4

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbits(self) -> int:
        """Codes at ``bits`` bits each + scales + zero points (leading batch axes included)."""
        lead = int(np.prod(self.codes.shape[: self.codes.ndim - len(self.shape)], dtype=np.int64))
        codes = lead * int(np.prod(self.shape, dtype=np.int64)) * self.bits
        return codes + array_bits(self.scale, self.zero)

    def dequantize(self) -> Array:
        """ŵ = s · (c − z), shape ``shape``, dtype ``dtype`` (see `dequantize`)."""
        return _dequantize(self)

    def matmul(self, x: ArrayLike, implementation: str | None = None) -> Array:
        """x @ ŵ (protocol ``matmul``); implementation: "pallas" (the weight-only kernel of
        `feynkit.compression.kernels.quantized_matmul`, interpret mode off a GPU), "reference"
        (x @ dequantize(), XLA) or None: the kernel on a GPU when it serves this layout, the
        reference elsewhere (so CPU numerics are those of x @ dequantize())."""
        from feynkit.compression.kernels._common import resolve_implementation
        from feynkit.compression.kernels.quantized_matmul import (
            quantized_matmul,
            supports_quantized_array,
        )

        if resolve_implementation(implementation) == "pallas":
            reason = supports_quantized_array(self)
            if reason is None:
                return quantized_matmul(x, self, implementation="pallas")
            if implementation == "pallas":
                raise ValueError(f"QuantizedArray.matmul(implementation='pallas'): {reason}.")
        return super().matmul(x)


@functools.partial(jax.jit, static_argnames=("axis",))
def pack_int4(codes: Int[ArrayLike, "..."], axis: int = 0) -> Int[Array, "..."]:
    """Two 4-bit codes (values 0..15) per uint8 along ``axis``: byte = c[2i] | c[2i+1] << 4.

    An odd length is padded with one zero code; the packed axis has length ⌈n / 2⌉.
    """
    c = jnp.asarray(codes).astype(jnp.uint8)
    axis = axis % c.ndim
    if c.shape[axis] % 2:
        pad = [(0, 0)] * c.ndim
        pad[axis] = (0, 1)
        c = jnp.pad(c, pad)
    c = c.reshape(c.shape[:axis] + (c.shape[axis] // 2, 2) + c.shape[axis + 1 :])
    lo = jnp.take(c, 0, axis=axis + 1)
    hi = jnp.take(c, 1, axis=axis + 1)
    return (lo & 0xF) | ((hi & 0xF) << 4)


@functools.partial(jax.jit, static_argnames=("length", "axis"))
def unpack_int4(packed: Int[ArrayLike, "..."], length: int, axis: int = 0) -> Int[Array, "..."]:
    """Inverse of `pack_int4`: uint8 codes of length ``length`` along ``axis``."""
    p = jnp.asarray(packed).astype(jnp.uint8)
    axis = axis % p.ndim
    both = jnp.stack([p & 0xF, p >> 4], axis=axis + 1)
    both = both.reshape(p.shape[:axis] + (2 * p.shape[axis],) + p.shape[axis + 1 :])
    return jax.lax.slice_in_dim(both, 0, length, axis=axis)


def _from_codes(
    codes: Array,
    scale: Array,
    zero: Array | None,
    *,
    shape: tuple[int, ...],
    dtype,
    bits: int,
    group_size: int,
    axis: int,
    per_tensor: bool,
) -> QuantizedArray:
    """Pack signed/unsigned int codes of full ``shape`` into a `QuantizedArray`."""
    symmetric = zero is None
    offset = 2 ** (bits - 1) if symmetric else 0
    stored = (codes + offset).astype(jnp.uint8)
    if bits <= 4:
        stored = pack_int4(stored, axis)
    return QuantizedArray(
        codes=stored,
        scale=scale,
        zero=zero,
        shape=tuple(shape),
        dtype=np.dtype(dtype),
        bits=int(bits),
        group_size=int(group_size),
        axis=int(axis),
        symmetric=symmetric,
        per_tensor=bool(per_tensor),
    )


def quantize(
    w: Float[ArrayLike, "..."],
    bits: int = 4,
    *,
    group_size: int | None = None,
    axis: int = 0,
    symmetric: bool = True,
    per_tensor: bool = False,
) -> QuantizedArray:
    """Round-to-nearest quantization of ``w`` into a packed `QuantizedArray`.

    c = clip(round(w / s) + z, qmin, qmax) with s, z from `compute_qparams`; |w − ŵ| ≤ s / 2.

    Args:
      w: weights (any float dtype, finite). bits: 2..8. group_size: length of a group along
        ``axis`` dividing shape[axis]; None = one group per output channel.
      axis: the reduction axis (0 for Flax kernels (in, out)). symmetric: signed codes, no zero
        point. per_tensor: one scale for the whole array (group_size is then ignored).

    Returns:
      A `QuantizedArray`; `dequantize` gives back an array of ``w``'s shape and dtype.

    Raises:
      ValueError: at once (also while tracing under ``jit``) for bad ``bits``/``axis``/
        ``group_size``, integer or empty weights; for NaN/Inf weights eagerly on concrete
        ``w`` and, under ``jit``, when the compiled code runs (a JaxRuntimeError carrying the
        message, `feynkit.core.validation.fail_if`). `quantize_with_params` also checks that
        ``scale`` is finite and > 0 and ``zero`` finite, in the same two ways.

    References:
      Jacob et al. (2018); Dettmers et al. (2022), "LLM.int8()" (per-channel/group scales).
    """
    w = jnp.asarray(w)
    axis, gs = _check(w, bits, axis, group_size, per_tensor)
    return _quantize(w, bits=bits, axis=axis, gs=gs, symmetric=symmetric, per_tensor=per_tensor)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _quantize(w, *, bits, axis, gs, symmetric, per_tensor):
    scale, zero = _qparams(
        w, bits=bits, axis=axis, gs=gs, symmetric=symmetric, per_tensor=per_tensor
    )
    return _with_params(w, scale, zero, bits=bits, axis=axis, gs=gs, per_tensor=per_tensor)


@functools.partial(jax.jit, static_argnames=("bits", "axis", "gs", "per_tensor"))
def _with_params(w, scale, zero, *, bits, axis, gs, per_tensor):
    x = _grouped(w.astype(scale.dtype), axis, gs)
    codes = quantize_codes(x, _expand(scale, axis), _expand(zero, axis), bits).reshape(w.shape)
    return _from_codes(
        codes,
        scale,
        zero,
        shape=w.shape,
        dtype=w.dtype,
        bits=bits,
        group_size=gs,
        axis=axis,
        per_tensor=per_tensor,
    )


def quantize_with_params(
    w: Float[ArrayLike, "..."],
    scale: Float[ArrayLike, "..."],
    zero: Float[ArrayLike, "..."] | None,
    bits: int,
    *,
    axis: int = 0,
) -> QuantizedArray:
    """Quantize ``w`` with externally computed scales/zeros (symmetric iff ``zero`` is None).

    The group layout is read off ``scale``: shape[axis] // scale.shape[axis] is the group length;
    a scale of shape (1, …, 1) on a non-vector array means per-tensor.

    Args:
      w: weights; scale, zero: the weight's rank, ``shape[axis]`` replaced by the number of
        groups; bits: 2..8; axis: the reduction axis.

    Returns:
      The `QuantizedArray` with c = clip(round(w / s) + z, qmin, qmax).
    """
    w = jnp.asarray(w)
    scale = jnp.asarray(scale)
    zero = None if zero is None else jnp.asarray(zero, scale.dtype)
    if w.ndim == 0 or not -w.ndim <= axis < w.ndim:
        raise ValueError(f"axis={axis} out of range for an array of shape {w.shape}.")
    axis = axis % w.ndim
    per_tensor = all(s == 1 for s in scale.shape) and any(
        w.shape[d] > 1 for d in range(w.ndim) if d != axis
    )
    ok_rank = scale.ndim == w.ndim and (zero is None or zero.shape == scale.shape)
    ok = ok_rank and scale.shape[axis] >= 1 and w.shape[axis] % scale.shape[axis] == 0
    ok = ok and all(scale.shape[d] == w.shape[d] or per_tensor for d in range(w.ndim) if d != axis)
    if not ok:
        raise ValueError(
            f"scale shape {scale.shape} (zero {None if zero is None else zero.shape}) does not fit "
            f"weights {w.shape} with reduction axis {axis}: expected the weight shape with "
            f"shape[axis] replaced by a divisor (the number of groups), or all ones."
        )
    gs = w.shape[axis] // scale.shape[axis]
    _check(w, bits, axis, None if per_tensor else gs, per_tensor)
    if not jnp.issubdtype(scale.dtype, jnp.floating):
        raise ValueError(f"scale has dtype {scale.dtype}; pass floating-point scales.")
    # data checks: eager on concrete arrays, at run time under jit (fail_if)
    fail_if(
        ~jnp.all(jnp.isfinite(scale) & (scale > 0)),
        "scale must be finite and > 0 everywhere (a zero, negative, NaN or Inf scale gives "
        "NaN or wrong codes); compute it with compute_qparams.",
    )
    if zero is not None:
        fail_if(~jnp.all(jnp.isfinite(zero)), "zero contains NaN or Inf; pass finite zero points.")
    return _with_params(w, scale, zero, bits=bits, axis=axis, gs=gs, per_tensor=per_tensor)


def codes_of(q: QuantizedArray) -> Int[Array, "..."]:
    """The unpacked int32 codes of ``q`` (signed when symmetric), shape ``q.shape``."""
    c = unpack_int4(q.codes, q.shape[q.axis], q.axis) if q.packed else q.codes
    c = c.astype(jnp.int32)
    return c - 2 ** (q.bits - 1) if q.symmetric else c


def dequantize(q: CompressedTensor) -> Float[Array, "..."]:
    """The float array a compressed container stands for (``q.dequantize()``).

    For a `QuantizedArray`, ŵ = s · (c − z) per group, reshaped to ``q.shape`` in ``q.dtype``;
    any other container of the compressed-tensor protocol (SpQR, VQ, DFloat11, ...) is accepted.
    """
    if not isinstance(q, CompressedTensor):
        raise ValueError(
            f"dequantize expects a compressed container (QuantizedArray, SpQRArray, ...), got "
            f"{type(q).__name__}; float arrays need no dequantization."
        )
    return q.dequantize()


@jax.jit
def _dequantize(q: QuantizedArray) -> Float[Array, "..."]:
    c = _grouped(codes_of(q), q.axis, q.group_size)
    w = dequantize_codes(c, _expand(q.scale, q.axis), _expand(q.zero, q.axis))
    return w.reshape(q.shape).astype(q.dtype)


def fake_quantize(
    w: Float[ArrayLike, "..."],
    bits: int,
    *,
    group_size: int | None = None,
    axis: int = 0,
    symmetric: bool = True,
    per_tensor: bool = False,
    straight_through: bool = True,
) -> Float[Array, "..."]:
    """dequantize(quantize(w)) without packing: jit-friendly, same shape and dtype as ``w``.

    With ``straight_through`` the gradient is the identity, ∂ŵ/∂w := I (Bengio et al., 2013),
    otherwise the (almost everywhere zero) derivative of rounding.
    """
    w = jnp.asarray(w)
    axis, gs = _check(w, bits, axis, group_size, per_tensor)
    return _fake(
        w,
        bits=bits,
        axis=axis,
        gs=gs,
        symmetric=symmetric,
        per_tensor=per_tensor,
        straight_through=straight_through,
    )


@functools.partial(jax.jit, static_argnames=_STATIC + ("straight_through",))
def _fake(w, *, bits, axis, gs, symmetric, per_tensor, straight_through):
    scale, zero = _qparams(
        w, bits=bits, axis=axis, gs=gs, symmetric=symmetric, per_tensor=per_tensor
    )
    x = _grouped(w.astype(scale.dtype), axis, gs)
    s, z = _expand(scale, axis), _expand(zero, axis)
    wq = dequantize_codes(quantize_codes(x, s, z, bits), s, z).reshape(w.shape).astype(w.dtype)
    return w + jax.lax.stop_gradient(wq - w) if straight_through else wq
