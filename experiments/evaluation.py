"""Evaluation of language models: next-token NLL and perplexity over token windows.

The scoring protocol of every LM replication: the token stream is cut into windows of
``seq_len + 1`` tokens at stride ``seq_len`` (each window's last token is the next window's
first), the model reads ``w[:, :-1]`` and is scored on ``w[:, 1:]``, and

    NLL = −(1/N) Σ_i log p_θ(x_i | x_<i)  (nats/token),    perplexity = exp(NLL),

the mean over all N scored tokens. The per-token term is `losses.next_token_loss`'s
cross-entropy, so training loss and evaluation NLL are the same quantity.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from feynkit.core.types import Array, ArrayLike, Float, Int, PyTree
from feynkit.experiments.losses import next_token_loss

__all__ = [
    "compressed_decode_logits",
    "consecutive_windows",
    "fkc_over_seeds",
    "group_for",
    "lm_nll",
    "lm_nll_fn",
    "lm_perplexity",
    "mean_token_nll",
    "scoring_windows",
    "token_nll",
    "windowed_nll",
]

ApplyFn = Callable[[PyTree, Array], Array]


def scoring_windows(
    tokens: ArrayLike, seq_len: int, count: int | None = None, start: int = 0
) -> np.ndarray:
    """Windows of ``seq_len + 1`` tokens at stride ``seq_len`` from `start` (int32, (n, T + 1)).

    n = (len − start − 1) // seq_len, capped at `count`; every token after the first is scored
    exactly once.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be ≥ 1, got {seq_len}.")
    tokens = np.asarray(tokens)[start:]
    n = (len(tokens) - 1) // seq_len
    n = n if count is None else min(n, count)
    if n < 1:
        raise ValueError(
            f"need more than {seq_len} tokens for one scoring window, got {len(tokens)}; "
            "pass more tokens or a smaller seq_len."
        )
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return tokens[idx].astype(np.int32)


def consecutive_windows(tokens: ArrayLike, count: int, length: int, start: int = 0) -> np.ndarray:
    """`count` consecutive non-overlapping windows of `length` tokens from `start` (int32)."""
    need = start + count * length
    if need > len(tokens):
        raise ValueError(
            f"need {need} tokens for {count} windows of {length}, have {len(tokens)}; "
            "lower count or length."
        )
    return np.asarray(tokens[start:need], np.int32).reshape(count, length)


def token_nll(
    logits: Float[ArrayLike, "... vocab"], targets: Int[ArrayLike, "..."]
) -> Float[Array, "..."]:
    """Per-token NLL −log softmax(logits)[target] (nats)."""
    return optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), targets)


def mean_token_nll(logits: Float[ArrayLike, "... vocab"], targets: Int[ArrayLike, "..."]) -> Array:
    """Mean NLL (nats/token) of `targets` under `logits`."""
    return jnp.mean(token_nll(logits, targets))


def lm_nll(apply_fn: ApplyFn, params: PyTree, windows: Int[ArrayLike, "n t1"]) -> Array:
    """Mean next-token NLL of scoring windows (n, T + 1) under ``apply_fn(params, tokens)``."""
    w = jnp.asarray(windows)
    return next_token_loss(apply_fn)(params, (w[:, :-1], w[:, 1:]), None)


def lm_perplexity(apply_fn: ApplyFn, params: PyTree, windows: Int[ArrayLike, "n t1"]) -> float:
    """exp(`lm_nll`)."""
    return math.exp(float(lm_nll(apply_fn, params, windows)))


def lm_nll_fn(apply_fn: ApplyFn, tokens: ArrayLike, seq_len: int) -> Callable[[PyTree], float]:
    """A jitted ``params ↦ mean NLL`` over the scoring windows of `tokens` (compiled once, so
    many parameter variants of one model are scored cheaply)."""
    w = jnp.asarray(scoring_windows(tokens, seq_len))
    f = jax.jit(lambda params: lm_nll(apply_fn, params, w))
    return lambda params: float(f(params))


