"""Tests for models/safetensors_io.py: the file format, HF Llama names, exact round trips."""

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.models import (
    TransformerLM,
    hf_to_lm_params,
    lm_from_hf_config,
    lm_params_to_hf,
    load_lm_safetensors,
    load_safetensors,
    load_safetensors_metadata,
    save_lm_safetensors,
    save_safetensors,
)

MODEL = TransformerLM(
    vocab_size=11, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=24, max_len=8
)


def _random_params(model, seed):
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init_params, jax.random.key(0))
    return jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(s.shape[0]), s.dtype), shapes
    )


def test_generic_round_trip_and_format(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.f32": rng.standard_normal((3, 4)).astype(np.float32),
        "b.bf16": jnp.asarray(rng.standard_normal((5,)), jnp.bfloat16),
        "c.f16": rng.standard_normal((2, 1, 3)).astype(np.float16),
        "d.i32": rng.integers(-100, 100, (7,)).astype(np.int32),
        "e.bool": rng.random(4) > 0.5,
        "f.scalar": np.float64(3.25),
        "g.empty": np.zeros((0, 3), np.float32),
        "h.u8": np.arange(5, dtype=np.uint8),
    }
    path = tmp_path / "t.safetensors"
    save_safetensors(path, tensors, {"note": "hi"})
    loaded = load_safetensors(path)
    assert set(loaded) == set(tensors)
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        assert loaded[name].dtype == arr.dtype and loaded[name].shape == arr.shape, name
        assert loaded[name].tobytes() == arr.tobytes(), name
    assert load_safetensors_metadata(path) == {"note": "hi"}

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert n % 8 == 0 and header["__metadata__"] == {"note": "hi"}
    assert header["b.bf16"]["dtype"] == "BF16" and header["a.f32"]["shape"] == [3, 4]
    spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))  # contiguous
    begin, end = header["a.f32"]["data_offsets"]
    np.testing.assert_array_equal(
        np.frombuffer(raw[8 + n + begin : 8 + n + end], "<f4").reshape(3, 4), tensors["a.f32"]
    )


def test_lm_names_shapes_and_transposes():
    params = _random_params(MODEL, 0)
    hf = lm_params_to_hf(params)
    expected = {
        "model.embed_tokens.weight": (11, 16),
        "model.norm.weight": (16,),
        "lm_head.weight": (11, 16),
    }
    for i in range(2):
        pre = f"model.layers.{i}."
        expected |= {
            pre + "input_layernorm.weight": (16,),
            pre + "post_attention_layernorm.weight": (16,),
            pre + "self_attn.q_proj.weight": (16, 16),
            pre + "self_attn.k_proj.weight": (8, 16),
            pre + "self_attn.v_proj.weight": (8, 16),
            pre + "self_attn.o_proj.weight": (16, 16),
            pre + "mlp.gate_proj.weight": (24, 16),
            pre + "mlp.up_proj.weight": (24, 16),
            pre + "mlp.down_proj.weight": (16, 24),
        }
    assert {k: v.shape for k, v in hf.items()} == expected
    # HF Linear: y = x Wᵀ with W (out, in); flax Dense: y = x K with K (in, out).
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    kernel = np.asarray(params["layers_1"]["self_attn"]["k_proj"]["kernel"])
    np.testing.assert_allclose(x @ hf["model.layers.1.self_attn.k_proj.weight"].T, x @ kernel)
    back = hf_to_lm_params(hf)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_lm_file_round_trip_is_exact_and_forward_agrees(tmp_path):
    params = _random_params(MODEL, 2)
    path = tmp_path / "model.safetensors"
    save_lm_safetensors(path, params)
    assert load_safetensors_metadata(path)["format"] == "pt"
    loaded = load_lm_safetensors(path, MODEL)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 11, (2, 6)), jnp.int32)
    forward = jax.jit(MODEL.forward)
    np.testing.assert_array_equal(forward(loaded, tokens), forward(params, tokens))


def test_tied_embeddings_and_bad_checkpoints(tmp_path):
    hf = lm_params_to_hf(_random_params(MODEL, 4))
    tied = {k: v for k, v in hf.items() if k != "lm_head.weight"}
    params = hf_to_lm_params(tied)
    np.testing.assert_array_equal(params["lm_head"]["kernel"], hf["model.embed_tokens.weight"].T)
    with pytest.raises(ValueError, match="unexpected"):
        hf_to_lm_params({**hf, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(2)})
    path = tmp_path / "bad.safetensors"
    bad = dict(hf)
    bad["model.layers.0.mlp.up_proj.weight"] = np.zeros((25, 16), np.float32)
    save_safetensors(path, bad)
    with pytest.raises(ValueError, match="shape"):
        load_lm_safetensors(path, MODEL)
    save_safetensors(path, {k: v for k, v in hf.items() if "layers.1." not in k})
    with pytest.raises(ValueError, match=r"does not match the model: lacks 9 tensor\(s\).*model.layers.1.input_layernorm.weight"):
        load_lm_safetensors(path, MODEL)


def test_lm_from_hf_config():
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 500000.0,
        "hidden_act": "silu",
        "rope_scaling": None,
    }
    model = lm_from_hf_config(config)
    assert (model.d_model, model.num_layers, model.num_heads, model.kv_heads) == (64, 3, 8, 2)
    assert (model.mlp_dim, model.vocab_size, model.max_len) == (172, 100, 256)
    assert model.rope_base == 500000.0 and model.norm_eps == 1e-6
    assert lm_from_hf_config(config, max_len=32).max_len == 32
    with pytest.raises(ValueError, match="rope_scaling"):
        lm_from_hf_config({**config, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


def test_files_interoperate_with_the_reference_safetensors_package(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(5)
    tensors = {"w": rng.standard_normal((4, 3)).astype(np.float32), "i": np.arange(3)}
    save_safetensors(tmp_path / "ours.safetensors", tensors, {"format": "np"})
    theirs = st_numpy.load_file(tmp_path / "ours.safetensors")
    st_numpy.save_file(tensors, tmp_path / "theirs.safetensors")
    ours = load_safetensors(tmp_path / "theirs.safetensors")
    for name, arr in tensors.items():
        np.testing.assert_array_equal(theirs[name], arr)
        np.testing.assert_array_equal(ours[name], arr)
