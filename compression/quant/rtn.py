"""Round-to-nearest scales, zero points and integer codes (the math under `QuantizedArray`).

    symmetric:   c = clip(round(w / s), −2^(b−1), 2^(b−1) − 1),      s = max|w| / (2^(b−1) − 1)
    asymmetric:  c = clip(round(w / s) + z, 0, 2^b − 1),              s = (hi − lo) / (2^b − 1),
                 z = round(−lo / s),  lo = min(min w, 0),  hi = max(max w, 0)
    dequantize:  ŵ = s · (c − z)    (z = 0 when symmetric)

Scales are per (group of the reduction axis, output channel); s = 1 for an all-zero group.

References:
  Jacob et al. (2018), "Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference"; Frantar et al. (2023), "GPTQ" (quantizer conventions).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from feynkit.core.types import Array, ArrayLike, Float, Int
from feynkit.core.validation import fail_if

__all__ = ["check_float_weights", "compute_qparams", "dequantize_codes", "qrange", "quantize_codes"]

MIN_BITS, MAX_BITS = 2, 8


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range: [−2^(b−1), 2^(b−1) − 1] if symmetric, else [0, 2^b − 1]."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


@jax.jit
def _all_finite(x: Array) -> Array:
    return jnp.all(jnp.isfinite(x))


_STATIC = ("bits", "axis", "gs", "symmetric", "per_tensor")


def check_float_weights(w: Array, name: str = "w") -> None:
    """Weights must be a non-empty floating-point array (integers would be truncated)."""
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(
            f"weights {name} have dtype {w.dtype}; quantization needs floating-point weights "
            f"(cast with {name}.astype(jnp.float32): integer inputs would be truncated)."
        )
    if w.size == 0:
        raise ValueError(f"weights {name} are empty (shape {w.shape}); pass a non-empty array.")


def _check(w: Array, bits: int, axis: int, group_size: int | None, per_tensor: bool):
    """Validate and return (non-negative axis, group length).

    Static checks (raised at once, also while tracing under ``jit``): ``bits``, a floating
    dtype for ``w`` (integer weights would be truncated), ``axis``, a non-empty array and
    reduction axis, ``group_size``. Data check: NaN/Inf in ``w`` raises eagerly on concrete
    weights and, under ``jit``, when the compiled code runs (`fail_if`).
    """
    if not isinstance(bits, int | np.integer) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits!r}: allowed are integers {MIN_BITS}..{MAX_BITS}.")
    if w.ndim == 0:
        raise ValueError("quantization needs an array with at least one axis, got a scalar.")
    check_float_weights(w)
    if not -w.ndim <= axis < w.ndim:
        raise ValueError(
            f"axis={axis} out of range for an array of rank {w.ndim} (shape {w.shape})."
        )
    axis = axis % w.ndim
    n = w.shape[axis]
    if per_tensor or group_size is None:
        gs = n
    elif not isinstance(group_size, int | np.integer) or group_size < 1 or n % group_size:
        raise ValueError(
            f"group_size={group_size!r} must be a positive divisor of the reduction-axis length "
            f"{n} (axis {axis} of shape {w.shape}); use None for one group per output channel."
        )
    else:
        gs = int(group_size)
    fail_if(~_all_finite(w), "weights contain NaN or Inf; quantization needs finite values of w.")
    return axis, gs


def _grouped(x: Array, axis: int, gs: int) -> Array:
    """Split ``axis`` (length n) into (n // gs, gs)."""
    return x.reshape(x.shape[:axis] + (x.shape[axis] // gs, gs) + x.shape[axis + 1 :])


def _compute_dtype(dtype) -> np.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def compute_qparams(
    w: Float[ArrayLike, "..."],
    bits: int,
    *,
    group_size: int | None = None,
    axis: int = 0,
    symmetric: bool = True,
    per_tensor: bool = False,
) -> tuple[Float[Array, "..."], Float[Array, "..."] | None]:
    """Round-to-nearest scales (and zero points) for each group of ``w`` along ``axis``.

    s = max|w| / (2^(b−1) − 1) (symmetric) or (hi − lo) / (2^b − 1) with z = round(−lo / s),
    lo = min(min w, 0), hi = max(max w, 0) (asymmetric); s = 1 for an all-zero group.

    Args:
      w: weights; bits: 2..8; group_size: group length along ``axis`` (None: whole axis);
      axis: the reduction axis; symmetric: signed codes without zero point;
      per_tensor: a single scale for the whole array.

    Returns:
      (scale, zero) of the weight's rank with ``shape[axis]`` replaced by the number of groups
      (all ones when per_tensor); zero is None when symmetric.

    References:
      Jacob et al. (2018), "Quantization and Training of Neural Networks ...".
    """
    w = jnp.asarray(w)
    axis, gs = _check(w, bits, axis, group_size, per_tensor)
    return _qparams(w, bits=bits, axis=axis, gs=gs, symmetric=symmetric, per_tensor=per_tensor)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _qparams(w, *, bits, axis, gs, symmetric, per_tensor):
    x = w.astype(_compute_dtype(w.dtype))
    red = tuple(range(x.ndim)) if per_tensor else (axis + 1,)
    if not per_tensor:
        x = _grouped(x, axis, gs)
    _, qmax = qrange(bits, symmetric)
    if symmetric:
        raw = jnp.max(jnp.abs(x), axis=red) / qmax
    else:
        lo = jnp.minimum(jnp.min(x, axis=red), 0.0)
        hi = jnp.maximum(jnp.max(x, axis=red), 0.0)
        raw = (hi - lo) / qmax
    tiny = jnp.finfo(raw.dtype).tiny
    scale = jnp.where(raw == 0, 1.0, jnp.maximum(raw, tiny)).astype(raw.dtype)
    if per_tensor:
        scale = scale.reshape((1,) * w.ndim)
    zero = None if symmetric else jnp.clip(jnp.round(-lo / scale), 0, qmax).reshape(scale.shape)
    return scale, zero


def quantize_codes(
    w: Float[ArrayLike, "..."],
    scale: Float[ArrayLike, "..."],
    zero: Float[ArrayLike, "..."] | None,
    bits: int,
) -> Int[Array, "..."]:
    """Elementwise codes c = clip(round(w / s) + z, qmin, qmax) (int32; signed when zero is None).

    ``w``, ``scale`` and ``zero`` must have equal rank (they broadcast); this is the per-column
    rounding GPTQ applies inside its sweep.
    """
    w = jnp.asarray(w)
    scale = jnp.asarray(scale)
    qmin, qmax = qrange(bits, zero is None)
    c = jnp.round(w / scale)
    if zero is not None:
        c = c + jnp.asarray(zero)
    return jnp.clip(c, qmin, qmax).astype(jnp.int32)


def dequantize_codes(
    codes: Int[ArrayLike, "..."],
    scale: Float[ArrayLike, "..."],
    zero: Float[ArrayLike, "..."] | None,
) -> Float[Array, "..."]:
    """ŵ = s · (c − z) (z = 0 when ``zero`` is None), in the dtype of ``scale``."""
    scale = jnp.asarray(scale)
    c = jnp.asarray(codes).astype(scale.dtype)
    return scale * (c if zero is None else c - jnp.asarray(zero))


def _expand(p: Array | None, axis: int) -> Array | None:
    return None if p is None else jnp.expand_dims(p, axis + 1)
