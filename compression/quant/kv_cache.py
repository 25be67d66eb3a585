"""Compressed-KV-cache decoding: one loop for every KV compressor (plain quantization, GEAR, EMS).

A `KVCompressor` maps a block of cache entries — keys and values of shape
(layers, batch, n, kv_heads, head_dim), plus, when it asks for them, the prefill attention
probabilities — to the entries the decoder will read back and the bytes their compressed form
occupies. The storage is simulated exactly: the decoder reads decompress(compress(entries)).

`kv_compress_hook` turns a compressor into the one decoding loop's plain ``kv_compress``
argument (`feynkit.inference.decoding.generate` and its teacher-forced `forced_logits`; this
package does not import inference — `feynkit.experiments.evaluation.compressed_decode_logits`
wires the two), for a model with an explicit KV-cache pytree
(``model.init_cache``, ``model.step(params, tokens, cache, position)``, a cache with fields
``k``, ``v`` of that layout, e.g. `feynkit.models.TransformerLM`):

1. prefill the first P tokens in full precision (their own logits are exact, as in GEAR);
2. compress the P cached entries once;
3. decode the remaining tokens teacher-forced, in chunks of ``recompress_every`` tokens: a chunk
   attends to the compressed past and, causally, to its own full-precision entries; after a
   full chunk its entries are compressed too (GEAR's streaming buffer of n_b tokens). With
   ``recompress_every=None`` the decoded tokens stay in full precision (a recent window).

References:
  Kang et al. (2024), "GEAR", arXiv:2403.05527; Li et al. (2024), "EMS", arXiv:2412.08521;
  Liu et al. (2024), "KIVI" (per-channel keys, per-token values, a full-precision recent window).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from feynkit.compression.quant.kv_ems import (
    ems_bytes,
    ems_compress,
    ems_expand,
    global_local_scores,
)
from feynkit.compression.quant.kv_gear import gear_compress
from feynkit.core.types import Array, ArrayLike, Float, Int, PyTree

__all__ = [
    "KVCompressor",
    "ems_kv_compressor",
    "gear_kv_compressor",
    "identity_kv_compressor",
    "kv_compress_hook",
    "lm_attention_probs",
    "uniform_kv_compressor",
]

# compress(k, v, probs) -> (k_hat, v_hat, compressed bytes); k, v (L, B, n, H, d),
# probs (L, B, H, t, n) or None.
CompressFn = Callable[[Array, Array, Array | None], tuple[Array, Array, int]]


class KVCompressor(NamedTuple):
    """A KV-cache compressor for `compressed_decode_logits`.

    Attributes:
      compress: (k, v, probs) -> (k̂, v̂, bytes); k, v of shape (layers, batch, n, kv_heads,
        head_dim), probs the prefill attention (layers, batch, kv_heads, t, n) or None.
      needs_attention: whether ``compress`` reads ``probs``.
      name: for reports.
    """

    compress: CompressFn
    needs_attention: bool = False
    name: str = ""


def _to_heads(x):  # (L, B, n, H, d) -> (L, B, H, n, d)
    return jnp.moveaxis(x, 2, 3)


def _from_heads(x):
    return jnp.moveaxis(x, 3, 2)


def identity_kv_compressor() -> KVCompressor:
    """Full precision: returns the entries unchanged, counted as fp16 (2 bytes per number)."""

    def compress(k, v, probs):
        return k, v, 2 * (k.size + v.size)

    return KVCompressor(compress, False, "fp16")


def gear_kv_compressor(
    bits: int,
    *,
    rank: int = 0,
    outlier_fraction: float = 0.0,
    key_group_size: int | None = None,
    value_group_size: int | None = None,
    symmetric: bool = False,
) -> KVCompressor:
    """GEAR per (layer, sequence, head): K̂ = Quant_b(K − S) + L + S per-channel, V̂ per-token.

    Keys are quantized per channel (groups of ``key_group_size`` tokens, None: all tokens of
    the block), values per token (groups of ``value_group_size`` channels, None: the head).

    Args:
      bits, rank, outlier_fraction, symmetric: as in `gear_compress`.
      key_group_size, value_group_size: group lengths (see above).

    Returns:
      A `KVCompressor`.

    References:
      Kang et al. (2024), "GEAR", arXiv:2403.05527.
    """
    kw = dict(bits=bits, rank=rank, outlier_fraction=outlier_fraction, symmetric=symmetric)

    def compress(k, v, probs):
        gk = gear_compress(_to_heads(k), group_size=key_group_size, axis=0, **kw)
        gv = gear_compress(_to_heads(v), group_size=value_group_size, axis=1, **kw)
        k_hat, v_hat = _from_heads(gk.dequantize()), _from_heads(gv.dequantize())
        return k_hat, v_hat, gk.nbytes + gv.nbytes

    name = f"gear{bits}b_r{rank}_s{outlier_fraction:g}" if rank or outlier_fraction else ""
    return KVCompressor(compress, False, name or f"uniform{bits}b")


def uniform_kv_compressor(
    bits: int,
    *,
    key_group_size: int | None = None,
    value_group_size: int | None = None,
    symmetric: bool = False,
) -> KVCompressor:
    """Plain uniform b-bit quantization (KIVI layout): GEAR with rank 0 and no outliers."""
    return gear_kv_compressor(
        bits,
        key_group_size=key_group_size,
        value_group_size=value_group_size,
        symmetric=symmetric,
    )


def ems_kv_compressor(
    budget_fraction: float,
    *,
    window: int = 8,
    merge_threshold: float = -1.0,
    local_weight: float = 0.5,
) -> KVCompressor:
    """EMS evict-then-merge with a per-head token budget B = ⌈fraction · n⌉ (at least ``window``).

    Token importance is `global_local_scores` of the prefill attention; the compressed cache is
    written back by `ems_expand` (merged entries copied into their class's slots, which gives
    each merged token the log-count attention bias). The default τ = −1 merges every evicted
    token, since a model without a key mask cannot skip dropped (zero-class) slots.

    Args:
      budget_fraction: B / n in (0, 1].
      window, merge_threshold: as in `ems_compress`.
      local_weight: λ of `global_local_scores`.

    Returns:
      A `KVCompressor` that needs the prefill attention.

    References:
      Li et al. (2024), "EMS", arXiv:2412.08521.
    """
    if not 0.0 < budget_fraction <= 1.0:
        raise ValueError(f"budget_fraction must be in (0, 1], got {budget_fraction}.")

    def compress(k, v, probs):
        if probs is None:
            raise ValueError("EMS needs the prefill attention probabilities (needs_attention).")
        n = k.shape[2]
        budget = min(n, max(window, math.ceil(budget_fraction * n)))
        scores = global_local_scores(
            probs, window=max(1, min(window, probs.shape[-2])), local_weight=local_weight
        )
        ems = ems_compress(
            _to_heads(k),
            _to_heads(v),
            scores,
            budget=budget,
            window=window,
            merge_threshold=merge_threshold,
        )
        k_hat, v_hat = ems_expand(ems)
        return _from_heads(k_hat), _from_heads(v_hat), ems_bytes(ems)

    return KVCompressor(compress, True, f"ems{budget_fraction:g}")


def lm_attention_probs(
    model: Any, params: PyTree, tokens: Int[ArrayLike, "b t"]
) -> Float[Array, "layers b kv t t"]:
    """Causal attention probabilities of every layer of a `TransformerLM`, summed over the query
    heads that share a key/value head: P_l[b, g, i, j] = Σ_{h ∈ g} softmax_j(q_i·k_j / √d).

    Queries and keys are read from the model's ``q_proj``/``k_proj`` outputs (Flax
    ``capture_intermediates``) and rotated with its RoPE, so the model needs no change.

    Args:
      model: a `feynkit.models.TransformerLM`.
      params: its parameters.
      tokens: (b, t) the prompt (positions 0, …, t − 1).

    Returns:
      (num_layers, b, kv_heads, t, t), each query row of each query head summing to 1.
    """
    from feynkit.models.transformer import apply_rope, rope_cos_sin

    tokens = jnp.asarray(tokens)
    b, t = tokens.shape
    _, state = model.apply(
        {"params": params}, tokens, capture_intermediates=True, mutable=["intermediates"]
    )
    inter = state["intermediates"]
    h, kvh, hd = model.num_heads, model.kv_heads, model.head_dim
    cos, sin = rope_cos_sin(jnp.arange(t), hd, model.rope_base)
    causal = jnp.tril(jnp.ones((t, t), bool))
    out = []
    for i in range(model.num_layers):
        attn = inter[f"layers_{i}"]["self_attn"]
        q = apply_rope(attn["q_proj"]["__call__"][0].reshape(b, t, h, hd), cos, sin)
        k = apply_rope(attn["k_proj"]["__call__"][0].reshape(b, t, kvh, hd), cos, sin)
        q = q.reshape(b, t, kvh, h // kvh, hd)
        s = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / math.sqrt(hd)
        s = jnp.where(causal[None, None, None], s, jnp.finfo(jnp.float32).min)
        out.append(jax.nn.softmax(s, axis=-1).sum(2))
    return jnp.stack(out)


class KVCacheInfo(NamedTuple):
    """Storage of the compressed cache entries: ``compressed_bytes`` vs ``fp16_bytes``."""

    compressed_bytes: Array
    fp16_bytes: Array


def _replace(cache, start, k_hat, v_hat):
    k = jax.lax.dynamic_update_slice_in_dim(cache.k, k_hat.astype(cache.k.dtype), start, 2)
    v = jax.lax.dynamic_update_slice_in_dim(cache.v, v_hat.astype(cache.v.dtype), start, 2)
    return cache._replace(k=k, v=v)


def kv_compress_hook(model: Any, params: PyTree, compressor: KVCompressor) -> Callable:
    """The `KVCompressor` as the decoding loop's ``kv_compress`` argument
    (`feynkit.inference.decoding.generate`, `forced_logits`): compresses the cache slots
    [start, stop) in place and reports (compressed bytes, fp16 bytes) of those entries.

    The attention probabilities a compressor needs are those of the written tokens
    (`lm_attention_probs` of the chunk, positions from 0: the prefill)."""

    def hook(cache, tokens, start, stop):
        probs = lm_attention_probs(model, params, tokens) if compressor.needs_attention else None
        k_hat, v_hat, nbytes = compressor.compress(
            cache.k[:, :, start:stop], cache.v[:, :, start:stop], probs
        )
        stats = (jnp.asarray(nbytes, jnp.float32), jnp.asarray(2 * 2 * k_hat.size, jnp.float32))
        return _replace(cache, start, k_hat, v_hat), stats

    return hook
