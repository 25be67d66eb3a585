"""Calibration statistics of Dense and Conv kernels, taken from the real Flax model.

`calibrate(apply_fn, params, inputs, where)` runs the unmodified model (``apply_fn(params,
*batch)``, e.g. ``model.forward``) on calibration samples and captures, with a Flax method
interceptor, the rows each selected kernel multiplies: a Dense's inputs x.reshape(−1, d_in), a
Conv's im2col patches (`feynkit.compression.quant.apply.conv_patches`, in the layout of the
kernel's reshape to (kh·kw·c_in, c_out)). A kernel is identified by its parameter path, e.g.
``layers_0/mlp/down_proj/kernel`` in `TransformerLM` or ``down_0/conv_in/kernel`` in `UNet`.
Params may already hold compressed leaves (the model then runs through `compressed_apply`), so
layer-sequential schemes can calibrate on a partly compressed model.

Hessians follow GPTQ's reference accumulation with n counted in samples (sequences for an LM,
images for a UNet): for each batch of m samples (their rows stacked in X),

    H ← H · n / (n + m),   n ← n + m,   H ← H + (√(2/n) X)ᵀ (√(2/n) X),

so H = 2/N · Σ_rows x xᵀ in float32 over N samples; the per-channel absolute maximum max|x_j|
(SmoothQuant/SVDQuant) is collected in the same pass.

Calibration samples are prepared by the caller (e.g. windows of `feynkit.experiments.data`'s
byte corpus, noised images at random times); compression never imports experiments.

References:
  Frantar et al. (2023), "GPTQ" (calibration with 128 random 2048-token segments);
  Nagel et al. (2020), "Up or Down? Adaptive Rounding for Post-Training Quantization".
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from feynkit.compression.quant.apply import compressed_apply, layer_inputs
from feynkit.compression.quant.tree import ALL_KERNELS, LINEAR_KERNELS, match_paths
from feynkit.core.types import Array, ArrayLike, Float, Int, PyTree

__all__ = [
    "Calibration",
    "calibrate",
    "collect_inputs",
    "collect_linear_inputs",
    "linear_hessians",
]


class Calibration(NamedTuple):
    """Per-kernel calibration statistics (keys: '/'-joined kernel paths).

    Attributes:
      hessians: path → (d_in, d_in) float32 H = 2/N · Σ x xᵀ (the GPTQ/SpQR/VPTQ/EoRA input).
      absmax: path → (d_in,) float32 max |x_j| over all rows (the SmoothQuant statistic).
      num_samples: N, the number of calibration samples.
    """

    hessians: dict[str, Array]
    absmax: dict[str, Array]
    num_samples: int


def _as_args(inputs) -> tuple:
    args = tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)
    arrays = [jnp.asarray(a) for a in args if a is not None]
    if not arrays:
        raise ValueError("inputs must hold at least one array with a leading sample axis.")
    n = arrays[0].shape[0] if arrays[0].ndim else 0
    if n == 0 or any(a.ndim == 0 or a.shape[0] != n for a in arrays):
        shapes = [None if a is None else jnp.shape(a) for a in args]
        raise ValueError(
            f"inputs must be arrays sharing a non-empty leading sample axis, got shapes {shapes}."
        )
    return tuple(None if a is None else jnp.asarray(a) for a in args), n


def _batches(args: tuple, n: int, batch_size: int | None):
    bs = n if batch_size is None else batch_size
    if not isinstance(bs, int | np.integer) or bs < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer or None.")
    for i in range(0, n, bs):
        yield tuple(None if a is None else a[i : i + bs] for a in args), min(bs, n - i)


def _capture_rows(apply_fn, wanted, params, args) -> dict[str, list[Array]]:
    """Run the model once; rows (float32) each wanted kernel multiplied, per call."""
    found: dict[str, list[Array]] = {}

    def interceptor(next_fun, call_args, call_kwargs, context):
        if context.method_name == "__call__" and call_args:
            path = "/".join(context.module.path) + "/kernel"
            if path in wanted:
                rows = layer_inputs(context.module, jnp.asarray(call_args[0]))
                if rows is not None:
                    found.setdefault(path, []).append(rows.astype(jnp.float32))
        return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(interceptor):
        compressed_apply(apply_fn)(params, *args)
    return {p: jnp.concatenate(xs, axis=0) for p, xs in found.items()}


@functools.lru_cache(maxsize=32)
def _capture_fn(apply_fn, selected: tuple[str, ...]):
    """A jitted ``(params, args) -> {path: (rows, d_in)}``, cached per (apply_fn, paths)."""
    wanted = frozenset(selected)
    return jax.jit(lambda params, args: _capture_rows(apply_fn, wanted, params, args))


def _capture(apply_fn, selected):
    try:
        return _capture_fn(apply_fn, selected)
    except TypeError:  # an unhashable apply_fn: no caching
        return _capture_fn.__wrapped__(apply_fn, selected)


def _check_captured(selected, captured) -> None:
    missing = [p for p in selected if p not in captured]
    if missing:
        raise ValueError(
            f"selected paths {missing[:6]} are not kernels of modules the model calls (the "
            "interceptor saw no nn.Dense/nn.Conv call of '<module path>/kernel'); restrict "
            "`where` to Dense/Conv kernels such as r'.*q_proj/kernel'."
        )


def _check_tokens(tokens) -> Array:
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(
            f"tokens must be a non-empty (num_sequences, seq_len) array, got {tokens.shape}."
        )
    return tokens


def _lm_forward(model: nn.Module, forward: Callable | None) -> Callable:
    if forward is not None:
        return forward
    return _ModelApply(model)


class _ModelApply:
    """Hashable ``(params, tokens) -> model.apply({'params': params}, tokens)`` (cache key)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, params, tokens):
        return self.model.apply({"params": params}, tokens)

    def __hash__(self):
        return hash(self.model)

    def __eq__(self, other):
        return isinstance(other, _ModelApply) and self.model == other.model


