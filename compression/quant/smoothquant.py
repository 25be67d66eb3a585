"""SmoothQuant: migrate activation outliers into the weights, then quantize both (W8A8, W4A4).

A linear layer y = X W (Flax layout, W of shape (d_in, d_out)) is rewritten exactly as

    y = (X diag(s)⁻¹) (diag(s) W),   s_j = max|X_j|^α / max|W_j|^(1−α),

with max|X_j| the calibration absolute maximum of input channel j and max|W_j| that of row j of
W (the weights that multiply channel j; shared inputs take the max over all their weights).
α = 0.5 splits the dynamic range evenly; the division by s is folded into the preceding
normalisation in a deployed model. Both factors are then fake-quantized with symmetric absmax
round-to-nearest: activations per token (or per token × group of channels), weights per output
channel (or per group of the reduction axis):

    ŷ = Q_a(X / s) · Q_w(diag(s) W).

References:
  Xiao et al. (2023), "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
  Language Models", ICML (reference code: mit-han-lab/smoothquant, smooth.py, fake_quant.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from flax import struct

from feynkit.compression.protocol import CompressedTensor, _check_matmul_input, array_bits
from feynkit.compression.quant.qarray import QuantizedArray, dequantize, fake_quantize, quantize
from feynkit.core.types import Array, ArrayLike, Float

__all__ = [
    "SmoothQuantLinear",
    "activation_absmax",
    "quantize_activations",
    "smooth_scales",
    "smoothquant_apply",
    "smoothquant_linear",
]

_FLOOR = 1e-5  # the reference clamps maxima and scales at 1e-5


def activation_absmax(x: Float[ArrayLike, "... d_in"]) -> Float[Array, " d_in"]:
    """max over tokens of |x_j| per input channel (the calibration statistic of SmoothQuant)."""
    x = jnp.asarray(x)
    return jnp.max(jnp.abs(x.reshape(-1, x.shape[-1])), axis=0).astype(jnp.float32)


def smooth_scales(
    act_absmax: Float[ArrayLike, " d_in"],
    w: Float[ArrayLike, "d_in d_out"] | Sequence[Float[ArrayLike, "d_in d_out"]],
    alpha: float = 0.5,
) -> Float[Array, " d_in"]:
    """Per-input-channel smoothing factors s_j = max|X_j|^α / max|W_j|^(1−α).

    Args:
      act_absmax: max|X_j| over calibration tokens, shape (d_in,).
      w: the kernel (d_in, d_out), or several kernels reading the same input (e.g. q/k/v); the
        weight statistic is then the max over all of them.
      alpha: migration strength in [0, 1] (0: no smoothing of activations, 1: all to weights).

    Returns:
      s, shape (d_in,), float32, clamped below at 1e-5.

    References:
      Xiao et al. (2023), SmoothQuant, Eq. (4).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    ws = [w] if not isinstance(w, list | tuple) else list(w)
    a = jnp.asarray(act_absmax, jnp.float32)
    w_max = None
    for wi in ws:
        wi = jnp.asarray(wi, jnp.float32)
        if wi.ndim != 2 or wi.shape[0] != a.shape[0]:
            raise ValueError(
                f"each kernel must be (d_in, d_out) with d_in = {a.shape[0]} (the length of "
                f"act_absmax), got {wi.shape}."
            )
        m = jnp.max(jnp.abs(wi), axis=1)
        w_max = m if w_max is None else jnp.maximum(w_max, m)
    w_max = jnp.maximum(w_max, _FLOOR)
    return jnp.maximum(a**alpha / w_max ** (1.0 - alpha), _FLOOR)


def quantize_activations(
    x: Float[ArrayLike, "... d_in"], bits: int, group_size: int | None = None
) -> Float[Array, "... d_in"]:
    """Symmetric absmax fake quantization per token (per token × group of ``group_size``
    channels): x̂ = s · clip(round(x / s)), s = max|x| / (2^(b−1) − 1) over the token (group)."""
    return fake_quantize(x, bits, group_size=group_size, axis=-1, symmetric=True)


