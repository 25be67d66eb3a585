"""Save and load `TransformerLM` parameters as safetensors files with Hugging Face Llama names.

Files are read and written by the `safetensors` package (its numpy API: ``safetensors.numpy``
``save_file``/``load_file`` and ``safe_open`` for the metadata), whose Rust parser validates the
header: overlapping or out-of-range ``data_offsets``, trailing bytes, non-string metadata and an
absurd header length are refused there and reported here as a ValueError naming the file.
The format (https://github.com/huggingface/safetensors, README "Format"):

    [8 bytes: N, little-endian u64] [N bytes: JSON header] [raw little-endian tensor bytes]

with header ``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}``.

Names (flax path → Hugging Face):

    embed_tokens/embedding                       → model.embed_tokens.weight          (V, D)
    layers_{i}/input_layernorm/scale             → model.layers.{i}.input_layernorm.weight
    layers_{i}/self_attn/{q,k,v,o}_proj/kernel   → model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    layers_{i}/post_attention_layernorm/scale    → model.layers.{i}.post_attention_layernorm.weight
    layers_{i}/mlp/{gate,up,down}_proj/kernel    → model.layers.{i}.mlp.{gate,up,down}_proj.weight
    norm/scale                                   → model.norm.weight
    lm_head/kernel                               → lm_head.weight

HF Linear weights are (out, in), the transpose of flax kernels (in, out); the conversion transposes.
A checkpoint without ``lm_head.weight`` (tied embeddings) gets the embedding's transpose.
Loaded against a model, a missing or extra tensor is named (by its HF name) in the error, and
every shape is checked.

References:
  Hugging Face safetensors format, https://github.com/huggingface/safetensors (README, "Format");
  Hugging Face transformers ``modeling_llama.py`` (parameter names).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy as st_numpy

from feynkit.core.types import PyTree
from feynkit.models.transformer import TransformerLM

__all__ = [
    "hf_to_lm_params",
    "lm_from_hf_config",
    "lm_params_to_hf",
    "load_lm_safetensors",
    "load_safetensors",
    "load_safetensors_metadata",
    "save_lm_safetensors",
    "save_safetensors",
]


def _bad_file(path, err: Exception) -> ValueError:
    return ValueError(f"{os.fspath(path)} is not a valid safetensors file: {err}")


def save_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write named arrays (numpy or jax) to ``path`` in the safetensors format
    (``safetensors.numpy.save_file``); metadata values are stored as strings."""
    arrays = {}
    for name in sorted(tensors):
        if not isinstance(name, str):
            raise ValueError(f"tensor names must be strings, got {name!r}.")
        arr = np.asarray(tensors[name])
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        arrays[name] = arr if arr.flags.c_contiguous else arr.copy(order="C")  # keeps 0-d
    meta = None if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    try:
        st_numpy.save_file(arrays, os.fspath(path), metadata=meta)
    except (safetensors.SafetensorError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"cannot write {os.fspath(path)} as safetensors: {e}") from e


def load_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (empty if none)."""
    try:
        with safetensors.safe_open(os.fspath(path), framework="np") as f:
            return dict(f.metadata() or {})
    except safetensors.SafetensorError as e:
        raise _bad_file(path, e) from e


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read every tensor of a safetensors file as a (writable) numpy array
    (``safetensors.numpy.load_file``, which validates the header and the offsets)."""
    try:
        loaded = st_numpy.load_file(os.fspath(path))
    except safetensors.SafetensorError as e:
        raise _bad_file(path, e) from e
    return {k: v if v.flags.writeable else v.copy() for k, v in loaded.items()}


_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
_LAYER = re.compile(r"^layers_(\d+)$")


