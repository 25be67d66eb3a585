"""Tests for models/transformer.py: names, shapes, causality, KV cache, float64 NumPy reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from feynkit.models import KVCache, TransformerLM, apply_rope, rope_cos_sin, rotate_half

VOCAB, D, LAYERS, HEADS, KV_HEADS, MLP, MAX_LEN = 13, 16, 2, 4, 2, 24, 12
MODEL = TransformerLM(
    vocab_size=VOCAB,
    d_model=D,
    num_layers=LAYERS,
    num_heads=HEADS,
    num_kv_heads=KV_HEADS,
    mlp_dim=MLP,
    max_len=MAX_LEN,
    rope_base=500.0,
    norm_eps=1e-5,
)


def _random_params(model, seed):
    """Small random params (norm scales near 1) filled with NumPy, without compiling init."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init_params, jax.random.key(0))

    def fill(path, s):
        if path[-1].key == "scale":
            return jnp.asarray(1.0 + 0.2 * rng.standard_normal(s.shape), s.dtype)
        return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(s.shape[0]), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def params():
    return _random_params(MODEL, 0)


@pytest.fixture(scope="module")
def forward():
    return jax.jit(MODEL.forward)


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, 10)), jnp.int32)


def _reference_lm(p, tokens, num_heads, num_kv_heads, base, eps):
    """Float64 NumPy Llama forward on one sequence: the RoPE rotation written on half pairs."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)

    def rms(x, w):
        return w * x / np.sqrt((x**2).mean(-1, keepdims=True) + eps)

    def rope(x):  # x (T, H, hd): rotate each pair (x_j, x_{j+hd/2}) by the angle pos·θ_j
        hd = x.shape[-1]
        theta = base ** (-np.arange(hd // 2) * 2.0 / hd)
        ang = np.arange(x.shape[0])[:, None, None] * theta[None, None, :]
        a, b = x[..., : hd // 2], x[..., hd // 2 :]
        c, s = np.cos(ang), np.sin(ang)
        return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)

    x = p["embed_tokens"]["embedding"][np.asarray(tokens)]
    t, d = x.shape
    hd = d // num_heads
    causal = np.tril(np.ones((t, t), bool))
    i = 0
    while f"layers_{i}" in p:
        lp = p[f"layers_{i}"]
        at = lp["self_attn"]
        n = rms(x, lp["input_layernorm"]["scale"])
        q = rope((n @ at["q_proj"]["kernel"]).reshape(t, num_heads, hd))
        k = rope((n @ at["k_proj"]["kernel"]).reshape(t, num_kv_heads, hd))
        v = (n @ at["v_proj"]["kernel"]).reshape(t, num_kv_heads, hd)
        heads = []
        for h in range(num_heads):
            g = h // (num_heads // num_kv_heads)
            s = q[:, h] @ k[:, g].T / np.sqrt(hd)
            s = np.where(causal, s, -np.inf)
            w = np.exp(s - s.max(-1, keepdims=True))
            heads.append((w / w.sum(-1, keepdims=True)) @ v[:, g])
        x = x + np.concatenate(heads, -1) @ at["o_proj"]["kernel"]
        m = lp["mlp"]
        n = rms(x, lp["post_attention_layernorm"]["scale"])
        gate, up = n @ m["gate_proj"]["kernel"], n @ m["up_proj"]["kernel"]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ m["down_proj"]["kernel"]
        i += 1
    return rms(x, p["norm"]["scale"]) @ p["lm_head"]["kernel"]


def test_param_names_and_shapes_are_llama_like():
    shapes = jax.eval_shape(MODEL.init_params, jax.random.key(0))
    hd = D // HEADS
    expected = {
        ("embed_tokens", "embedding"): (VOCAB, D),
        ("norm", "scale"): (D,),
        ("lm_head", "kernel"): (D, VOCAB),
    }
    for i in range(LAYERS):
        layer = {
            ("input_layernorm", "scale"): (D,),
            ("post_attention_layernorm", "scale"): (D,),
            ("self_attn", "q_proj", "kernel"): (D, HEADS * hd),
            ("self_attn", "k_proj", "kernel"): (D, KV_HEADS * hd),
            ("self_attn", "v_proj", "kernel"): (D, KV_HEADS * hd),
            ("self_attn", "o_proj", "kernel"): (HEADS * hd, D),
            ("mlp", "gate_proj", "kernel"): (D, MLP),
            ("mlp", "up_proj", "kernel"): (D, MLP),
            ("mlp", "down_proj", "kernel"): (MLP, D),
        }
        expected.update({(f"layers_{i}", *k): v for k, v in layer.items()})
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    got = {tuple(p.key for p in path): s.shape for path, s in flat}
    assert got == expected
    assert all(s.dtype == jnp.float32 for _, s in flat)


def test_dtypes_under_bf16():
    model = TransformerLM(
        vocab_size=VOCAB,
        d_model=D,
        num_layers=1,
        num_heads=HEADS,
        mlp_dim=MLP,
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
    )
    shapes = jax.eval_shape(model.init_params, jax.random.key(0))
    assert all(s.dtype == jnp.bfloat16 for s in jax.tree.leaves(shapes))
    tok = jax.ShapeDtypeStruct((2, 5), jnp.int32)
    assert jax.eval_shape(model.forward, shapes, tok).dtype == jnp.float32
    cache = model.init_cache(2, 8)
    assert cache.k.shape == (1, 2, 8, HEADS, D // HEADS) and cache.k.dtype == jnp.bfloat16
    logits, new = jax.eval_shape(model.step, shapes, tok, cache, 0)
    assert logits.shape == (2, 5, VOCAB) and new.v.dtype == jnp.bfloat16


def test_rope_convention():
    np.testing.assert_array_equal(rotate_half(jnp.arange(1.0, 5.0)), [-3.0, -4.0, 1.0, 2.0])

    @jax.jit
    def rotate(q, k):
        cos, sin = rope_cos_sin(jnp.arange(6), 8, 10_000.0)
        # q and k constant over positions: <RoPE(q, m), RoPE(k, n)> must depend on m − n only.
        return cos, apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    q = jnp.broadcast_to(jax.random.normal(jax.random.key(0), (1, 1, 1, 8)), (1, 6, 1, 8))
    k = jnp.broadcast_to(jax.random.normal(jax.random.key(1), (1, 1, 1, 8)), (1, 6, 1, 8))
    cos, rq, rk = (np.asarray(a) for a in rotate(q, k))
    np.testing.assert_allclose(cos[:, :4], cos[:, 4:])  # halves repeated, not interleaved
    np.testing.assert_allclose(rq[:, 0], q[:, 0], rtol=1e-6)  # position 0: identity
    np.testing.assert_allclose(np.linalg.norm(rq, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5)
    np.testing.assert_allclose((rq[0, 3] * rk[0, 1]).sum(), (rq[0, 5] * rk[0, 3]).sum(), rtol=1e-5)


def test_forward_matches_float64_numpy_reference(params, forward, tokens):
    logits = forward(params, tokens)
    assert logits.shape == (2, 10, VOCAB) and logits.dtype == jnp.float32
    for b in range(2):
        ref = _reference_lm(params, tokens[b], HEADS, KV_HEADS, 500.0, 1e-5)
        np.testing.assert_allclose(logits[b], ref, rtol=1e-4, atol=1e-4)


def test_causal(params, forward, tokens):
    changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % VOCAB)
    a, b = forward(params, tokens), forward(params, changed)
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert not np.allclose(a[:, 6:], b[:, 6:])


@jax.jit
@chex.assert_max_traces(n=1)
def lm_step(params, chunk, cache, position):
    return MODEL.step(params, chunk, cache, position)


@jax.jit
def lm_decode_all(params, tokens):
    """Token-by-token decoding from an empty cache in a lax.scan (the cache is the carry)."""

    def body(cache, pos):
        tok = lax.dynamic_slice_in_dim(tokens, pos, 1, axis=1)
        logits, cache = MODEL.step(params, tok, cache, pos)
        return cache, logits[:, 0]

    cache, logits = lax.scan(body, MODEL.init_cache(tokens.shape[0]), jnp.arange(tokens.shape[1]))
    return jnp.swapaxes(logits, 0, 1), cache


def test_kv_cache_decoding_matches_full_forward(params, forward, tokens):
    full = forward(params, tokens)
    cache = MODEL.init_cache(2)
    assert isinstance(cache, KVCache)
    assert cache.k.shape == cache.v.shape == (LAYERS, 2, MAX_LEN, KV_HEADS, D // HEADS)

    stepped, cache = lm_decode_all(params, tokens)
    np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache.k[:, :, 10:], 0.0)  # later slots untouched

    # Two chunks of 5 (prefill, then continuation): one compilation, the position is traced.
    first, cache = lm_step(params, tokens[:, :5], MODEL.init_cache(2), jnp.int32(0))
    second, cache = lm_step(params, tokens[:, 5:], cache, jnp.int32(5))
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), full, rtol=1e-5, atol=1e-5)


def test_length_checks():
    shapes = jax.eval_shape(MODEL.init_params, jax.random.key(0))
    with pytest.raises(ValueError, match="exceed"):
        jax.eval_shape(MODEL.forward, shapes, jax.ShapeDtypeStruct((1, MAX_LEN + 1), jnp.int32))
    with pytest.raises(ValueError, match="exceed"):
        MODEL.step(shapes, jnp.zeros((1, 3), jnp.int32), MODEL.init_cache(1, 4), 2)
