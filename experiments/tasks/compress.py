"""task=compress: model × quant → bytes, bits per weight, per-layer error, the model's own metric.

The quantizer of ``quant/`` (a `QuantRecipe`, calibrated on the model's own forward pass when it
needs calibration statistics) replaces the selected parameters by compressed containers. Reported:
float and compressed bytes, bits per weight, the relative Frobenius error of every compressed
layer (and the worst), and what the model is judged by: perplexity on held-out bytes (byte_lm),
the denoising error on noised data (diffusion models), the reconstruction error (vae).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig

from feynkit.experiments.tasks import build
from feynkit.experiments.tasks.common import bound_for, task_settings
from feynkit.experiments.tasks.validate import option_name, validate_combination

__all__ = ["CompressTask", "layer_errors", "run_compress"]


@dataclasses.dataclass
class CompressTask:
    """The ``task`` node of task=compress."""

    name: str = "compress"
    eval_windows: int = 64  # byte_lm: held-out windows scored for perplexity
    eval_samples: int = 512  # diffusion models / vae: evaluation inputs
    max_layer_error: dict[str, float] = dataclasses.field(default_factory=dict)
    max_perplexity_ratio: float = 1.5  # byte_lm: compressed / float perplexity below this
    max_error_ratio: float = 3.0  # diffusion, vae: compressed / float error below this
    smoke_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


def layer_errors(params: Any, compressed: Any) -> dict[str, float]:
    """‖W − Ŵ‖_F / ‖W‖_F of every compressed leaf, by '/'-joined path."""
    from feynkit.compression import quant

    is_c = getattr(quant, "is_compressed", None) or quant.is_quantized
    deq = quant.dequantize_tree
    flat_c = jax.tree_util.tree_flatten_with_path(compressed, is_leaf=is_c)[0]
    flat_p = dict(
        (quant.path_str(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    )
    out = {}
    for path, leaf in flat_c:
        if not is_c(leaf):
            continue
        name = quant.path_str(path)
        w = jnp.asarray(flat_p[name], jnp.float32)
        w_hat = leaf.dequantize() if hasattr(leaf, "dequantize") else deq(leaf)
        w_hat = jnp.asarray(w_hat, jnp.float32).reshape(w.shape)
        out[name] = float(jnp.linalg.norm(w - w_hat) / jnp.maximum(jnp.linalg.norm(w), 1e-30))
    return out


def run_compress(cfg: DictConfig, ctx: Any) -> None:
    """Compress `cfg.model`'s parameters with `cfg.quant` and measure what it costs."""
    from feynkit.compression import quant

    validate_combination(cfg)
    settings = task_settings(cfg, ctx.smoke)
    bundle = build.build_model(cfg, ctx.seed, ctx.smoke)
    k_quant, k_eval = jax.random.split(ctx.key)
    t0 = time.perf_counter()
    recipe, compressed = build.compress_params(cfg, bundle, k_quant)
    ctx.metric("compress_seconds", time.perf_counter() - t0)
    float_bytes = ctx.metric("bytes.float32", quant.tree_nbytes(bundle.params))
    c_bytes = ctx.metric("bytes.compressed", quant.tree_nbytes(compressed))
    ctx.metric("compression_ratio", float_bytes / max(c_bytes, 1.0))
    from feynkit.experiments.tasks.sample import _bits_per_weight

    ctx.metric("bits_per_weight", _bits_per_weight(quant, compressed))
    errors = layer_errors(bundle.params, compressed)
    if not errors:
        raise ValueError(
            f"quant={build.target_name(cfg.quant)} compressed no parameter of {bundle.name}; "
            "check quant.where."
        )
    for name, e in errors.items():
        ctx.metric(f"layer_error.{name}", e)
    worst = ctx.metric("layer_error.max", max(errors.values()))
    ctx.metric("layers_compressed", len(errors))
    bound = bound_for(settings, "max_layer_error", option_name(cfg, "quant"))
    if bound is not None:
        ctx.claim(f"worst relative layer error < {bound:g}", worst, bound)
    apply_c = build.compressed_apply_fn(bundle)
    if bundle.kind == "lm":
        _lm_metrics(ctx, bundle, settings, compressed, apply_c)
    elif bundle.kind == "diffusion":
        _denoising_metrics(ctx, bundle, settings, compressed, apply_c, k_eval)
    else:
        _vae_metrics(ctx, bundle, settings, compressed, apply_c, k_eval)
    _figure(ctx, errors, bundle.name)


def _lm_metrics(ctx, bundle, settings, compressed, apply_c) -> None:
    from feynkit.experiments.evaluation import lm_perplexity, scoring_windows

    seq_len = bundle.extras["seq_len"]
    windows = scoring_windows(bundle.extras["corpus"].test, seq_len, int(settings.eval_windows))
    ppl = ctx.metric("perplexity.float", lm_perplexity(bundle.apply_fn, bundle.params, windows))
    ppl_c = ctx.metric("perplexity.compressed", lm_perplexity(apply_c, compressed, windows))
    ratio = ctx.metric("perplexity_ratio", ppl_c / ppl)
    bound = float(settings.max_perplexity_ratio)
    ctx.claim(f"compressed / float perplexity < {bound:g}", ratio, bound)


def _denoising_metrics(ctx, bundle, settings, compressed, apply_c, key) -> None:
    """Mean squared ε error on noised reference data, float and compressed."""
    n = int(settings.eval_samples)
    k_ref, k_t, k_eps = jax.random.split(key, 3)
    x0, labels = bundle.reference(k_ref, n)
    t = jax.random.uniform(k_t, (n,), minval=0.02, maxval=0.98)
    eps = jax.random.normal(k_eps, x0.shape)
    shape = (n,) + (1,) * (x0.ndim - 1)
    a, s = bundle.schedule.alpha(t).reshape(shape), bundle.schedule.sigma(t).reshape(shape)
    xt = a * x0 + s * eps

    def err(apply, params):
        return float(jnp.mean((apply(params, xt, t, label=labels) - eps) ** 2))

    e = ctx.metric("denoising_mse.float", err(bundle.apply_fn, bundle.params))
    e_c = ctx.metric("denoising_mse.compressed", err(apply_c, compressed))
    ratio = ctx.metric("denoising_mse_ratio", e_c / e)
    bound = float(settings.max_error_ratio)
    ctx.claim(f"compressed / float denoising error < {bound:g}", ratio, bound)


def _vae_metrics(ctx, bundle, settings, compressed, apply_c, key) -> None:
    x = bundle.extras["x_test"][: int(settings.eval_samples)]

    def recon(apply, params):
        out = apply(params, key, x)
        p = jax.nn.sigmoid(out.recon)
        return float(jnp.mean((p - x) ** 2))

    e = ctx.metric("reconstruction_mse.float", recon(bundle.apply_fn, bundle.params))
    e_c = ctx.metric("reconstruction_mse.compressed", recon(apply_c, compressed))
    bound = float(settings.max_error_ratio)
    ctx.claim(f"compressed / float reconstruction error < {bound:g}", e_c / e, bound)


def _figure(ctx, errors: dict[str, float], model: str) -> None:
    names = list(errors)
    with ctx.figure("layer_errors.png", size=0.25 * len(names) + 2.5) as (fig, axes):
        ax = axes[0, 0]
        ax.barh(np.arange(len(names)), [errors[k] for k in names])
        ax.set_yticks(np.arange(len(names)), names, fontsize=6)
        ax.set_xlabel("relative Frobenius error")
        ax.set_title(f"{model}: per-layer error", fontsize=9)