def collect_inputs(
    apply_fn: Callable,
    params: PyTree,
    inputs,
    where: str | Sequence[str] = ALL_KERNELS,
    *,
    batch_size: int | None = None,
) -> dict[str, Float[Array, "rows d_in"]]:
    """Rows each selected Dense/Conv kernel multiplies over the calibration samples.

    Args:
      apply_fn: ``apply_fn(params, *batch)`` runs the model (e.g. ``model.forward``).
      params: its parameters (float, or partly compressed).
      inputs: an array, or a tuple of arrays (None entries passed through), with a shared
        leading sample axis; batches slice that axis.
      where: regexes over '/'-joined kernel paths.
      batch_size: samples per forward pass (None: all at once).

    Returns:
      path → float32 (rows, d_in) inputs in sample order (Conv: im2col patches).
    """
    args, n = _as_args(inputs)
    selected = tuple(match_paths(params, where))
    capture = _capture(apply_fn, selected)
    parts = [capture(params, b) for b, _ in _batches(args, n, batch_size)]
    _check_captured(selected, parts[0])
    return {p: jnp.concatenate([part[p] for part in parts], axis=0) for p in selected}


def calibrate(
    apply_fn: Callable,
    params: PyTree,
    inputs,
    where: str | Sequence[str] = ALL_KERNELS,
    *,
    batch_size: int | None = 8,
) -> Calibration:
    """Per selected kernel, H = 2/N · Σ x xᵀ and max|x_j| over N calibration samples.

    Accumulated batch by batch exactly as GPTQ's reference ``add_batch`` (running average with
    n counted in samples, float32); works for any Flax model whose kernels belong to nn.Dense
    or nn.Conv modules (Conv rows are im2col patches).

    Args:
      apply_fn, params, inputs, where: as in `collect_inputs`.
      batch_size: samples per forward pass (the running-average batch size m).

    Returns:
      A `Calibration` (hessians, absmax, num_samples) — the ``calibration`` of a `QuantRecipe`.

    References:
      Frantar et al. (2023), "GPTQ", Eq. (1)-(2) and reference code; Xiao et al. (2023),
      "SmoothQuant" (activation maxima).
    """
    args, n_total = _as_args(inputs)
    selected = tuple(match_paths(params, where))
    capture = _capture(apply_fn, selected)
    H: dict[str, Array] = {}
    amax: dict[str, Array] = {}
    n = 0
    for b, m in _batches(args, n_total, batch_size):
        xs = capture(params, b)
        if not H:
            _check_captured(selected, xs)
            H = {p: jnp.zeros((xs[p].shape[1],) * 2, jnp.float32) for p in selected}
            amax = {p: jnp.zeros((xs[p].shape[1],), jnp.float32) for p in selected}
        keep = np.float32(n / (n + m))
        n += m
        scale = np.float32(np.sqrt(2.0 / n))
        H = {p: _hessian_update(H[p], xs[p], keep, scale) for p in selected}
        amax = {p: _absmax_update(amax[p], xs[p]) for p in selected}
    return Calibration(H, amax, n)