@struct.dataclass
class SmoothQuantLinear(CompressedTensor):
    """A smoothed, quantized linear layer: y = Q_a(x ⊙ inv_smooth) · dequantize(weight).

    Protocol: ``matmul`` is `smoothquant_apply` (activations rounded, ``quantizes_activations``
    when ``a_bits`` is set); ``dequantize()`` is the effective float kernel diag(1/s)·Q_w(diag(s)
    W) (what the layer computes with float activations); storage = the quantized weight + the
    float32 smoothing vector (folded into the previous norm when deployed, counted here).

    Attributes:
      inv_smooth: 1 / s, shape (d_in,) (folded into the previous norm when deployed).
      weight: the quantized smoothed kernel diag(s) W.
      a_bits: activation bits (None: activations stay in float).
      a_group_size: activation group along the channels (None: per token).
    """

    inv_smooth: Array
    weight: QuantizedArray
    a_bits: int | None = struct.field(pytree_node=False, default=8)
    a_group_size: int | None = struct.field(pytree_node=False, default=None)

    @property
    def quantizes_activations(self) -> bool:  # type: ignore[override]
        return self.a_bits is not None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight.shape

    @property
    def dtype(self):
        return self.weight.dtype

    @property
    def nbits(self) -> int:
        return self.weight.nbits + array_bits(self.inv_smooth)

    def dequantize(self) -> Float[Array, "d_in d_out"]:
        w = dequantize(self.weight)
        return (self.inv_smooth[:, None] * w.astype(jnp.float32)).astype(w.dtype)

    def matmul(self, x: Float[ArrayLike, "... d_in"]) -> Float[Array, "... d_out"]:
        return smoothquant_apply(self, x)


def smoothquant_linear(
    w: Float[ArrayLike, "d_in d_out"],
    act_absmax: Float[ArrayLike, " d_in"] | None,
    *,
    w_bits: int = 8,
    a_bits: int | None = 8,
    alpha: float = 0.5,
    w_group_size: int | None = None,
    a_group_size: int | None = None,
) -> SmoothQuantLinear:
    """Smooth a kernel with `smooth_scales` and quantize it (symmetric RTN, per output channel).

    Args:
      w: kernel (d_in, d_out).
      act_absmax: per-channel max|X_j| from calibration; None disables smoothing (s = 1), which
        gives plain W{w_bits}A{a_bits} round-to-nearest.
      w_bits, a_bits: weight and activation bits (W8A8 by default; a_bits None = weight-only).
      alpha: migration strength.
      w_group_size, a_group_size: group lengths along d_in (None: per channel / per token).

    Returns:
      A `SmoothQuantLinear`; evaluate with `smoothquant_apply`.

    References:
      Xiao et al. (2023), SmoothQuant.
    """
    w = jnp.asarray(w)
    if act_absmax is None:
        s = jnp.ones((w.shape[0],), jnp.float32)
    else:
        s = smooth_scales(act_absmax, w, alpha)
    ws = (w.astype(jnp.float32) * s[:, None]).astype(w.dtype)
    wq = quantize(ws, w_bits, group_size=w_group_size, axis=0, symmetric=True)
    return SmoothQuantLinear(1.0 / s, wq, a_bits, a_group_size)


def smoothquant_apply(
    layer: SmoothQuantLinear, x: Float[ArrayLike, "... d_in"]
) -> Float[Array, "... d_out"]:
    """ŷ = Q_a(x / s) · Q_w(diag(s) W) (activation quantization per token, on the fly)."""
    x = jnp.asarray(x)
    _check_matmul_input(x, layer.inv_smooth.shape[0], "SmoothQuantLinear")
    xs = x * layer.inv_smooth.astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,))
    if layer.a_bits is not None:
        xs = quantize_activations(xs, layer.a_bits, layer.a_group_size)
    return xs @ dequantize(layer.weight).astype(x.dtype)
