"""A decoder-only transformer LM in the Llama layout, with a KV cache for incremental decoding.

Per layer (pre-norm residual):

    h   = x + o_proj(Attn(RoPE(q_proj(n₁)), RoPE(k_proj(n₁)), v_proj(n₁))),  n₁ = RMSNorm(x)
    out = h + down_proj(silu(gate_proj(n₂)) ⊙ up_proj(n₂)),                   n₂ = RMSNorm(h)

RMSNorm(x) = w ⊙ x / sqrt(mean(x²) + ε), computed in float32 as in Hugging Face. Attention is
causal softmax(q kᵀ / sqrt(d_head)) v with grouped-query heads (query head h reads key/value head
h // (num_heads / num_kv_heads), Hugging Face's ``repeat_kv``).

Rotary positions follow Hugging Face Llama exactly (real checkpoints depend on it): with
θ_j = base^(−2j/d) for j < d/2, cos = [cos(p θ), cos(p θ)], sin = [sin(p θ), sin(p θ)] (the d/2
angles repeated, not interleaved) and

    RoPE(x) = x ⊙ cos + rotate_half(x) ⊙ sin,   rotate_half([x₁, x₂]) = [−x₂, x₁],

x₁, x₂ the first and second halves of the head dimension. (Meta's original checkpoints rotate
interleaved pairs (x_{2j}, x_{2j+1}); HF's conversion permutes the q/k rows to the half-split
form used here.)

Parameter names map 1:1 onto Hugging Face (see `feynkit.models.safetensors_io`): ``embed_tokens``,
``layers_{i}/{input_layernorm, self_attn/{q,k,v,o}_proj, post_attention_layernorm,
mlp/{gate,up,down}_proj}``, ``norm``, ``lm_head``; flax kernels are (in, out), HF weights (out, in).

The KV cache is an explicit pytree (`KVCache`), so decoding is a pure function
``step(params, tokens, cache, position) -> (logits, cache)`` with the position traced (one
compilation for every position).

References:
  Touvron et al. (2023), "LLaMA: Open and Efficient Foundation Language Models";
  Su et al. (2021), "RoFormer: Enhanced Transformer with Rotary Position Embedding";
  Zhang & Sennrich (2019), "Root Mean Square Layer Normalization";
  Shazeer (2020), "GLU Variants Improve Transformer" (SwiGLU);
  Ainslie et al. (2023), "GQA: Training Generalized Multi-Query Transformer Models".
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from feynkit.core.types import Array, ArrayLike, Float, Int, Key, PyTree

__all__ = ["KVCache", "RMSNorm", "TransformerLM", "apply_rope", "rope_cos_sin", "rotate_half"]


class KVCache(NamedTuple):
    """Keys and values of every layer, written in place at the decoding position.

    Attributes:
      k, v: shape (num_layers, batch, max_len, num_kv_heads, head_dim), keys after RoPE.
    """

    k: Array
    v: Array


def rotate_half(x: Float[Array, "... d"]) -> Float[Array, "... d"]:
    """[x₁, x₂] ↦ [−x₂, x₁] on the two halves of the last axis (Hugging Face Llama)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def rope_cos_sin(
    positions: Int[ArrayLike, " t"], head_dim: int, base: float = 10_000.0
) -> tuple[Float[Array, "t d"], Float[Array, "t d"]]:
    """cos(p θ) and sin(p θ), θ_j = base^(−2j/d), the d/2 angles repeated to width d (float32)."""
    inv_freq = 1.0 / base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = jnp.asarray(positions, jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(
    x: Float[Array, "b t h d"], cos: Float[Array, "t d"], sin: Float[Array, "t d"]
) -> Float[Array, "b t h d"]:
    """RoPE(x) = x ⊙ cos + rotate_half(x) ⊙ sin, broadcast over batch and heads."""
    cos = cos.astype(x.dtype)[None, :, None, :]
    sin = sin.astype(x.dtype)[None, :, None, :]
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    """w ⊙ x / sqrt(mean(x²) + ε), normalised in float32, scale ``w`` initialised to ones."""

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype).reshape((1,) * (x.ndim - 1) + (-1,)) * normed.astype(
            self.dtype
        )


