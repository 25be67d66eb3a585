"""W8A8 products in Pallas: int8 × int8 → int32 (and fp8 e4m3 × fp8 → f32) with scales.

    y[m, n] = s_x[m] · s_w[n] · Σ_k q_x[m, k] q_w[k, n]

with per-token activation scales s_x (M, 1) and per-output-channel weight scales s_w (1, N)
(SmoothQuant's W8A8 layout). Each program owns a (block_m × block_n) output tile, loops over K in
``block_k`` steps with an exact int32 (fp8: f32) tensor-core accumulator, and applies both
scales in its epilogue; K may be split over programs for small batches as in
`quantized_matmul`. Hopper's int8 and fp8 tensor cores run at twice the bf16 rate, so this pays
where the product is compute-bound (prefill, ≳ 200 tokens at Llama shapes); at decode sizes it
is memory-bound and reads half the bytes of bf16 weights, as int8 weight-only does.

`quantize_per_token` / `quantize_per_channel` give the symmetric absmax codes the kernel takes.

References:
  Xiao et al. (2023), "SmoothQuant" (per-token × per-channel W8A8); Dettmers et al. (2022),
  "LLM.int8()"; Micikevicius et al. (2022), "FP8 Formats for Deep Learning" (e4m3, max 448).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from feynkit.compression.kernels import _common as C
from feynkit.compression.kernels.quantized_matmul import QMatmulBlocks, split_k_plan

__all__ = [
    "quantize_per_channel",
    "quantize_per_token",
    "w8a8_matmul",
    "w8a8_matmul_reference",
]

_QMAX = {jnp.dtype(jnp.int8): 127.0, jnp.dtype(jnp.float8_e4m3fn): 448.0}


def _code_dtype(dtype):
    dt = jnp.dtype(dtype)
    if dt not in _QMAX:
        raise ValueError(f"dtype must be int8 or float8_e4m3fn, got {dt}.")
    return dt


def _quantize(x, axis, dtype):
    dt = _code_dtype(dtype)
    x = jnp.asarray(x, jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    s = jnp.where(amax > 0, amax / _QMAX[dt], 1.0)
    q = x / s
    q = jnp.clip(jnp.round(q), -127, 127) if dt == jnp.int8 else jnp.clip(q, -448.0, 448.0)
    return q.astype(dt), s


def quantize_per_token(x, dtype=jnp.int8):
    """(codes, scale (M, 1)): symmetric absmax codes of each row of x (M, K)."""
    return _quantize(x, 1, dtype)


def quantize_per_channel(w, dtype=jnp.int8):
    """(codes, scale (1, N)): symmetric absmax codes of each column of w (K, N)."""
    return _quantize(w, 0, dtype)


def _acc_dtype(dt):
    return jnp.int32 if dt == jnp.int8 else jnp.float32


def _check(xq, sx, wq, sw):
    if xq.ndim != 2 or wq.ndim != 2 or xq.shape[1] != wq.shape[0]:
        raise ValueError(f"xq (M, K) and wq (K, N) do not fit: {xq.shape}, {wq.shape}.")
    if xq.dtype != wq.dtype:
        raise ValueError(f"xq and wq must share a dtype (int8 or fp8), got {xq.dtype}, {wq.dtype}.")
    _code_dtype(xq.dtype)
    if sx.shape != (xq.shape[0], 1) or sw.shape != (1, wq.shape[1]):
        raise ValueError(f"sx must be (M, 1) and sw (1, N); got {sx.shape}, {sw.shape}.")


def w8a8_matmul_reference(xq, sx, wq, sw, *, out_dtype=jnp.float32):
    """One XLA integer (fp8: f32-accumulated) dot, then the two scales."""
    acc = jnp.matmul(xq, wq, preferred_element_type=_acc_dtype(xq.dtype))
    return (acc.astype(jnp.float32) * sx * sw).astype(out_dtype)


def _kernel(x_ref, w_ref, sx_ref, sw_ref, o_ref, *, bk, steps, acc_dtype):
    bm, bn = o_ref.shape

    def body(t, acc):
        rows = pl.ds(t * bk, bk)
        return acc + jnp.dot(x_ref[:, rows], w_ref[rows, :], preferred_element_type=acc_dtype)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), acc_dtype))
    o_ref[...] = (acc.astype(jnp.float32) * sx_ref[...] * sw_ref[...]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("blocks", "out_dtype"))
def _pallas(xq, sx, wq, sw, *, blocks, out_dtype):
    (m, k), n = xq.shape, wq.shape[1]
    bm = min(blocks.block_m, C.pow2_at_least(m, 16))
    bn = min(blocks.block_n, C.pow2_at_least(n, 16))
    bk = blocks.block_k
    mp, np_ = C.round_up(m, bm), C.round_up(n, bn)
    total, tiles = -(-k // bk), (mp // bm) * (np_ // bn)
    split, steps = split_k_plan(tiles, total, blocks)
    kp, ks, mt = split * steps * bk, steps * bk, mp // bm
    args = (
        C.pad_to(xq, (mp, kp)),
        C.pad_to(wq, (kp, np_)),
        C.pad_to(sx.astype(jnp.float32), (mp, 1)),
        C.pad_to(sw.astype(jnp.float32), (1, np_)),
    )
    part = jnp.float32 if split > 1 else out_dtype
    out = C.pallas_call(
        functools.partial(_kernel, bk=bk, steps=steps, acc_dtype=_acc_dtype(xq.dtype)),
        out_shape=jax.ShapeDtypeStruct((split * mp, np_), part),
        grid=(mt, np_ // bn, split),
        in_specs=[
            pl.BlockSpec((bm, ks), lambda i, j, s: (i, s)),
            pl.BlockSpec((ks, bn), lambda i, j, s: (s, j)),
            pl.BlockSpec((bm, 1), lambda i, j, s: (i, 0)),
            pl.BlockSpec((1, bn), lambda i, j, s: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, s: (s * mt + i, j)),
        params=(blocks.num_warps, blocks.num_stages),
        name=f"w8a8_{jnp.dtype(xq.dtype).name}",
    )(*args)
    if split > 1:
        out = out.reshape(split, mp, np_).sum(axis=0)
    return out[:m, :n].astype(out_dtype)


def w8a8_matmul(
    xq,
    sx,
    wq,
    sw,
    *,
    implementation: str | None = None,
    blocks: QMatmulBlocks | None = None,
    out_dtype=jnp.float32,
):
    """y = s_x · s_w · (q_x @ q_w) for int8 (exact int32 accumulation) or fp8 e4m3 codes.

    Args:
      xq: (M, K) activation codes, sx: (M, 1) per-token scales (`quantize_per_token`);
      wq: (K, N) weight codes of the same dtype, sw: (1, N) per-channel scales.
      implementation: "pallas", "reference" or None (kernel on GPU, reference elsewhere).
      blocks: `QMatmulBlocks` (block_k ≥ 32: int8 tensor-core steps); out_dtype: f32 default.
    """
    xq, sx, wq, sw = map(jnp.asarray, (xq, sx, wq, sw))
    _check(xq, sx, wq, sw)
    if C.resolve_implementation(implementation) == "reference":
        return w8a8_matmul_reference(xq, sx, wq, sw, out_dtype=out_dtype)
    return _pallas(xq, sx, wq, sw, blocks=blocks or QMatmulBlocks(), out_dtype=jnp.dtype(out_dtype))