@jax.jit
def _absmax_update(a, X):
    return jnp.maximum(a, jnp.max(jnp.abs(X), axis=0))


def collect_linear_inputs(
    model: nn.Module,
    params: PyTree,
    tokens: Int[ArrayLike, "n t"],
    where: str | Sequence[str] = LINEAR_KERNELS,
    *,
    batch_size: int | None = None,
    forward: Callable | None = None,
) -> dict[str, Float[Array, "rows d_in"]]:
    """`collect_inputs` for a token model: rows = tokens (× calls) of each Dense kernel.

    Args:
      model: the Flax module (e.g. `TransformerLM`); params: its parameters.
      tokens: (num_sequences, seq_len) calibration windows.
      where: regexes over '/'-joined parameter paths of Dense kernels.
      batch_size: sequences per forward pass (None: all at once).
      forward: optional ``(params, tokens_batch) -> anything`` running the model
        (default ``model.apply({"params": params}, tokens)``).

    Returns:
      path → float32 (num_sequences · seq_len · calls, d_in) layer inputs, in token order.

    References:
      Frantar et al. (2023), "GPTQ" (layer inputs on calibration data).
    """
    tokens = _check_tokens(tokens)
    fwd = _lm_forward(model, forward)
    return collect_inputs(fwd, params, tokens, where, batch_size=batch_size)


@jax.jit
def _hessian_update(H, X, keep, scale):
    # GPTQ's add_batch: H *= n/(n+m); n += m; X *= sqrt(2/n); H += XᵀX (all float32).
    Xs = scale * X
    return H * keep + jnp.matmul(Xs.T, Xs, precision=jax.lax.Precision.HIGHEST)


def linear_hessians(
    model: nn.Module,
    params: PyTree,
    tokens: Int[ArrayLike, "n t"],
    where: str | Sequence[str] = LINEAR_KERNELS,
    *,
    batch_size: int | None = 8,
    forward: Callable | None = None,
) -> dict[str, Float[Array, "d_in d_in"]]:
    """`calibrate(...).hessians` for a token model: H = 2/N · Σ x xᵀ over N sequences.

    Args:
      model, params, tokens, where, forward: as in `collect_linear_inputs`.
      batch_size: sequences per forward pass (the running-average batch size m).

    Returns:
      path → (d_in, d_in) float32 Hessian, the input to `gptq_quantize`.

    References:
      Frantar et al. (2023), "GPTQ", Eq. (1)-(2) and reference code.
    """
    tokens = _check_tokens(tokens)
    fwd = _lm_forward(model, forward)
    return calibrate(fwd, params, tokens, where, batch_size=batch_size).hessians