def windowed_nll(
    apply_fn: ApplyFn, params: PyTree, tokens: ArrayLike, seq_len: int, batch_size: int
) -> tuple[float, int, float]:
    """Mean NLL over the scoring windows of `tokens`, in batches of `batch_size` windows.

    Returns (mean NLL in nats/token, tokens scored, scoring throughput in tokens/s with the
    compilation excluded). The last batch is padded with zero-weight windows, so one
    compilation serves every batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}.")
    windows = scoring_windows(tokens, seq_len)
    n_win = len(windows)
    pad = (-n_win) % batch_size
    windows = np.concatenate([windows, np.zeros((pad, seq_len + 1), np.int32)])
    weights = np.concatenate([np.ones(n_win), np.zeros(pad)]).astype(np.float32)

    def batch_nll(params, w, mask):
        nll = token_nll(apply_fn(params, w[:, :-1]), w[:, 1:])
        return jnp.sum(nll.sum(-1) * mask)

    compiled = (
        jax.jit(batch_nll).lower(params, windows[:batch_size], weights[:batch_size]).compile()
    )
    t0 = time.perf_counter()
    total = 0.0
    for s in range(0, len(windows), batch_size):
        total += float(compiled(params, windows[s : s + batch_size], weights[s : s + batch_size]))
    tokens_per_s = len(windows) * seq_len / (time.perf_counter() - t0)
    return total / (n_win * seq_len), n_win * seq_len, tokens_per_s


def group_for(d_in: int, target: int) -> int:
    """The largest divisor of `d_in` not above `target`: the quantization group the LM
    compression replications use for a kernel with `d_in` inputs."""
    if d_in < 1 or target < 1:
        raise ValueError(f"d_in and target must be ≥ 1, got {d_in} and {target}.")
    return max(g for g in range(1, min(d_in, target) + 1) if d_in % g == 0)


def compressed_decode_logits(
    model: Any,
    params: PyTree,
    tokens: Int[ArrayLike, "b t"],
    compressor: Any,
    *,
    prefix_len: int,
    recompress_every: int | None = None,
) -> tuple[Float[Array, "b t_dec vocab"], Any]:
    """Teacher-forced logits of tokens[prefix_len:] decoded from a compressed KV cache.

    prefill(tokens[:P]) → cache[:P] ← compressor(cache[:P]) → step(tokens[P:P+c]) →
    cache[P:P+c] ← compressor(cache[P:P+c]) → … (chunks of c = ``recompress_every``).

    Args:
      model: has ``init_cache(batch, max_len)`` and ``step(params, tokens, cache, position)``
        and a cache pytree with ``k``, ``v`` of shape (layers, batch, len, kv_heads, head_dim)
        (e.g. `feynkit.models.TransformerLM`); ``lm_attention_probs`` must apply to it when the
        compressor needs attention.
      params: model parameters.
      tokens: (b, t) int tokens; positions 0, …, t − 1.
      compressor: a `KVCompressor`.
      prefix_len: P, 1 ≤ P < t, the prefilled and then compressed prompt.
      recompress_every: c ≥ 1, compress each full chunk of c decoded tokens (GEAR's streaming
        buffer); None keeps decoded tokens in full precision. Not for compressors that need
        attention.

    Returns:
      (logits at positions P, …, t − 1 — position i predicts token i + 1 —, `KVCacheInfo` of
      every compressed entry).

    References:
      Kang et al. (2024), "GEAR", arXiv:2403.05527 (streaming buffer).
    """
    if recompress_every is not None and (recompress_every < 1 or compressor.needs_attention):
        raise ValueError(
            "recompress_every must be a positive chunk length, and only for compressors that "
            "do not need attention statistics (use None for EMS)."
        )
    from feynkit.compression.quant.kv_cache import KVCacheInfo, kv_compress_hook
    from feynkit.inference.decoding import forced_logits

    logits, (nbytes, fp16) = forced_logits(
        model,
        params,
        tokens,
        prefix_len=prefix_len,
        chunk=recompress_every,
        kv_compress=kv_compress_hook(model, params, compressor),
    )
    return logits, KVCacheInfo(nbytes, fp16)


def fkc_over_seeds(sde, n, dim, cfg, resample_fn):
    """`smc.fkc_sample` over a batch of seed keys: one compiled function for FKC and the naive
    SDE (`weighted` is traced), run over seeds
    with `lax.map` (sequential: batching the SMC loop with vmap is slower on CPU)."""

    def one(k, weighted):
        from feynkit.inference import smc

        state, info = smc.fkc_sample(
            k,
            sde,
            n,
            dim,
            cfg.num_steps,
            t_min=cfg.t_min,
            weighted=weighted,
            resample_fn=resample_fn,
            ess_threshold=cfg.ess_threshold,
        )
        return state.particles, state.log_weights, jnp.sum(info.resampled)

    return jax.jit(lambda keys, weighted: jax.lax.map(lambda k: one(k, weighted), keys))
