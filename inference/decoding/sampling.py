"""Next-token distributions of a decoder: greedy, temperature, top-k, top-p (nucleus).

Every decoder of `feynkit.inference.decoding` draws from the same filtered distribution

    p_T,k,p(x) ∝ exp(ℓ_x / T) on the k most likely tokens ∩ the smallest set of mass ≥ p

so that an accelerated sampler (speculative, aggressive decoding) preserves exactly what the
baseline samples. ``temperature = 0`` is greedy decoding (argmax; ties to the lowest id).

References:
  Fan et al. (2018), "Hierarchical Neural Story Generation" (top-k);
  Holtzman et al. (2020), "The Curious Case of Neural Text Degeneration" (top-p).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from feynkit.core.types import Array, Float, Int, Key

__all__ = ["SamplingConfig", "filtered_log_probs", "filtered_probs", "sample_token"]


class SamplingConfig(NamedTuple):
    """How the next token is drawn from the logits (static: part of the compiled loop).

    Attributes:
      temperature: T ≥ 0; 0 is greedy decoding.
      top_k: keep the k most likely tokens (None: all).
      top_p: keep the smallest set of tokens of probability ≥ top_p (None or 1: all).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> SamplingConfig:
        """Self, or ValueError naming the bad field."""
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}.")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}.")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1] or be None, got {self.top_p}.")
        return self


def filtered_log_probs(logits: Float[Array, "... v"], cfg: SamplingConfig) -> Float[Array, "... v"]:
    """log p_T,k,p over the last axis (−inf outside the kept set); greedy: log one-hot argmax."""
    logits = jnp.asarray(logits, jnp.float32)
    neg = jnp.asarray(-jnp.inf, jnp.float32)
    if cfg.greedy:
        hot = jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=bool)
        return jnp.where(hot, 0.0, neg)
    z = logits / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(z, cfg.top_k)[0][..., -1:]
        z = jnp.where(z >= kth, z, neg)
    if cfg.top_p is not None and cfg.top_p < 1.0:
        order = jnp.argsort(-z, axis=-1)
        sorted_p = jax.nn.softmax(jnp.take_along_axis(z, order, -1), -1)
        before = jnp.cumsum(sorted_p, -1) - sorted_p  # mass strictly before each token
        keep_sorted = before < cfg.top_p  # the first token is always kept
        keep = jnp.zeros_like(keep_sorted)
        keep = jnp.put_along_axis(keep, order, keep_sorted, -1, inplace=False)
        z = jnp.where(keep, z, neg)
    return jax.nn.log_softmax(z, -1)


def filtered_probs(logits: Float[Array, "... v"], cfg: SamplingConfig) -> Float[Array, "... v"]:
    """p_T,k,p over the last axis (see `filtered_log_probs`)."""
    return jnp.exp(filtered_log_probs(logits, cfg))


def sample_token(key: Key, logits: Float[Array, "... v"], cfg: SamplingConfig) -> Int[Array, "..."]:
    """A draw from p_T,k,p (argmax when greedy)."""
    if cfg.greedy:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_log_probs(logits, cfg), -1).astype(jnp.int32)
