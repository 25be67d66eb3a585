"""The one decoding loop: draft a candidate tree, verify it in one forward pass, accept a path.

Every decoder is a `Decoder` plugged into `generate`, a ``lax.while_loop`` with static shapes
over a batch of sequences, each with its own length, cache position and stopping:

    root  = the last decided token (not yet in the KV cache)
    cands = decoder.propose(…)                   candidate tokens of the decoder's `Tree`
    logits, cache = model.step([root, cands])    one forward pass, tree-attention mask
    node, next = decoder.accept(logits, …)       the accepted path root → node, and the token
                                                 the target draws after it
    emit  path tokens + next; move the path's cache entries into consecutive slots

The baseline is the tree of the root alone (one token per forward pass); speculative decoding
a chain of draft-model tokens; aggressive decoding a chain copied from the input; Medusa a tree
of its heads' top-k tokens. Every accept rule returns tokens distributed as (greedy: equal to)
sequential decoding from the filtered target distribution (`sampling`), so all decoders agree.

The loop is per sequence under ``jax.vmap``: sequences accept different numbers of tokens, so
each keeps its own cache position; a finished sequence (EOS or ``max_new_tokens``) stops
changing while the others run on. A KV-cache compressor is a plain function argument
(``kv_compress``, applied to the prefilled cache), wired by the experiments layer.

The model needs ``init_cache(batch, max_len)``, whose leaves have the batch on axis 1 (e.g.
`feynkit.models.KVCache`), ``step(params, tokens, cache, position, positions=, chunk_mask=,
return_hidden=)`` and ``vocab_size`` (e.g. `feynkit.models.TransformerLM`).

References:
  Leviathan et al. (2023), "Fast Inference from Transformers via Speculative Decoding";
  Chen et al. (2023), "Accelerating LLM Decoding with Speculative Sampling";
  Cai et al. (2024), "Medusa", arXiv:2401.10774;
  Sun et al. (2021), "Instantaneous Grammatical Error Correction with Shallow Aggressive
  Decoding" (input-guided aggressive decoding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from feynkit.core.types import Array, ArrayLike, Float, Int, Key, PyTree
from feynkit.inference.decoding.sampling import SamplingConfig
from feynkit.inference.decoding.tree import Tree

__all__ = ["DecodeOutput", "Decoder", "KVCompressFn", "forced_logits", "generate"]

# kv_compress(cache, tokens, start, stop) -> (cache, stats): compress the entries of slots
# [start, stop) of `cache` (tokens: the (b, t) tokens written there); stats: a pytree of
# numbers, summed over every call (e.g. compressed bytes).
KVCompressFn = Callable[[PyTree, Array, int, int], tuple[PyTree, PyTree]]


class Decoder(NamedTuple):
    """A proposer and an acceptance rule for `generate` (functions of one sequence).

    Attributes:
      name: for reports.
      tree: the candidate `Tree` (root alone: the baseline).
      init: (prompt (P,), length (), hidden (d,) at slot length − 2, inputs, cache_len) ->
        aux state.
      propose: (key, buf (T,), length (), aux, sampling) -> (candidates (N − 1,), draft
        probabilities (N − 1, V) or None, aux).
      accept: (key, logits (N, V), tree tokens (N,), draft probabilities, hidden (N, d), aux,
        sampling) -> (accepted node (), next token (), aux).
    """

    name: str
    tree: Tree
    init: Callable[..., Any]
    propose: Callable[..., tuple[Array, Array | None, Any]]
    accept: Callable[..., tuple[Array, Array, Any]]


class DecodeOutput(NamedTuple):
    """What `generate` returns.

    Attributes:
      tokens: (B, P + max_new_tokens) prompt and generated tokens, ``pad_id`` past ``lengths``.
      lengths: (B,) prompt + generated tokens of each sequence.
      num_forwards: (B,) target forward passes after the prefill (one per loop iteration while
        the sequence runs).
      kv_stats: the summed stats of ``kv_compress`` (None without it).
    """

    tokens: Array
    lengths: Array
    num_forwards: Array
    kv_stats: Any = None


def _one(cache):  # a per-sequence cache (no batch axis) -> batch 1 (axis 1)
    return jax.tree.map(lambda a: a[:, None], cache)


def _strip(cache):
    return jax.tree.map(lambda a: a[:, 0], cache)


def _check_prompt(prompt, prompt_lengths, max_new_tokens, cache_len, tree_size):
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2:
        raise ValueError(f"prompt must have shape (batch, length), got {prompt.shape}.")
    b, p = prompt.shape
    if p == 0 or b == 0:
        raise ValueError(f"prompt must hold at least one token per sequence, got {prompt.shape}.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    need = p + max_new_tokens + tree_size
    if cache_len < need:
        raise ValueError(
            f"prompt length {p} + max_new_tokens {max_new_tokens} + tree size {tree_size} = "
            f"{need} exceeds the cache length cache_len={cache_len}; shorten the prompt or "
            "raise cache_len."
        )
    if prompt_lengths is None:
        lengths = jnp.full((b,), p, jnp.int32)
    else:
        lengths = jnp.asarray(prompt_lengths, jnp.int32)
        if lengths.shape != (b,):
            raise ValueError(f"prompt_lengths must have shape ({b},), got {lengths.shape}.")
        if not isinstance(lengths, jax.core.Tracer):
            lv = np.asarray(lengths)
            if lv.min() < 1 or lv.max() > p:
                raise ValueError(
                    f"prompt_lengths must lie in [1, {p}] (an empty prompt has no token to "
                    f"continue), got {lv.min()}..{lv.max()}."
                )
    return prompt.astype(jnp.int32), lengths


def generate(
    model: Any,
    params: PyTree,
    prompt: Int[ArrayLike, "b p"],
    *,
    max_new_tokens: int,
    decoder: Decoder,
    sampling: SamplingConfig | None = None,
    key: Key | None = None,
    prompt_lengths: Int[ArrayLike, " b"] | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    cache_len: int | None = None,
    decoder_inputs: PyTree = None,
    kv_compress: KVCompressFn | None = None,
) -> DecodeOutput:
    """Decode up to ``max_new_tokens`` tokens per sequence with ``decoder``.

    Args:
      model: see the module docstring (e.g. `feynkit.models.TransformerLM`).
      params: its parameters.
      prompt: (B, P) tokens; sequence i's prompt is ``prompt[i, :prompt_lengths[i]]``.
      max_new_tokens: tokens to generate per sequence (fewer when it emits ``eos_id``).
      decoder: a `Decoder` (`baseline_decoder`, `speculative_decoder`, `medusa_decoder`,
        `aggressive_decoder`).
      sampling: the next-token distribution (`SamplingConfig`; None: greedy).
      key: PRNG key (needed unless greedy).
      prompt_lengths: (B,) in [1, P] (default all P).
      eos_id: a sequence stops after emitting it (None: never).
      pad_id: written past each sequence's length.
      cache_len: KV-cache slots (default P + max_new_tokens + tree size, the least it needs).
      decoder_inputs: per-sequence inputs of the decoder (batched pytree; aggressive decoding's
        guide text), passed to ``decoder.init``.
      kv_compress: optional KV compressor applied once to the prefilled prompt entries (slots
        [0, P − 1)), see `KVCompressFn`.

    Returns:
      `DecodeOutput`.

    Raises:
      ValueError: an empty prompt, a prompt that with ``max_new_tokens`` does not fit
        ``cache_len``, or a sampling setting out of range.
    """
    sampling = (SamplingConfig() if sampling is None else SamplingConfig(*sampling)).validate()
    tree = decoder.tree
    n, depth = tree.size, tree.depth
    p = jnp.shape(prompt)[-1] if jnp.ndim(prompt) == 2 else 0
    cache_len = p + max_new_tokens + n if cache_len is None else cache_len
    prompt, lengths = _check_prompt(prompt, prompt_lengths, max_new_tokens, cache_len, n)
    b = prompt.shape[0]
    if key is None:
        if not sampling.greedy:
            raise ValueError("key is required when sampling (temperature > 0).")
        key = jax.random.key(0)
    total = p + max_new_tokens + depth + 1  # buffer: writes of depth + 1 never clamp
    depths = jnp.asarray(tree.depths)
    ancestors = jnp.asarray(tree.ancestors)
    chunk_mask = None if tree.is_chain else jnp.asarray(tree.mask)

    def prefill(prompt_i, len_i, inputs_i):
        cache = model.init_cache(1, cache_len)
        _, cache, hidden = model.step(params, prompt_i[None], cache, 0, return_hidden=True)
        stats = None
        if kv_compress is not None and p > 1:
            cache, stats = kv_compress(cache, prompt_i[None, : p - 1], 0, p - 1)
        h_prev = hidden[0, jnp.maximum(len_i - 2, 0)]
        aux = decoder.init(prompt_i, len_i, h_prev, inputs_i, cache_len)
        buf = jnp.full((total,), pad_id, jnp.int32).at[:p].set(prompt_i)
        return buf, _strip(cache), aux, stats

    inputs = decoder_inputs
    in_axes = (0, 0, None if inputs is None else 0)
    buf, cache, aux, stats = jax.vmap(prefill, in_axes)(prompt, lengths, inputs)
    kv_stats = None if stats is None else jax.tree.map(lambda s: jnp.sum(s, 0), stats)
    limit = lengths + max_new_tokens

    def iterate(carry, k):
        buf, cache, aux, length, done, forwards, limit_i = carry
        k_prop, k_acc = jax.random.split(k)
        root = buf[length - 1]
        cands, q, aux_p = decoder.propose(k_prop, buf, length, aux, sampling)
        tokens = jnp.concatenate([root[None], cands.astype(jnp.int32)])
        start = length - 1
        logits, new_cache, hidden = model.step(
            params,
            tokens[None],
            _one(cache),
            start,
            positions=None if chunk_mask is None else start + depths,
            chunk_mask=chunk_mask,
            return_hidden=True,
        )
        node, nxt, aux_a = decoder.accept(k_acc, logits[0], tokens, q, hidden[0], aux_p, sampling)
        a = depths[node]
        path = ancestors[node]
        emit = jnp.concatenate([tokens[path[1:]], jnp.zeros((1,), jnp.int32)])
        emit = emit.at[a].set(nxt.astype(jnp.int32))
        count = a + 1
        stop = jnp.asarray(False)
        if eos_id is not None:
            is_eos = (emit == eos_id) & (jnp.arange(depth + 1) < count)
            stop = jnp.any(is_eos)
            count = jnp.where(stop, jnp.argmax(is_eos) + 1, count)
        new_len = jnp.minimum(length + count, limit_i)
        new_buf = lax.dynamic_update_slice(buf, emit, (length,))
        new_cache = _strip(new_cache)
        if chunk_mask is not None:  # the accepted path into consecutive slots

            def gather(c):
                window = lax.dynamic_slice_in_dim(c, start, n, axis=1)
                return lax.dynamic_update_slice_in_dim(c, window[:, path], start, axis=1)

            new_cache = jax.tree.map(gather, new_cache)
        new = (
            new_buf,
            new_cache,
            aux_a,
            new_len,
            stop | (new_len >= limit_i),
            forwards + 1,
            limit_i,
        )
        keep = (buf, cache, aux, length, done, forwards, limit_i)
        return jax.tree.map(lambda x_new, x_old: jnp.where(done, x_old, x_new), new, keep)

    def cond(state):
        carry, _, it = state
        return jnp.any(~carry[4]) & (it < max_new_tokens)

    def body(state):
        carry, k, it = state
        k, sub = jax.random.split(k)
        carry = jax.vmap(iterate)(carry, jax.random.split(sub, b))
        return carry, k, it + 1

    done0 = jnp.zeros((b,), bool)
    carry0 = (buf, cache, aux, lengths, done0, jnp.zeros((b,), jnp.int32), limit)
    carry, _, _ = lax.while_loop(cond, body, (carry0, key, jnp.asarray(0)))
    buf, _, _, length, _, forwards, _ = carry
    out = buf[:, : p + max_new_tokens]
    out = jnp.where(jnp.arange(p + max_new_tokens)[None] < length[:, None], out, pad_id)
    return DecodeOutput(out, length, forwards, kv_stats)


def forced_logits(
    model: Any,
    params: PyTree,
    tokens: Int[ArrayLike, "b t"],
    *,
    prefix_len: int,
    chunk: int | None = None,
    kv_compress: KVCompressFn | None = None,
) -> tuple[Float[Array, "b t_dec vocab"], Any]:
    """Teacher-forced logits of tokens[prefix_len:] through the KV cache, as the loop decodes.

    prefill(tokens[:P]) → kv_compress(slots [0, P)) → step(tokens[P:P+c]) →
    kv_compress(slots [P, P+c)) → … in chunks of c = ``chunk`` (None: one chunk, never
    compressed); only full chunks are compressed (a streaming buffer, as in GEAR).

    Args:
      model, params: as in `generate` (``step`` with the plain signature suffices).
      tokens: (b, t) tokens at positions 0, …, t − 1.
      prefix_len: P in [1, t).
      chunk: decoded tokens per step, compressed after each full chunk; None: one chunk.
      kv_compress: see `KVCompressFn` (None: full precision).

    Returns:
      (logits at positions P, …, t − 1, the summed stats of ``kv_compress`` or None).
    """
    tokens = jnp.asarray(tokens)
    b, t = tokens.shape
    if not 1 <= prefix_len < t:
        raise ValueError(f"prefix_len must be in [1, {t - 1}] for {t} tokens, got {prefix_len}.")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens or None, got {chunk}.")
    cache = model.init_cache(b, t)
    _, cache = model.step(params, tokens[:, :prefix_len], cache, 0)
    stats = None

    def compress(cache, start, stop, stats):
        if kv_compress is None:
            return cache, stats
        cache, s = kv_compress(cache, tokens[:, start:stop], start, stop)
        return cache, s if stats is None else jax.tree.map(jnp.add, stats, s)

    cache, stats = compress(cache, 0, prefix_len, stats)
    size = t - prefix_len if chunk is None else chunk
    logits = []
    for start in range(prefix_len, t, size):
        stop = min(start + size, t)
        out, cache = model.step(params, tokens[:, start:stop], cache, start)
        logits.append(out)
        if chunk is not None and stop - start == chunk:
            cache, stats = compress(cache, start, stop, stats)
    return jnp.concatenate(logits, axis=1), stats
