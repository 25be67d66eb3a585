"""Medusa-1 decoding heads: one residual block and one linear layer per head, own weights each.

Head d maps the frozen LM's final hidden state h_t to logits for the token at t + d + 1:

    head_d(h) = W_d · (h + SiLU(A_d h + b_d)),

A_d initialised to zero (the block starts as the identity) and W_d to the LM's ``lm_head``
(Medusa-1), so an untrained head predicts the next token. (Medusa's reference code repeats one
block object when a head has several blocks, sharing their weights; here every head and every
block has its own parameters.) Trained with the LM frozen on Σ_d λ_d CE(head_d(h_t), x_{t+d+1}).

References:
  Cai et al. (2024), "Medusa: Simple LLM Inference Acceleration Framework with Multiple
  Decoding Heads", arXiv:2401.10774.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from feynkit.core.types import Array, Float, Int, PyTree

__all__ = ["MedusaHeads", "medusa_loss", "medusa_topk_accuracy"]


class MedusaHeads(nn.Module):
    """``num_heads`` Medusa heads: hidden (..., d) -> logits (..., num_heads, vocab_size).

    Attributes:
      num_heads: heads (head d predicts the token d + 1 ahead).
      vocab_size: the LM's vocabulary.
      num_blocks: residual blocks per head (each its own weights).
    """

    num_heads: int
    vocab_size: int
    num_blocks: int = 1

    @nn.compact
    def __call__(self, hidden: Float[Array, "... d"]) -> Float[Array, "... heads vocab"]:
        d = hidden.shape[-1]
        outs = []
        for i in range(self.num_heads):
            x = hidden
            for j in range(self.num_blocks):
                block = nn.Dense(d, kernel_init=nn.initializers.zeros, name=f"head_{i}_block_{j}")
                x = x + nn.silu(block(x))
            outs.append(nn.Dense(self.vocab_size, use_bias=False, name=f"head_{i}_out")(x))
        return jnp.stack(outs, axis=-2).astype(jnp.float32)

    @nn.nowrap
    def init_from_lm(self, key: jax.Array, lm_head_kernel: Float[Array, "d vocab"]) -> PyTree:
        """Parameters with every head's output layer a copy of the LM head (Medusa-1)."""
        params = self.init(key, jnp.zeros((1, lm_head_kernel.shape[0])))["params"]
        params = dict(params)
        for i in range(self.num_heads):
            params[f"head_{i}_out"] = {"kernel": jnp.asarray(lm_head_kernel)}
        return params

    @nn.nowrap
    def logits(self, params: PyTree, hidden: Float[Array, "... d"]) -> Array:
        return self.apply({"params": params}, hidden)


def medusa_loss(
    heads: MedusaHeads,
    params: PyTree,
    hidden: Float[Array, "b t d"],
    tokens: Int[Array, "b t"],
    decay: float = 0.8,
) -> Array:
    """Σ_d decay^d · mean CE(head_d(h_t), x_{t+d+1}) over the positions that have a target."""
    logits = heads.logits(params, hidden)  # (b, t, H, V)
    total = jnp.asarray(0.0)
    for i in range(heads.num_heads):
        shift = i + 2
        lg = logits[:, : tokens.shape[1] - shift, i]
        tgt = tokens[:, shift:]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(lg, -1), tgt[..., None], -1)
        total = total + decay**i * nll.mean()
    return total


def medusa_topk_accuracy(
    heads: MedusaHeads, params: PyTree, hidden: Array, tokens: Array, top_k: int
) -> Array:
    """(num_heads, top_k): the fraction of positions where head d's c-th most likely token is
    the right one (the input of `tree_from_accuracies`)."""
    logits = heads.logits(params, hidden)
    rows = []
    for i in range(heads.num_heads):
        shift = i + 2
        top = jax.lax.top_k(logits[:, : tokens.shape[1] - shift, i], top_k)[1]
        hit = top == tokens[:, shift:, None]
        rows.append(hit.reshape(-1, top_k).mean(0))
    return jnp.stack(rows)