def lm_params_to_hf(params: PyTree) -> dict[str, np.ndarray]:
    """Flax `TransformerLM` params → {HF Llama name: array}; kernels transposed to (out, in)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [str(p.key) for p in path]
        *mods, leaf_name = keys
        if leaf_name not in _LEAF_TO_HF:
            raise ValueError(f"unexpected parameter {'/'.join(keys)}.")
        mods = [f"layers.{m.group(1)}" if (m := _LAYER.match(k)) else k for k in mods]
        name = ".".join([*mods, "weight"])
        name = name if mods[0] == "lm_head" else f"model.{name}"
        arr = np.asarray(leaf)
        out[name] = np.ascontiguousarray(arr.T) if leaf_name == "kernel" else arr
    return out


def hf_to_lm_params(tensors: Mapping[str, Any]) -> PyTree:
    """{HF Llama name: array} → flax `TransformerLM` params (nested dicts of numpy arrays).

    For a sharded checkpoint, merge the ``load_safetensors`` dicts of every shard first.

    Names outside the Llama layout (e.g. ``rotary_emb.inv_freq`` buffers) are refused, so that a
    silently ignored tensor cannot change the model.
    """
    params: dict[str, Any] = {}
    for name, arr in tensors.items():
        if name == "lm_head.weight":
            path = ["lm_head", "kernel"]
        else:
            parts = name.split(".")
            if parts[0] != "model" or parts[-1] != "weight":
                raise ValueError(f"unexpected tensor name {name!r}.")
            parts = parts[1:-1]
            if parts[0] == "layers":
                parts = [f"layers_{parts[1]}", *parts[2:]]
            last = parts[-1]
            if last == "embed_tokens":
                path = [*parts, "embedding"]
            else:
                path = [*parts, "kernel" if last.endswith("_proj") else "scale"]
        arr = np.asarray(arr)
        value = np.ascontiguousarray(arr.T) if path[-1] == "kernel" else arr
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        if path[-1] in node:
            raise ValueError(f"duplicate tensor for {name!r}.")
        node[path[-1]] = value
    if "lm_head" not in params and "embed_tokens" in params:
        params["lm_head"] = {"kernel": np.ascontiguousarray(params["embed_tokens"]["embedding"].T)}
    return params


def save_lm_safetensors(
    path: str | os.PathLike, params: PyTree, metadata: Mapping[str, str] | None = None
) -> None:
    """Save `TransformerLM` params under HF Llama names (``{"format": "pt"}`` metadata added)."""
    save_safetensors(path, lm_params_to_hf(params), {"format": "pt", **(metadata or {})})


def load_lm_safetensors(path: str | os.PathLike, model: TransformerLM | None = None) -> PyTree:
    """Load HF Llama-named tensors as `TransformerLM` params (jax arrays).

    With ``model`` given, the tree structure and shapes are checked against
    ``model.init_params`` and leaves are cast to its ``param_dtype``; otherwise dtypes are kept.
    """
    params = hf_to_lm_params(load_safetensors(path))
    if model is not None:
        expected = jax.eval_shape(model.init_params, jax.random.key(0))
        want = set(lm_params_to_hf(jax.tree.map(lambda e: np.zeros((0,)), expected)))
        have = set(lm_params_to_hf(jax.tree.map(lambda p: np.zeros((0,)), params)))
        missing, extra = sorted(want - have), sorted(have - want)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {len(missing)} tensor(s) the model needs: {missing[:8]}")
            if extra:
                parts.append(f"has {len(extra)} tensor(s) the model does not have: {extra[:8]}")
            raise ValueError(
                f"checkpoint {os.fspath(path)} does not match the model: {'; '.join(parts)} "
                "(check the model's num_layers and the checkpoint's architecture)."
            )

        def cast(kp, e, p):
            if e.shape != p.shape:
                name = "/".join(str(k.key) for k in kp)
                raise ValueError(
                    f"{name}: shape {p.shape} in checkpoint (flax layout), the model expects "
                    f"{e.shape}; check the model's dimensions."
                )
            return p.astype(e.dtype)

        params = jax.tree_util.tree_map_with_path(cast, expected, params)
    return jax.tree.map(jnp.asarray, params)


def lm_from_hf_config(config: Mapping[str, Any], **overrides: Any) -> TransformerLM:
    """A `TransformerLM` from a Hugging Face ``LlamaConfig`` dict (``config.json``).

    Refuses options this architecture does not implement (RoPE scaling, biases, another
    activation, a head_dim other than hidden_size / num_attention_heads).
    """
    if config.get("rope_scaling"):
        raise ValueError(f"rope_scaling {config['rope_scaling']} is not supported.")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ValueError("attention/mlp biases are not supported.")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported (silu only).")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != config["hidden_size"] // heads:
        raise ValueError(f"head_dim {head_dim} != hidden_size / num_attention_heads.")
    kwargs = dict(
        vocab_size=config["vocab_size"],
        d_model=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads", heads),
        mlp_dim=config["intermediate_size"],
        max_len=config.get("max_position_embeddings", 2048),
        rope_base=float(config.get("rope_theta", 10_000.0)),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
    )
    return TransformerLM(**{**kwargs, **overrides})
