"""Save and load `TransformerLM` parameters as safetensors files with Hugging Face Llama names.

The safetensors format, written here directly (no dependency):

    [8 bytes: N, little-endian u64] [N bytes: JSON header] [raw little-endian tensor bytes]

with header ``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}``, offsets relative to the start of the byte buffer, the header padded
with spaces to a multiple of 8 bytes.

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

References:
  Hugging Face safetensors format, https://github.com/huggingface/safetensors (README, "Format");
  Hugging Face transformers ``modeling_llama.py`` (parameter names).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(jnp.bfloat16),
    "F8_E4M3": np.dtype(jnp.float8_e4m3fn),
    "F8_E5M2": np.dtype(jnp.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_NAMES = {dt: name for name, dt in _DTYPES.items()}


def save_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write named arrays (numpy or jax) to ``path`` in the safetensors format, in name order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks, offset = [], 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        if dt not in _NAMES:
            raise ValueError(f"{name}: dtype {arr.dtype} has no safetensors equivalent.")
        data = np.ascontiguousarray(arr, dtype=dt).tobytes()
        header[name] = {
            "dtype": _NAMES[dt],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for data in chunks:
            f.write(data)


def _read_header(f) -> tuple[dict[str, Any], int]:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    return header, 8 + n


def load_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (empty if none)."""
    with open(path, "rb") as f:
        return dict(_read_header(f)[0].get("__metadata__", {}))


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read every tensor of a safetensors file as a (writable) numpy array, one read each."""
    out = {}
    with open(path, "rb") as f:
        header, start = _read_header(f)
        size = f.seek(0, os.SEEK_END) - start
        header.pop("__metadata__", None)
        for name, info in header.items():
            dt = _DTYPES.get(info["dtype"])
            if dt is None:
                raise ValueError(f"{name}: unsupported safetensors dtype {info['dtype']}.")
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
            count = math.prod(shape)
            if not 0 <= begin <= end <= size or end - begin != dt.itemsize * count:
                raise ValueError(f"{name}: data_offsets {[begin, end]} do not fit shape {shape}.")
            f.seek(start + begin)
            out[name] = np.fromfile(f, dtype=dt, count=count).reshape(shape)
    return out


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
        if jax.tree.structure(expected) != jax.tree.structure(params):
            raise ValueError(
                f"checkpoint parameters {jax.tree.structure(params)} do not match the model's "
                f"{jax.tree.structure(expected)}."
            )

        def cast(e, p):
            if e.shape != p.shape:
                raise ValueError(f"shape {p.shape} in checkpoint, model expects {e.shape}.")
            return p.astype(e.dtype)

        params = jax.tree.map(cast, expected, params)
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
