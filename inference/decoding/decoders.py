"""The decoders of the one loop (`generate`): baseline, speculative, aggressive, Medusa.

Acceptance rules (functions of one sequence; logits (N, V) of the tree's N nodes, row i the
target's prediction after node i):

* `accept_greedy`: node i is consistent when its token is the argmax after its parent; the
  deepest node whose whole path is consistent is accepted, and the argmax after it is emitted
  — token-for-token greedy decoding.
* `accept_chain`: speculative sampling on a chain with draft distributions q_i: draft token
  d_i is kept with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection j the next
  token is drawn from norm(max(0, p_j − q_j)), after all γ from p_{γ+1}. Every emitted token is
  distributed exactly as sequential sampling from p (Leviathan et al. 2023, Theorem 1). A
  deterministic guess (aggressive decoding) is the draft q = one-hot(d).
* `accept_typical`: Medusa's typical acceptance, with p the filtered target at temperature T
  and τ = min(ε, δ · exp(−H(p))) after each node. Deterministic form: candidate x is consistent
  when p(x) > τ; the deepest consistent path is accepted (ties: the most probable path) and the
  next token is drawn from p after it — not distribution-preserving (Cai et al. 2024, §2.3.1).
  Sampling form (the reference code's `get_typical_posterior_mask`, done per tree node): one
  token is drawn at every node from the typical set {x : p(x) ≥ τ} renormalised, a child is
  consistent when it is its parent's draw, and the draw at the accepted node is emitted next —
  so the output is distributed exactly as sequential sampling from the typical-truncated target.
  (The reference draws separately for each root-to-leaf candidate row, so rows sharing a prefix
  disagree on it, and emits a fresh token instead of the draw.)

References:
  Leviathan et al. (2023), "Fast Inference from Transformers via Speculative Decoding";
  Chen et al. (2023), "Accelerating LLM Decoding with Speculative Sampling";
  Cai et al. (2024), "Medusa", arXiv:2401.10774;
  Sun et al. (2021), "Shallow Aggressive Decoding" (input-guided drafts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from feynkit.core.types import Array, PyTree
from feynkit.inference.decoding.loop import Decoder
from feynkit.inference.decoding.sampling import (
    SamplingConfig,
    filtered_probs,
    sample_token,
)
from feynkit.inference.decoding.tree import Tree, chain_tree

__all__ = [
    "accept_chain",
    "accept_greedy",
    "accept_typical",
    "aggressive_decoder",
    "baseline_decoder",
    "medusa_decoder",
    "speculative_decoder",
]


def _deepest(tree: Tree, ok: Array, score: Array | None = None) -> Array:
    """The deepest node whose path (root excluded) is all ``ok``; ties: highest ``score``,
    then the lowest index."""
    anc = jnp.asarray(tree.ancestors)
    path_ok = jnp.all(ok[anc], axis=1)
    n = tree.size
    rank = jnp.asarray(tree.depths, jnp.float32) * 4 * n
    if score is not None:  # a path score in [0, 1] breaks ties between equally deep paths
        rank = rank + 2 * n * jnp.clip(score, 0.0, 1.0)
    rank = rank - jnp.arange(n) / n
    return jnp.argmax(jnp.where(path_ok, rank, -jnp.inf))


def accept_greedy(tree: Tree, logits: Array, tokens: Array) -> tuple[Array, Array]:
    """(accepted node, the argmax after it): exactly greedy decoding."""
    best = jnp.argmax(logits, -1).astype(jnp.int32)
    parents = jnp.maximum(jnp.asarray(tree.parents), 0)
    ok = (tokens == best[parents]).at[0].set(True)
    node = _deepest(tree, ok)
    return node, best[node]


def accept_chain(
    key: Array, logits: Array, tokens: Array, q: Array, sampling: SamplingConfig
) -> tuple[Array, Array]:
    """Speculative sampling on a chain (see the module docstring); greedy: `accept_greedy`."""
    gamma = tokens.shape[0] - 1
    if sampling.greedy:
        return accept_greedy(chain_tree(gamma), logits, tokens)
    k_u, k_res = jax.random.split(key)
    p = filtered_probs(logits, sampling)  # (γ + 1, V)
    d = tokens[1:]
    idx = jnp.arange(gamma)
    pd, qd = p[idx, d], q[idx, d]
    u = jax.random.uniform(k_u, (gamma,))
    keep = u * qd < pd  # u < p / q (q(d) > 0: d was drawn from q)
    a = jnp.sum(jnp.cumprod(keep.astype(jnp.int32)))
    q_pad = jnp.concatenate([q, jnp.zeros_like(q[:1])])
    residual = jnp.maximum(p[a] - q_pad[a], 0.0)
    mass = residual.sum()
    residual = jnp.where(mass > 0, residual / jnp.maximum(mass, 1e-30), p[a])
    nxt = jax.random.categorical(k_res, jnp.log(residual))
    return a, nxt.astype(jnp.int32)


def accept_typical(
    key: Array,
    tree: Tree,
    logits: Array,
    tokens: Array,
    sampling: SamplingConfig,
    *,
    epsilon: float,
    delta: float,
    sampled: bool,
) -> tuple[Array, Array]:
    """Medusa's typical acceptance (see the module docstring); greedy: `accept_greedy`.

    ``sampled=False``: the deterministic threshold form; ``sampled=True``: the sampling form
    (exact sequential sampling from the typical-truncated target, given that siblings carry
    distinct tokens, as Medusa's top-k candidates do)."""
    if sampling.greedy:
        return accept_greedy(tree, logits, tokens)
    prob = filtered_probs(logits, sampling)  # (N, V)
    logp = jnp.log(jnp.maximum(prob, 1e-30))
    entropy = -jnp.sum(jnp.where(prob > 0, prob * logp, 0.0), -1)
    tau = jnp.minimum(epsilon, delta * jnp.exp(-entropy))  # (N,) threshold after each node
    parents = jnp.maximum(jnp.asarray(tree.parents), 0)
    if sampled:
        typical = (prob >= tau[:, None]) | (prob >= prob.max(-1, keepdims=True))
        keys = jax.random.split(key, tree.size)
        draws = jax.vmap(jax.random.categorical)(keys, jnp.where(typical, logp, -jnp.inf))
        ok = (tokens == draws[parents]).at[0].set(True)  # siblings differ: one path matches
        node = _deepest(tree, ok)
        return node, draws[node].astype(jnp.int32)
    p_tok = prob[parents, tokens]
    ok = (p_tok > tau[parents]).at[0].set(True)
    node_logp = jnp.where(jnp.arange(tree.size) == 0, 0.0, jnp.log(jnp.maximum(p_tok, 1e-30)))
    anc = jnp.asarray(tree.ancestors)  # padded with the node itself: count it once
    first = jnp.arange(anc.shape[1])[None] <= jnp.asarray(tree.depths)[:, None]
    path_prob = jnp.exp(jnp.sum(jnp.where(first, node_logp[anc], 0.0), axis=1))
    node = _deepest(tree, ok, path_prob)
    return node, sample_token(key, logits[node], sampling)


def _validate_chain(num_draft: int, name: str) -> Tree:
    if num_draft < 1:
        raise ValueError(f"{name} must be >= 1 draft tokens per step, got {num_draft}.")
    return chain_tree(num_draft)


def baseline_decoder() -> Decoder:
    """One token per forward pass: the incremental decoder every other one is checked against."""
    tree = chain_tree(0)

    def init(prompt, length, hidden, inputs, cache_len):
        return ()

    def propose(key, buf, length, aux, sampling):
        return jnp.zeros((0,), jnp.int32), None, aux

    def accept(key, logits, tokens, q, hidden, aux, sampling):
        return jnp.asarray(0), sample_token(key, logits[0], sampling), aux

    return Decoder("baseline", tree, init, propose, accept)


def speculative_decoder(
    draft_model: Any, draft_params: PyTree, num_draft: int, *, vocab_size: int | None = None
) -> Decoder:
    """Speculative decoding: the draft LM proposes ``num_draft`` tokens, the target verifies them
    in one forward pass (`accept_chain`).

    The draft keeps its own KV cache (the target's slots); each step re-feeds the last two
    decided tokens, so its cache is right whichever prefix of the draft was accepted.

    Args:
      draft_model: a model as `generate` needs (``init_cache``, ``step``, ``vocab_size``).
      draft_params: its parameters.
      num_draft: γ ≥ 1 draft tokens per target forward pass.
      vocab_size: the target's vocabulary; a draft with another one is refused.

    Returns:
      A `Decoder`.
    """
    tree = _validate_chain(num_draft, "num_draft")
    if vocab_size is not None and draft_model.vocab_size != vocab_size:
        raise ValueError(
            f"draft_model has vocab_size {draft_model.vocab_size} but the target has "
            f"{vocab_size}: speculative decoding needs one shared vocabulary."
        )

    def init(prompt, length, hidden, inputs, cache_len):
        cache = draft_model.init_cache(1, cache_len)
        _, cache = draft_model.step(draft_params, prompt[None], cache, 0)
        return cache

    def draw(k, lg, sampling):
        return sample_token(k, lg, sampling), filtered_probs(lg, sampling)

    def propose(key, buf, length, cache, sampling):
        s = jnp.maximum(length - 2, 0)
        two = lax.dynamic_slice(buf, (s,), (2,))
        logits, cache = draft_model.step(draft_params, two[None], cache, s)
        keys = jax.random.split(key, num_draft)
        d0, q0 = draw(keys[0], jnp.take(logits[0], length - 1 - s, axis=0), sampling)

        def body(carry, k):
            tok, pos, cache = carry
            lg, cache = draft_model.step(draft_params, tok[None, None], cache, pos)
            nt, q = draw(k, lg[0, 0], sampling)
            return (nt, pos + 1, cache), (nt, q)

        (_, _, cache), (ds, qs) = lax.scan(body, (d0, length, cache), keys[1:])
        return jnp.concatenate([d0[None], ds]), jnp.concatenate([q0[None], qs]), cache

    def accept(key, logits, tokens, q, hidden, cache, sampling):
        node, nxt = accept_chain(key, logits, tokens, q, sampling)
        return node, nxt, cache

    return Decoder(f"speculative{num_draft}", tree, init, propose, accept)


def aggressive_decoder(num_guess: int, *, match_len: int = 4) -> Decoder:
    """Input-guided aggressive decoding: the guess is the ``num_guess`` tokens of the guide text
    (``decoder_inputs`` of `generate`: a pair (guide (S,), guide length ())) that follow the
    last ``match_len`` decided tokens where they occur in the guide (the occurrence nearest
    to where the previous guess ended; none: continue from there). Verified as a chain with a
    one-hot draft (`accept_chain`): greedy output is unchanged, sampling exact.

    Args:
      num_guess: tokens copied per forward pass, ≥ 1.
      match_len: n-gram length that re-aligns the output with the guide after an edit, ≥ 1.

    Returns:
      A `Decoder`.

    References:
      Sun et al. (2021), "Instantaneous Grammatical Error Correction with Shallow Aggressive
      Decoding"; Ge et al. (2022), "Lossless Acceleration for Seq2seq Generation with
      Aggressive Decoding".
    """
    tree = _validate_chain(num_guess, "num_guess")
    if match_len < 1:
        raise ValueError(f"match_len must be >= 1, got {match_len}.")

    def init(prompt, length, hidden, inputs, cache_len):
        if inputs is None:
            raise ValueError("aggressive_decoder needs decoder_inputs=(guide, guide_lengths).")
        guide, guide_len = inputs
        pad = jnp.zeros((num_guess + match_len,), jnp.int32)
        return (
            jnp.concatenate([guide.astype(jnp.int32), pad]),
            guide_len,
            jnp.asarray(0),
            jnp.asarray(0),
        )

    def propose(key, buf, length, aux, sampling):
        guide, guide_len, hint, _ = aux
        size = guide.shape[0] - num_guess - match_len
        gram = lax.dynamic_slice(buf, (jnp.maximum(length - match_len, 0),), (match_len,))
        j = jnp.arange(size)
        windows = guide[j[:, None] + jnp.arange(match_len)[None]]
        hit = jnp.all(windows == gram[None], 1) & (j + match_len <= guide_len)
        hit = hit & (length >= match_len)
        after = j + match_len
        best = jnp.argmin(jnp.where(hit, jnp.abs(after - hint), jnp.iinfo(jnp.int32).max))
        start = jnp.where(jnp.any(hit), after[best], hint)
        guess = lax.dynamic_slice(guide, (start,), (num_guess,))
        return guess, None, (guide, guide_len, hint, start)

    def accept(key, logits, tokens, q, hidden, aux, sampling):
        guide, guide_len, _, start = aux
        q = jax.nn.one_hot(tokens[1:], logits.shape[-1], dtype=jnp.float32)  # a sure guess
        node, nxt = accept_chain(key, logits, tokens, q, sampling)
        return node, nxt, (guide, guide_len, start + node + 1, start)

    return Decoder(f"aggressive{num_guess}", tree, init, propose, accept)


def medusa_decoder(
    heads_fn: Callable[[PyTree, Array], Array],
    heads_params: PyTree,
    tree: Tree,
    *,
    num_heads: int,
    acceptance: str = "greedy",
    epsilon: float = 0.09,
    delta: float = 0.3,
) -> Decoder:
    """Medusa-1: heads on the frozen LM's last hidden state propose a tree of candidates.

    Head d (1-based) applied to the hidden state after the previous decided token predicts the
    token d positions past the root; node (c₁, …, c_d) of ``tree`` is head d's c_d-th most
    likely token. The tree is verified in one pass with its tree-attention mask.

    Args:
      heads_fn: (heads_params, hidden (d,)) -> logits (num_heads, V) (e.g. `MedusaHeads`).
      heads_params: their parameters.
      tree: the candidate `Tree` (`tree_from_accuracies`), depth ≤ ``num_heads``.
      num_heads: number of heads of ``heads_fn``.
      acceptance: "greedy" (exact argmax path; also what temperature 0 does), "typical"
        (deterministic threshold) or "typical_sampling" (its sampling form: exact sampling from
        the typical-truncated target), see `accept_typical`.
      epsilon, delta: the typical-acceptance ε and δ (Medusa's posterior threshold and α).

    Returns:
      A `Decoder`.
    """
    if tree.depth > num_heads:
        raise ValueError(
            f"tree has depth {tree.depth} but there are only num_heads={num_heads} heads: "
            "use a tree no deeper than the head count."
        )
    if tree.depth < 1:
        raise ValueError("tree must hold at least one candidate (depth >= 1).")
    if acceptance not in ("greedy", "typical", "typical_sampling"):
        raise ValueError(
            f"acceptance must be 'greedy', 'typical' or 'typical_sampling', got {acceptance!r}."
        )
    if not (epsilon > 0 and delta > 0):
        raise ValueError(f"epsilon and delta must be > 0, got {epsilon}, {delta}.")
    depths = jnp.asarray(tree.depths)
    choices = jnp.asarray(tree.choices)
    k = tree.top_k

    def init(prompt, length, hidden, inputs, cache_len):
        return hidden

    def propose(key, buf, length, hidden, sampling):
        logits = heads_fn(heads_params, hidden)  # (num_heads, V)
        top = lax.top_k(logits, k)[1]
        cands = top[jnp.maximum(depths - 1, 0), choices][1:]
        return cands.astype(jnp.int32), None, hidden

    def accept(key, logits, tokens, q, hidden_all, hidden, sampling):
        if acceptance == "greedy" or sampling.greedy:
            node, nxt = accept_greedy(tree, logits, tokens)
            if not sampling.greedy:  # greedy paths, the next token sampled
                nxt = sample_token(key, logits[node], sampling)
        else:
            node, nxt = accept_typical(
                key,
                tree,
                logits,
                tokens,
                sampling,
                epsilon=epsilon,
                delta=delta,
                sampled=acceptance == "typical_sampling",
            )
        return node, nxt, hidden_all[node]

    return Decoder(f"medusa_{acceptance}", tree, init, propose, accept)
