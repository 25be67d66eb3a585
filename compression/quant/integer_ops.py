"""I-ViT integer-only nonlinearities: Shiftmax, ShiftGELU, I-LayerNorm and an integer sqrt.

Inputs are int32 codes q with a float scale s (x = s·q); outputs are int32 codes with a new
scale. Scales enter only through scalar constants (x₀ = ⌊−1/s⌋, shift counts), so every
operation on the data is an int32 add, multiply, shift, comparison or integer division.

Shift exponential (for x ≤ 0 in codes): x·log₂e ≈ x + (x >> 1) − (x >> 4) (log₂e ≈ 1.4375,
0.36% low); with x₀ = ⌊−1/s⌋ < 0 the codes of −1, write x·log₂e = x₀·p + r,
p = ⌊x/x₀⌋ ≥ 0, r ∈ (x₀, 0], so e^{s x} ≈ 2^{−p} · 2^{r/|x₀|} and 2^f ≈ 1 + f/2 on f ∈ (−1, 0]
(relative error ≤ 6.15%, at f ≈ −0.56):

    exp_int = (((r >> 1) − x₀) << n) >> p      (≈ |x₀| 2^n e^{s x})

Before it, the codes are shifted (left for coarse scales, right for fine ones, e.g. the int32
output of a matmul) so that |x₀| has ``exp_bits`` bits: the floors then cost ≈ 2^{−exp_bits}
relative error and int32 cannot overflow. n = 31 − bits(|x₀|) − max(b + 4, bits(row length)),
so sums stay below 2^31 and the normalizing factor ⌊(2^31 − 1)/Σ exp_int⌋ keeps b + 4 bits
(b the output bits); terms below 2^{−n}|x₀|^{−1} of the largest underflow to 0.

    Shiftmax:    y = x − max x;  p_int = (exp_int · ⌊(2^31 − 1) / Σ exp_int⌋) >> (32 − b),
                 scale 2^{−(b−1)}  (codes in [0, 2^{b−1} − 1])
    ShiftGELU:   GELU(x) ≈ x σ(αx), α = 1.702 (α = 1 gives SiLU). With e = exp_int(−|q|) at
                 scale sα and 1 = exp_int(0): σ = 1/(1 + e) for q ≥ 0, e/(1 + e) for q < 0, as
                 b-bit codes like Shiftmax; out = q · σ_int, scale s · 2^{−(b−1)}
    I-LayerNorm: μ = round(Σq / D), y = q − μ, σ_int = ⌊√(Σ y² + ⌊D ε / s²⌉)⌋ (exact integer
                 square root), z = (y ⌊2^30/σ_int⌋) >> (30 − k) (scale √D / 2^k),
                 out = z · γ_int + β_int with γ quantized to ``gamma_bits`` (per tensor) and β
                 to the output scale √D / 2^k · s_γ.

Error (the bounds `shiftmax_error_bound`, `shift_gelu_error_bound`, `i_layernorm_error_bound`
compute): the shift exponential is w · e^{k s x} with slope k = 1.4375 / (log₂e · s|x₀|)
(≈ 0.9964) and a weight w whose max/min ratio over a row is at most
a = 1.0615 · 2^{3.5/|x₀|} · (|x₀| + 1)/|x₀| (the chord 1 + f/2 ≥ 2^f, the floors in the
pre-shift, x >> 1, x >> 4 and r >> 1). A ratio of such weighted terms differs from the exact one
by at most (√a − 1)/(√a + 1); the floored b-bit output adds < 2^{−(b−1)}; underflow adds
< (terms)/(|x₀| 2^n).

Differences from the I-ViT reference code: the pre-shift to ``exp_bits`` and the choice of n
(the reference uses a fixed n = 15 or 23, clips terms below 2^{−n} up to 2^{−n} instead of
letting them underflow, and for fine input scales its sums pass 2^31 or its normalizing factor
keeps only a few bits); ShiftGELU evaluates the sigmoid from e^{−|x|} per element (the
reference subtracts the row maximum, clipping far-negative inputs); r/2 is floored (r >> 1);
the square root is exact (digit-by-digit, 16 steps) instead of 10 Newton steps from 2^16; γ, β
are integer-quantized so the I-LayerNorm output scale is a scalar.

References:
  Li & Gu (2023), "I-ViT: Integer-only Quantization for Efficient Vision Transformer Inference";
  Kim et al. (2021), "I-BERT: Integer-only BERT Quantization" (integer LayerNorm, softmax).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from feynkit.core.types import Array, ArrayLike, Float, Int

__all__ = [
    "exp_shift",
    "i_layernorm",
    "i_layernorm_error_bound",
    "integer_sqrt",
    "shift_exp_distortion",
    "shift_gelu",
    "shift_gelu_error_bound",
    "shiftmax",
    "shiftmax_error_bound",
]

_INT_MAX = 2**31 - 1


def _as_codes(q: ArrayLike) -> Array:
    q = jnp.asarray(q)
    if not jnp.issubdtype(q.dtype, jnp.integer):
        raise ValueError(f"expected integer codes, got dtype {q.dtype}; pass round(x / scale).")
    return q.astype(jnp.int32)


def _check_bits(out_bits: int) -> None:
    if not 2 <= out_bits <= 10:
        # the exponent (≥ 8 bits of range), |x₀| and the b + 4 bits of the normalizing factor
        # share 31 bits; more output bits would need int64
        raise ValueError(f"out_bits must be in [2, 10] (int32 budget), got {out_bits}.")


def _bit_length(v: Array) -> Array:
    """Number of bits of a positive int32 scalar (32 − count of leading zeros)."""
    return 32 - lax.clz(v)


def integer_sqrt(n: Int[ArrayLike, "*shape"]) -> Int[Array, "*shape"]:
    """Exact ⌊√n⌋ for int32 n ≥ 0 (negative n give 0), by the bit-shift digit method.

    Sixteen steps, one result bit each: with the candidate bit b = 4^k,
    if rem ≥ root + b: rem −= root + b, root = root/2 + b, else root = root/2; b ← b/4.

    Args:
      n: integer array.

    Returns:
      int32 array of the same shape.

    References: I-ViT (Li & Gu, 2023) uses an integer square-root iteration in I-LayerNorm.
    """
    n = jnp.maximum(_as_codes(n), 0)

    def step(_, carry):
        rem, root, bit = carry
        trial = root + bit
        take = rem >= trial
        rem = jnp.where(take, rem - trial, rem)
        root = jnp.where(take, (root >> 1) + bit, root >> 1)
        return rem, root, bit >> 2

    init = (n, jnp.zeros_like(n), jnp.full_like(n, 1 << 30))
    return lax.fori_loop(0, 16, step, init)[1]


def _exp_constants(scale: ArrayLike, terms: int, out_bits: int, exp_bits: int):
    """Pre-shift u, x₀ = ⌊−2^u/s⌋ with bits(|x₀|) ≈ exp_bits, and n (int32 scalars).

    A ratio e_i / Σ e_j is computed as e_i ⌊(2^31 − 1)/Σ e_j⌋ / 2^31, whose flooring error is
    below e_i / 2^31 ≤ |x₀| 2^n / 2^31; keeping |x₀| 2^n < 2^(31 − max(b + 4, bits(terms)))
    bounds it by 2^−(b+4) and keeps Σ e_j < 2^31.
    """
    inv = 1.0 / jnp.asarray(scale, jnp.float32)
    u = exp_bits - _bit_length(jnp.maximum(jnp.floor(inv), 1.0).astype(jnp.int32))
    x0 = -jnp.maximum(jnp.floor(inv * jnp.exp2(u.astype(jnp.float32))), 1.0).astype(jnp.int32)
    n = 31 - _bit_length(-x0) - max(out_bits + 4, int(terms).bit_length())
    return u, x0, jnp.maximum(n, 0)


def _prescale(x: Array, u: Array) -> Array:
    """Codes x ≤ 0 at scale s to codes at scale s 2^−u (clipped at −2^29 first; e^x is 0 there)."""
    left, right = jnp.maximum(u, 0), jnp.maximum(-u, 0)
    x = jnp.maximum(x, -((1 << 29) >> left))
    return (x << left) >> right


def exp_shift(x: Int[ArrayLike, "*shape"], x0: ArrayLike, n: ArrayLike) -> Int[Array, "*shape"]:
    """Shift-only e^{s x} for codes x ≤ 0: (((r >> 1) − x₀) << n) >> p ≈ |x₀| 2^n e^{s x}.

    t = x + (x >> 1) − (x >> 4) ≈ x log₂e is split as x₀ p + r (p = ⌊t/x₀⌋, r ∈ (x₀, 0]), and
    2^{r/|x₀|} ≈ 1 + r/(2|x₀|).

    Args:
      x: int32 codes in [−2^29, 0] (at scale s).
      x0: int32 scalar ⌊−1/s⌋ (|x₀| 2^n < 2^31).
      n: int32 scalar, fractional bits of the result.

    Returns:
      int32 codes at scale 1/(|x₀| 2^n) (≈ s/2^n); e^0 ↦ |x₀| 2^n; tiny values underflow to 0.

    References: Li & Gu (2023), I-ViT, Shiftmax eq. (shift-based exponential).
    """
    x = _as_codes(x)
    t = x + (x >> 1) - (x >> 4)
    p = t // x0
    r = t - x0 * p
    return (((r >> 1) - x0) << n) >> jnp.minimum(p, 31)


def shiftmax(
    q: Int[ArrayLike, "..."],
    scale: Float[ArrayLike, ""],
    *,
    out_bits: int = 8,
    axis: int = -1,
    exp_bits: int = 10,
) -> tuple[Int[Array, "..."], Float[Array, ""]]:
    """Integer-only softmax (Shiftmax): codes of softmax(s·q) along ``axis``.

    p_int = (e_i · ⌊(2^31 − 1) / Σ_j e_j⌋) >> (32 − b), e = exp_shift(q − max q), so
    softmax ≈ p_int · 2^{−(b−1)}, codes in [0, 2^{b−1} − 1] (floored: ≤ 1 code low).

    Args:
      q: int32 codes of the logits (|q| < 2^30).
      scale: the logits' scale s > 0 (scalar).
      out_bits: b, output bits (codes use b − 1 of them, as in I-ViT).
      axis: softmax axis.
      exp_bits: the codes are pre-shifted so that 1/s has this many bits (the resolution of
        the exponent); the exponential then has 31 − exp_bits − max(b + 4, bits(length))
        fractional bits (I-ViT uses a fixed n = 15).

    Returns:
      (p_int int32, output scale 2^{−(b−1)} float32).

    References: Li & Gu (2023), "I-ViT", Shiftmax.
    """
    _check_bits(out_bits)
    q = _as_codes(q)
    u, x0, n = _exp_constants(scale, q.shape[axis], out_bits, exp_bits)
    e = exp_shift(_prescale(q - jnp.max(q, axis=axis, keepdims=True), u), x0, n)
    factor = _INT_MAX // jnp.sum(e, axis=axis, keepdims=True)
    out = (e * factor) >> (32 - out_bits)
    return out, jnp.float32(2.0 ** -(out_bits - 1))


def shift_gelu(
    q: Int[ArrayLike, "*shape"],
    scale: Float[ArrayLike, ""],
    *,
    out_bits: int = 8,
    alpha: float = 1.702,
    exp_bits: int = 10,
) -> tuple[Int[Array, "*shape"], Float[Array, ""]]:
    """Integer-only GELU (ShiftGELU): GELU(x) ≈ x σ(αx), σ from the shift exponential.

    e = exp_shift(−|q|) at scale sα, one = |x₀| 2^n = exp_shift(0); σ_int = (num ·
    ⌊(2^31 − 1)/(one + e)⌋) >> (32 − b), num = one for q ≥ 0 and e for q < 0; out = q · σ_int.

    Args:
      q: int32 codes (|q| < 2^{32 − b}).
      scale: input scale s > 0 (scalar).
      out_bits: b, bits of the sigmoid codes (scale 2^{−(b−1)}).
      alpha: 1.702 for GELU (I-ViT), 1.0 for SiLU (x σ(x), the SwiGLU gate).
      exp_bits: as in `shiftmax` (I-ViT uses a fixed n = 23).

    Returns:
      (out int32, output scale s · 2^{−(b−1)}).

    References: Li & Gu (2023), "I-ViT", ShiftGELU; Hendrycks & Gimpel (2016), GELU ≈ xσ(1.702x).
    """
    _check_bits(out_bits)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}.")
    q = _as_codes(q)
    s = jnp.asarray(scale, jnp.float32)
    u, x0, n = _exp_constants(s * alpha, 2, out_bits, exp_bits)
    e = exp_shift(_prescale(-jnp.abs(q), u), x0, n)
    one = -x0 << n
    num = jnp.where(q >= 0, one, e)
    sigma = (num * (_INT_MAX // (one + e))) >> (32 - out_bits)
    return q * sigma, s * 2.0 ** -(out_bits - 1)


def i_layernorm(
    q: Int[ArrayLike, "... d"],
    scale: Float[ArrayLike, ""],
    gamma: Float[ArrayLike, " d"],
    beta: Float[ArrayLike, " d"],
    *,
    eps: float = 1e-5,
    norm_bits: int = 14,
    gamma_bits: int = 10,
) -> tuple[Int[Array, "... d"], Float[Array, ""]]:
    """Integer-only LayerNorm (I-LayerNorm) over the last axis.

    μ = ⌊(Σq + D/2)/D⌋, y = q − μ, σ_int = isqrt(Σy² + round(D ε/s²)),
    z = (y · ⌊2^30/σ_int⌋) >> (30 − k)  (≈ (x − μ)/√(var + ε) at scale √D/2^k),
    out = z γ_int + β_int,  γ_int = round(γ/s_γ), s_γ = max|γ|/(2^{g−1} − 1),
    β_int = round(β/s_out).

    Args:
      q: int32 codes (Σ_d (q − μ)² must stay below 2^31, e.g. |q| < 2^15/√D).
      scale: input scale s (only enters through ε).
      gamma, beta: (D,) float affine parameters (quantized here; a one-off on the weights).
      eps: the float LayerNorm's ε.
      norm_bits: k, fractional bits of the normalized value (k + gamma_bits ≤ 24).
      gamma_bits: bits of the per-tensor γ codes.

    Returns:
      (out int32 (..., D), output scale √D 2^{−k} s_γ float32 scalar).

    References: Li & Gu (2023), "I-ViT", I-LayerNorm; Ba et al. (2016), "Layer Normalization".
    """
    q = _as_codes(q)
    d = q.shape[-1]
    if jnp.shape(gamma) != (d,) or jnp.shape(beta) != (d,):
        raise ValueError(
            f"gamma and beta must have shape ({d},), got {jnp.shape(gamma)}, {jnp.shape(beta)}."
        )
    if not (2 <= gamma_bits and 1 <= norm_bits and norm_bits + gamma_bits <= 24):
        raise ValueError(
            f"need gamma_bits ≥ 2, norm_bits ≥ 1 and norm_bits + gamma_bits ≤ 24, "
            f"got {norm_bits}, {gamma_bits}."
        )
    s = jnp.asarray(scale, jnp.float32)
    gamma = jnp.asarray(gamma, jnp.float32)
    g_max = jnp.max(jnp.abs(gamma))
    s_gamma = jnp.where(g_max > 0, g_max, 1.0) / (2 ** (gamma_bits - 1) - 1)
    s_out = math.sqrt(d) * 2.0**-norm_bits * s_gamma
    gamma_int = jnp.round(gamma / s_gamma).astype(jnp.int32)
    beta_int = jnp.round(jnp.asarray(beta, jnp.float32) / s_out).astype(jnp.int32)
    eps_int = jnp.round(jnp.minimum(d * eps / (s * s), 2.0**30)).astype(jnp.int32)

    mean = (jnp.sum(q, axis=-1, keepdims=True) + d // 2) // d
    y = q - mean
    std = jnp.maximum(integer_sqrt(jnp.sum(y * y, axis=-1, keepdims=True) + eps_int), 1)
    z = (y * ((1 << 30) // std)) >> (30 - norm_bits)
    lead = (1,) * (q.ndim - 1)
    return z * gamma_int.reshape(*lead, d) + beta_int.reshape(*lead, d), s_out


# ---------------------------------------------------------------------------------------------
# Worst-case error bounds (host-side float64, for tests and reports)
# ---------------------------------------------------------------------------------------------

_CHORD = (0.5 / math.log(2)) / 2 ** (1 / math.log(2) - 2)  # max (1 + f/2)/2^f = 1.0615


def shift_exp_distortion(scale: float, terms: int, out_bits: int, exp_bits: int = 10):
    """(|x₀|, u, n, k, a) of the shift exponential at a concrete scale: pre-shift u, n as in
    `shiftmax`, slope k and weight ratio a (see the module docstring)."""
    inv = float(np.float32(1.0) / np.float32(scale))
    u = exp_bits - max(math.floor(inv), 1).bit_length()
    x0 = max(math.floor(np.float32(inv) * np.float32(2.0**u)), 1)
    n = max(31 - x0.bit_length() - max(out_bits + 4, terms.bit_length()), 0)
    k = 1.4375 / (math.log2(math.e) * scale * 2.0**-u * x0)
    a = _CHORD * 2 ** (3.5 / x0) * (x0 + 1) / x0
    return x0, u, n, k, a


def _ratio_error(a: float) -> float:
    return (math.sqrt(a) - 1) / (math.sqrt(a) + 1)


def shiftmax_error_bound(x, scale: float, *, out_bits: int = 8, axis: int = -1, exp_bits: int = 10):
    """Per-row bound on |shiftmax · 2^{−(b−1)} − softmax(x)| for x = s·q (float64, NumPy).

    max|softmax(k x) − softmax(x)| + (√a − 1)/(√a + 1) + (L + 1)/(|x₀| 2^n) + 2^{−(b−1)}
    + 2^{−(b+4)}.
    """
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    length = x.shape[-1]
    x0, _, n, k, a = shift_exp_distortion(scale, length, out_bits, exp_bits)
    y = x - x.max(-1, keepdims=True)
    soft = lambda t: np.exp(t) / np.exp(t).sum(-1, keepdims=True)  # noqa: E731
    temp = np.abs(soft(k * y) - soft(y)).max(-1, keepdims=True)
    rest = (
        _ratio_error(a) + length / (x0 * 2.0**n) + 2.0 ** -(out_bits - 1) + 2.0 ** -(out_bits + 4)
    )
    return np.moveaxis(temp + rest, -1, axis)


def shift_gelu_error_bound(
    x, scale: float, *, out_bits: int = 8, alpha: float = 1.702, exp_bits: int = 10
):
    """Elementwise bound on |shift_gelu − x σ(αx)| for x = s·q (float64, NumPy).

    |x| (|σ(kαx) − σ(αx)| + (√a − 1)/(√a + 1) + 2/(|x₀| 2^n) + 2^{−(b−1)} + 2^{−(b+4)}), with
    the k, a of the exponential at scale sα.
    """
    x = np.asarray(x, np.float64)
    x0, _, n, k, a = shift_exp_distortion(scale * alpha, 2, out_bits, exp_bits)
    sig = lambda t: 1.0 / (1.0 + np.exp(-t))  # noqa: E731
    per_x = np.abs(sig(k * alpha * x) - sig(alpha * x)) + _ratio_error(a) + 2 / (x0 * 2.0**n)
    return np.abs(x) * (per_x + 2.0 ** -(out_bits - 1) + 2.0 ** -(out_bits + 4))


def i_layernorm_error_bound(
    x, scale: float, gamma, *, eps: float = 1e-5, norm_bits: int = 14, gamma_bits: int = 10
):
    """Elementwise bound on |i_layernorm − LayerNorm(x)| for x = s·q (float64, NumPy).

    With σ the row's standard deviation in codes (ε included) and z the exact normalized
    value and δ = 1/2 + 1/(2D) the rounding of the mean:
    Δz ≤ δ/σ + |z| δ²/(2σ²) + |z| (1/⌊√(Dσ²)⌋ + 1/(4Dσ²) + √D σ/2^30) + √D/2^k (mean, square
    root, ε rounding, factor, final shift); error ≤ |γ| Δz + (|z| + Δz) s_γ/2 + s_out/2.
    """
    x = np.asarray(x, np.float64) / scale
    gamma = np.asarray(gamma, np.float64)
    d = x.shape[-1]
    var = x.var(-1, keepdims=True) + eps / scale**2
    sigma = np.sqrt(var)
    z = (x - x.mean(-1, keepdims=True)) / sigma
    std_int = np.maximum(np.floor(np.sqrt(d * var)), 1)
    delta = 0.5 + 0.5 / d  # ⌊(Σq + ⌊D/2⌋)/D⌋ − mean ∈ [−δ, 1/2]
    dz = (
        delta / sigma
        + np.abs(z) * delta**2 / (2 * var)
        + np.abs(z) * (1 / std_int + 1 / (4 * d * var) + math.sqrt(d) * sigma / 2**30)
        + math.sqrt(d) * 2.0**-norm_bits
    )
    g_max = np.abs(gamma).max()
    s_gamma = (g_max if g_max > 0 else 1.0) / (2 ** (gamma_bits - 1) - 1)
    s_out = math.sqrt(d) * 2.0**-norm_bits * s_gamma
    return np.abs(gamma) * dz + (np.abs(z) + dz) * s_gamma / 2 + s_out / 2