def _attention(
    q: Array,
    k: Array,
    v: Array,
    q_pos: Array,
    k_pos: Array,
    num_kv_heads: int,
    mask: Array | None = None,
) -> Array:
    """Grouped-query softmax attention; q (b,t,h,d), k/v (b,s,kv,d) -> (b,t,h·d).

    Causal (key position ≤ query position) unless ``mask`` (t, s), True where query i reads key
    j, is given (a tree of draft tokens, see `TransformerLM.__call__`)."""
    b, t, h, d = q.shape
    q = q.reshape(b, t, num_kv_heads, h // num_kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / math.sqrt(d)
    if mask is None:
        mask = k_pos[None, :] <= q_pos[:, None]
    mask = mask[None, None, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h * d)


def _width(module: nn.Module, child: str, default: int) -> int:
    """Output width of the existing kernel ``child/kernel`` (a pruned model's), else `default`."""
    kernel = module.variables.get("params", {}).get(child, {}).get("kernel")
    return default if kernel is None else int(kernel.shape[-1])


def _has_bias(module: nn.Module, child: str) -> bool:
    """Whether the parameters hold ``child/bias`` (FLAP's compensation bias); False at init."""
    return "bias" in module.variables.get("params", {}).get(child, {})


class _SelfAttention(nn.Module):
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, cos, sin, q_pos, layer_cache, position, mask=None):
        b, t, d_model = x.shape
        h, kv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        # A structurally pruned model (FLAP) keeps fewer heads per layer, and may carry an
        # o_proj bias: both are read off the parameters when they exist (not at init).
        h = _width(self, "q_proj", h * hd) // hd
        kv = _width(self, "k_proj", kv * hd) // hd
        dense = functools.partial(
            nn.Dense, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype
        )
        q = apply_rope(dense(h * hd, name="q_proj")(x).reshape(b, t, h, hd), cos, sin)
        k = apply_rope(dense(kv * hd, name="k_proj")(x).reshape(b, t, kv, hd), cos, sin)
        v = dense(kv * hd, name="v_proj")(x).reshape(b, t, kv, hd)
        if layer_cache is None:
            keys, values, k_pos, new_cache = k, v, q_pos, None
        else:
            k_cache, v_cache = layer_cache
            start = (0, position, 0, 0)
            keys = lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
            values = lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
            k_pos = jnp.arange(k_cache.shape[1])
            new_cache = (keys, values)
        out = _attention(q, keys.astype(q.dtype), values.astype(q.dtype), q_pos, k_pos, kv, mask)
        o_proj = dense(d_model, name="o_proj", use_bias=_has_bias(self, "o_proj"))
        return o_proj(out), new_cache


class _SwiGLU(nn.Module):
    mlp_dim: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        dense = functools.partial(
            nn.Dense, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype
        )
        mlp_dim = _width(self, "gate_proj", self.mlp_dim)  # fewer channels once pruned
        gate = dense(mlp_dim, name="gate_proj")(x)
        up = dense(mlp_dim, name="up_proj")(x)
        down = dense(x.shape[-1], name="down_proj", use_bias=_has_bias(self, "down_proj"))
        return down(nn.silu(gate) * up)


class _Block(nn.Module):
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, cos, sin, q_pos, layer_cache, position, mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = _SelfAttention(
            self.num_heads, self.num_kv_heads, self.head_dim, name="self_attn", **kw
        )
        n1 = RMSNorm(self.eps, name="input_layernorm", **kw)(x)
        a, new_cache = attn(n1, cos, sin, q_pos, layer_cache, position, mask)
        h = x + a
        n2 = RMSNorm(self.eps, name="post_attention_layernorm", **kw)(h)
        return h + _SwiGLU(self.mlp_dim, name="mlp", **kw)(n2), new_cache


