"""Calibration statistics of linear layers, taken from the real Flax model.

The inputs of every selected Dense kernel are captured with a Flax method interceptor
(`flax.linen.intercept_methods`) while the unmodified model runs on calibration windows, so the
statistics are those of the model as written, not of a re-implementation. A kernel is identified
by its parameter path, e.g. ``layers_0/mlp/down_proj/kernel`` in `TransformerLM`.

Hessians follow GPTQ's reference accumulation with n counted in sequences: for each batch of m
sequences (its tokens flattened into the rows of X),

    H ← H · n / (n + m),   n ← n + m,   H ← H + (√(2/n) X)ᵀ (√(2/n) X),

so H = 2/N · Σ_tokens x xᵀ in float32 over N sequences.

Calibration tokens are prepared by the caller (e.g. windows of `feynkit.experiments.data`'s byte
corpus); compression never imports experiments.

References:
  Frantar et al. (2023), "GPTQ" (calibration with 128 random 2048-token segments);
  Nagel et al. (2020), "Up or Down? Adaptive Rounding for Post-Training Quantization".
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from feynkit.compression.quant.tree import LINEAR_KERNELS, match_paths
from feynkit.core.types import Array, ArrayLike, Float, Int, PyTree

__all__ = ["collect_linear_inputs", "linear_hessians"]


def _default_forward(model: nn.Module) -> Callable:
    return lambda params, tokens: model.apply({"params": params}, tokens)


@functools.lru_cache(maxsize=32)
def _capture_fn(model, selected: tuple[str, ...], forward):
    """A jitted ``(params, tokens) -> {path: (rows, d_in) inputs}`` using an interceptor.

    Cached on (model, selected paths, forward) so repeated calls reuse the compilation.
    """
    forward = forward or _default_forward(model)
    wanted = set(selected)

    @jax.jit
    def capture(params, tokens):
        found: dict[str, list[Array]] = {}

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and args:
                path = "/".join(context.module.path) + "/kernel"
                if path in wanted:
                    x = jnp.asarray(args[0])
                    found.setdefault(path, []).append(
                        x.reshape(-1, x.shape[-1]).astype(jnp.float32)
                    )
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            forward(params, tokens)
        return {p: jnp.concatenate(xs, axis=0) for p, xs in found.items()}

    return capture


def _capture(model, selected, forward):
    try:
        return _capture_fn(model, selected, forward)
    except TypeError:  # an unhashable model or forward: no caching
        return _capture_fn.__wrapped__(model, selected, forward)


def _select(params, where) -> tuple[str, ...]:
    return tuple(match_paths(params, where))


def _check_captured(selected, captured) -> None:
    missing = [p for p in selected if p not in captured]
    if missing:
        raise ValueError(
            f"selected paths {missing[:6]} are not kernels of modules the model calls (the "
            "interceptor saw no call of '<module path>/kernel'); restrict `where` to Dense "
            "kernels such as r'.*q_proj/kernel'."
        )


def _batches(tokens: Array, batch_size: int | None):
    n = tokens.shape[0]
    bs = n if batch_size is None else batch_size
    if bs < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer or None.")
    return [tokens[i : i + bs] for i in range(0, n, bs)]


def _check_tokens(tokens) -> Array:
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(
            f"tokens must be a non-empty (num_sequences, seq_len) array, got {tokens.shape}."
        )
    return tokens


def collect_linear_inputs(
    model: nn.Module,
    params: PyTree,
    tokens: Int[ArrayLike, "n t"],
    where: str | Sequence[str] = LINEAR_KERNELS,
    *,
    batch_size: int | None = None,
    forward: Callable | None = None,
) -> dict[str, Float[Array, "rows d_in"]]:
    """Inputs of each selected Dense kernel over the calibration tokens, rows = tokens.

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
    selected = _select(params, where)
    capture = _capture(model, selected, forward)
    parts = [capture(params, b) for b in _batches(tokens, batch_size)]
    _check_captured(selected, parts[0])
    return {p: jnp.concatenate([part[p] for part in parts], axis=0) for p in selected}


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
    """Per selected Dense kernel, H = 2/N · Σ x xᵀ over all calibration tokens (N sequences).

    Accumulated batch by batch exactly as GPTQ's reference ``add_batch`` (running average with
    n counted in sequences, float32).

    Args:
      model, params, tokens, where, forward: as in `collect_linear_inputs`.
      batch_size: sequences per forward pass (the running-average batch size m).

    Returns:
      path → (d_in, d_in) float32 Hessian, the input to `gptq_quantize`.

    References:
      Frantar et al. (2023), "GPTQ", Eq. (1)-(2) and reference code.
    """
    tokens = _check_tokens(tokens)
    selected = _select(params, where)
    capture = _capture(model, selected, forward)
    H: dict[str, Array] = {}
    n = 0
    for b in _batches(tokens, batch_size):
        xs = capture(params, b)
        if not H:
            _check_captured(selected, xs)
            H = {p: jnp.zeros((xs[p].shape[1],) * 2, jnp.float32) for p in selected}
        m = b.shape[0]
        keep = np.float32(n / (n + m))
        n += m
        scale = np.float32(np.sqrt(2.0 / n))
        H = {p: _hessian_update(H[p], xs[p], keep, scale) for p in selected}
    return H
