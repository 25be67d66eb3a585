"""Training-free activation sparsity: WINA (weight-informed) against magnitude-only (TEAL-style).

A Dense layer y = x W (Flax kernel W of shape (d_in, d_out), row i the weights input i feeds)
can skip the inputs it zeroes. Per token, keep the k = d_in − round(s·d_in) inputs with the
largest score and zero the rest:

    magnitude (TEAL):  score_i = |x_i|
    WINA:              score_i = |x_i| · ‖W_{i,:}‖₂     (the column norm of the (out, in) matrix)

The output error of dropping a set D is ‖Σ_{i∈D} x_i W_{i,:}‖₂; when the rows of W are
orthogonal it equals sqrt(Σ_{i∈D} x_i² ‖W_{i,:}‖²), which WINA's top-k minimises exactly (the
paper's optimality result; magnitude-only is optimal only when every row has the same norm).

`sparse_activation_apply(apply_fn, sparsity, method)` turns a model's own forward pass into its
activation-sparse version: a Flax method interceptor gates the input of every selected Dense
layer before it multiplies (one gate per layer and token), so the same function serves any Flax
model. Both methods select by per-token top-k here, so the achieved sparsity equals the target
exactly; TEAL itself thresholds with per-layer cut-offs calibrated to the target on average, and
WINA additionally orthogonalises columns by an SVD-based transform and allocates sparsity per
layer greedily — neither is implemented here.

References:
  Chen et al. (2025), "WINA: Weight Informed Neuron Activation for Accelerating Large Language
  Model Inference"; Liu et al. (2025), "Training-Free Activation Sparsity in Large Language
  Models" (TEAL).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from feynkit.core.types import Array, ArrayLike, Float

__all__ = [
    "ACTIVATION_METHODS",
    "activation_mask",
    "activation_scores",
    "sparse_activation_apply",
    "sparsify_activations",
]

ACTIVATION_METHODS = ("wina", "magnitude")


def _check_sparsity(sparsity, name: str = "sparsity") -> float:
    if isinstance(sparsity, jax.core.Tracer):
        raise ValueError(f"{name} must be a concrete float in [0, 1) (static under jit).")
    s = float(sparsity)
    if not 0.0 <= s < 1.0 or math.isnan(s):
        raise ValueError(f"{name} must lie in [0, 1), got {sparsity!r} (the fraction zeroed).")
    return s


def _check_method(method: str) -> str:
    if method not in ACTIVATION_METHODS:
        raise ValueError(f"method must be one of {ACTIVATION_METHODS}, got {method!r}.")
    return method


def activation_scores(
    x: Float[ArrayLike, "... d_in"], kernel: Float[ArrayLike, "d_in d_out"], method: str = "wina"
) -> Float[Array, "... d_in"]:
    """|x_i| · ‖W_{i,:}‖₂ (WINA) or |x_i| (magnitude), float32."""
    _check_method(method)
    x = jnp.abs(jnp.asarray(x, jnp.float32))
    if method == "magnitude":
        return x
    kernel = jnp.asarray(kernel, jnp.float32)
    if kernel.ndim != 2 or kernel.shape[0] != x.shape[-1]:
        raise ValueError(
            f"kernel must be (d_in, d_out) with d_in = {x.shape[-1]}, got {kernel.shape}."
        )
    norms = jnp.linalg.norm(kernel, axis=1)
    return x * norms.reshape((1,) * (x.ndim - 1) + (-1,))


def activation_mask(scores: Float[ArrayLike, "... d"], sparsity: float) -> Array:
    """Per row, True at the d − round(s·d) largest scores (exactly that many; ties broken by
    position)."""
    s = _check_sparsity(sparsity)
    scores = jnp.asarray(scores)
    d = scores.shape[-1]
    keep = d - int(round(s * d))
    if keep >= d:
        return jnp.ones(scores.shape, bool)
    ranks = jnp.argsort(jnp.argsort(-scores, axis=-1, stable=True), axis=-1)
    return ranks < keep


def sparsify_activations(
    x: Float[ArrayLike, "... d_in"],
    kernel: Float[ArrayLike, "d_in d_out"],
    sparsity: float,
    method: str = "wina",
) -> Float[Array, "... d_in"]:
    """x with all but the top-k entries (by `activation_scores`) of each row set to 0."""
    x = jnp.asarray(x)
    mask = activation_mask(activation_scores(x, kernel, method), sparsity)
    return jnp.where(mask, x, jnp.zeros((), x.dtype))


def sparse_activation_apply(
    apply_fn: Callable[..., object],
    sparsity: float | Mapping[str, float],
    method: str = "wina",
    where: str | Sequence[str] = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    *,
    return_gated: bool = False,
) -> Callable[..., object]:
    """The activation-sparse forward pass: ``apply_fn(params, *args)`` with the input of every
    Dense module whose path matches `where` sparsified before it multiplies.

    Args:
      apply_fn: runs a Flax model, e.g. ``model.forward``.
      sparsity: the fraction of inputs zeroed per token, one float for every selected layer or
        a mapping {module path regex: sparsity} (the first matching pattern wins).
      method: "wina" (|x|·‖W_row‖) or "magnitude" (|x|, TEAL-style).
      where: regexes over '/'-joined module paths (e.g. ``layers_0/mlp/down_proj``).
      return_gated: also return, per gated module path, the fraction of its input entries the
        gate zeroed (1 − mean keep-mask over the call's tokens; mean over repeated calls) — the
        achieved activation sparsity, measured inside the forward pass.

    Returns:
      ``f(params, *args, **kw)`` (``-> (out, {path: gated fraction})`` with `return_gated`),
      pure and jit-able. Calling it raises ValueError when no Dense module matched `where`
      (a pattern that selects nothing).
    """
    _check_method(method)
    patterns = [where] if isinstance(where, str) else list(where)
    if isinstance(sparsity, Mapping):
        table = [(pat, _check_sparsity(v, f"sparsity[{pat!r}]")) for pat, v in sparsity.items()]
    else:
        table = [(".*", _check_sparsity(sparsity))]

    def level(path: str) -> float | None:
        if not any(re.fullmatch(p, path) for p in patterns):
            return None
        return next((s for pat, s in table if re.fullmatch(pat, path)), None)

    def apply(params, *args, **kwargs):
        hits = []

        def interceptor(next_fun, call_args, call_kwargs, context):
            module = context.module
            if context.method_name == "__call__" and isinstance(module, nn.Dense) and call_args:
                path = "/".join(module.path)
                s = level(path)
                if s is not None:
                    kernel = module.variables["params"]["kernel"]
                    x = jnp.asarray(call_args[0])
                    keep = activation_mask(activation_scores(x, kernel, method), s)
                    hits.append((path, 1.0 - jnp.mean(keep.astype(jnp.float32))))
                    x = jnp.where(keep, x, jnp.zeros((), x.dtype))
                    return next_fun(x, *call_args[1:], **call_kwargs)
            return next_fun(*call_args, **call_kwargs)

        with nn.intercept_methods(interceptor):
            out = apply_fn(params, *args, **kwargs)
        if not hits:
            raise ValueError(
                f"where={where!r} matched no Dense module the model called; give regexes over "
                "module paths such as r'.*mlp/down_proj'."
            )
        if not return_gated:
            return out
        gated: dict[str, list] = {}
        for path, frac in hits:
            gated.setdefault(path, []).append(frac)
        return out, {p: sum(v) / len(v) for p, v in gated.items()}

    return apply