class TransformerLM(nn.Module):
    """Decoder-only Llama-style LM: tokens (B, T) -> logits (B, T, vocab_size) in float32.

    Attributes:
      vocab_size: number of tokens.
      d_model: residual width (HF ``hidden_size``).
      num_layers: number of blocks (HF ``num_hidden_layers``).
      num_heads: query heads; head_dim = d_model // num_heads.
      num_kv_heads: key/value heads (grouped-query attention), None for num_heads.
      mlp_dim: SwiGLU hidden width (HF ``intermediate_size``).
      max_len: longest sequence (the default cache length).
      rope_base: RoPE base θ (HF ``rope_theta``).
      norm_eps: RMSNorm ε (HF ``rms_norm_eps``).
      dtype, param_dtype: computation and parameter dtypes.

    Use ``init_params(key)``, ``forward(params, tokens) -> logits``,
    ``init_cache(batch, max_len=None)`` and ``step(params, tokens, cache, position)``.
    """

    vocab_size: int
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    mlp_dim: int = 172
    max_len: int = 128
    rope_base: float = 10_000.0
    norm_eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @nn.compact
    def __call__(
        self,
        tokens: Int[ArrayLike, "b t"],
        cache: KVCache | None = None,
        position: Int[ArrayLike, ""] | int = 0,
        positions: Int[ArrayLike, " t"] | None = None,
        chunk_mask: Array | None = None,
        return_hidden: bool = False,
    ) -> tuple[Float[Array, "b t vocab"], KVCache | None]:
        if self.d_model % self.num_heads or self.head_dim % 2:
            raise ValueError("d_model must split into num_heads heads of even width.")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of {self.kv_heads}.")
        tokens = jnp.asarray(tokens)
        t = tokens.shape[1]
        length = self.max_len if cache is None else cache.k.shape[2]
        if t > length or (isinstance(position, int) and position + t > length):
            raise ValueError(f"positions up to {position} + {t} exceed the length {length}.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embed = nn.Embed(
            self.vocab_size,
            self.d_model,
            embedding_init=nn.initializers.normal(0.02),
            name="embed_tokens",
            **kw,
        )
        x = embed(tokens)
        q_pos = jnp.asarray(position, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
        mask = None
        if positions is not None or chunk_mask is not None:
            # a chunk of (tree) tokens in slots position, …, position + t − 1: each reads every
            # earlier slot and the chunk slots chunk_mask allows (causal by default), rotated
            # by its own RoPE position (default: its slot)
            chunk = jnp.tril(jnp.ones((t, t), bool)) if chunk_mask is None else chunk_mask
            if jnp.shape(chunk) != (t, t):
                raise ValueError(f"chunk_mask must have shape ({t}, {t}), got {jnp.shape(chunk)}.")
            k_slot = jnp.arange(length, dtype=jnp.int32) if cache is not None else q_pos
            rel = k_slot - jnp.asarray(position, jnp.int32)
            inside = (rel >= 0) & (rel < t)
            mask = (rel < 0)[None, :] | (
                inside[None, :] & jnp.take(jnp.asarray(chunk, bool), jnp.clip(rel, 0, t - 1), 1)
            )
            if positions is not None:
                q_pos = jnp.asarray(positions, jnp.int32).reshape(t)
        cos, sin = rope_cos_sin(q_pos, self.head_dim, self.rope_base)
        ks, vs = [], []
        for i in range(self.num_layers):
            block = _Block(
                self.num_heads,
                self.kv_heads,
                self.head_dim,
                self.mlp_dim,
                self.norm_eps,
                name=f"layers_{i}",
                **kw,
            )
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            x, new = block(x, cos, sin, q_pos, layer_cache, position, mask)
            if new is not None:
                ks.append(new[0])
                vs.append(new[1])
        x = RMSNorm(self.norm_eps, name="norm", **kw)(x)
        logits = nn.Dense(self.vocab_size, use_bias=False, name="lm_head", **kw)(x)
        new_cache = None if cache is None else KVCache(jnp.stack(ks), jnp.stack(vs))
        if return_hidden:  # the final-norm hidden states the LM head reads (Medusa heads)
            return logits.astype(jnp.float32), new_cache, x
        return logits.astype(jnp.float32), new_cache

    @nn.nowrap
    def init_params(self, key: Key) -> PyTree:
        """Parameters (Flax default initialisers; embeddings N(0, 0.02²))."""
        return self.init(key, jnp.zeros((1, 1), jnp.int32))["params"]

    @nn.nowrap
    def forward(self, params: PyTree, tokens: Int[ArrayLike, "b t"]) -> Float[Array, "b t vocab"]:
        """Causal logits for the full sequence, positions 0, …, T − 1."""
        return self.apply({"params": params}, tokens)[0]

    @nn.nowrap
    def init_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty (zero) cache of ``max_len`` (default ``self.max_len``) positions."""
        length = self.max_len if max_len is None else max_len
        shape = (self.num_layers, batch, length, self.kv_heads, self.head_dim)
        return KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))

    @nn.nowrap
    def step(
        self,
        params: PyTree,
        tokens: Int[ArrayLike, "b t"],
        cache: KVCache,
        position: Int[ArrayLike, ""] | int,
        positions: Int[ArrayLike, " t"] | None = None,
        chunk_mask: Array | None = None,
        return_hidden: bool = False,
    ) -> tuple[Float[Array, "b t vocab"], KVCache]:
        """Logits for a chunk at positions position, …, position + T − 1, and the updated cache.

        The chunk's keys and values are written into ``cache`` at ``position``; attention reads
        every cached position ≤ the query's. Positions past the cache length are not checked
        when ``position`` is traced (``lax.dynamic_update_slice`` would clamp them).

        A tree of candidate tokens (Medusa, speculative trees) is verified in one call with
        ``chunk_mask`` (t, t), True where chunk token i reads chunk token j (its ancestors and
        itself; every slot before ``position`` is read), and ``positions`` (t,), the RoPE
        positions (the depth in the tree past ``position``; default the slots). With
        ``return_hidden`` the final-norm hidden states (b, t, d_model) come third.
        """
        return self.apply(
            {"params": params},
            tokens,
            cache,
            position,
            positions=positions,
            chunk_mask=chunk_mask,
            return_hidden=return_hidden,
        )
