"""task=compress: model × prune × quant → bytes, bits per weight, layer errors, the model's metric.

The quantizer of ``quant/`` (a `QuantRecipe`, calibrated on the model's own forward pass when it
needs calibration statistics) replaces the selected parameters by compressed containers. Reported:
float and compressed bytes, bits per weight, the relative Frobenius error of every compressed
layer (and the worst), and what the model is judged by: perplexity on held-out bytes (byte_lm),
the denoising error on noised data (diffusion models), the reconstruction error (vae).

A pruner of ``prune/`` (a `PruneRecipe`, e.g. ``prune=sparsegpt prune.sparsity=0.5``) runs first,
calibrated on the float model; ``quant=`` (none by default once a pruner is chosen) then
quantizes the pruned model, calibrated on it. Pruning adds the mask sparsity, the fraction of
exact zeros after quantization, N:M validity and the bits of a sparse storage
(`feynkit.compression.prune.sparse_storage_bits`).

``prune=flap|evopress|wina|dare`` are the options that are not a same-shape mask (FLAP shrinks
the arrays, EvoPress searches per-layer sparsities, WINA gates activations in the forward pass,
DARE acts on a fine-tune's delta): their specs and runners live in
`feynkit.experiments.tasks.prune_options`, and this task dispatches on the spec.
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
    max_sparsity_error: float = 0.01  # prune=: |mask sparsity − prune.sparsity| below this
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
    from feynkit.experiments.tasks import prune_options as po

    validate_combination(cfg)
    settings = task_settings(cfg, ctx.smoke)
    pruner = cfg.get("prune")
    pruner = None if pruner is None or build.is_none(pruner) else pruner
    if pruner is not None and build.import_target(pruner._target_) is po.dare:
        # a fine-tune's delta: the base and fine-tuned byte LMs come from the zoo
        po.run_dare(ctx, build._instantiate(pruner), cfg, settings, ctx.smoke)
        return
    bundle = build.build_model(cfg, ctx.seed, ctx.smoke)
    k_quant, k_eval = jax.random.split(ctx.key)
    float_params = bundle.params
    masks = spec = zeroed = uniform = None
    if pruner is not None:
        k_prune, k_quant = jax.random.split(k_quant)
        spec = _prune_spec(cfg, bundle)
        if isinstance(spec, po.WinaSpec):  # the forward pass changes, not the parameters
            po.run_wina(ctx, spec, bundle, _report_fn(ctx, bundle, settings, k_eval))
            return
        if isinstance(spec, po.FlapSpec):
            inputs = _calibration_inputs(cfg, bundle, k_prune)
            pruned, zeroed, _ = po.structured_prune(ctx, spec, bundle, inputs)
        elif isinstance(spec, po.EvoPressSpec):
            where = spec.where if spec.where is not None else bundle.quant_where
            inputs = _calibration_inputs(cfg, bundle, k_prune)
            pruned, masks, uniform = po.evopress_prune(ctx, spec, bundle, inputs, where)
        else:
            pruned, masks = _prune(ctx, cfg, bundle, k_prune, spec)
        # quant= then acts on (and calibrates on) the pruned model
        to_quantize = dataclasses.replace(bundle, params=pruned)
    else:
        to_quantize = bundle
    t0 = time.perf_counter()
    if build.is_none(cfg.quant):
        recipe, compressed = None, to_quantize.params
    else:
        recipe, compressed = build.compress_params(cfg, to_quantize, k_quant)
    ctx.metric("compress_seconds", time.perf_counter() - t0)
    float_bytes = ctx.metric("bytes.float32", quant.tree_nbytes(float_params))
    c_bytes = ctx.metric("bytes.compressed", quant.tree_nbytes(compressed))
    ctx.metric("compression_ratio", float_bytes / max(c_bytes, 1.0))
    from feynkit.experiments.tasks.sample import _bits_per_weight

    leaves = jax.tree_util.tree_leaves(compressed, is_leaf=quant.is_compressed)
    if any(quant.is_compressed(x) for x in leaves):  # quant=, or SparseGPT with prune.bits
        ctx.metric("bits_per_weight", _bits_per_weight(quant, compressed))
    if isinstance(spec, po.FlapSpec):  # shrunk kernels: errors of the structure at full shape
        errors = po.shrunk_layer_errors(float_params, zeroed)
        if recipe is not None:
            for name, e in layer_errors(to_quantize.params, compressed).items():
                ctx.metric(f"quant_layer_error.{name}", e)
    else:
        errors = layer_errors(float_params, compressed)
    if masks is not None:
        requant = recipe is not None  # quant= after pruning may fill pruned weights (GPTQ)
        _sparsity_metrics(ctx, cfg, settings, float_params, compressed, masks, errors, requant)
    if not errors:
        raise ValueError(
            f"quant={build.target_name(cfg.quant)} compressed no parameter of {bundle.name}; "
            "check quant.where."
        )
    for name, e in errors.items():
        ctx.metric(f"layer_error.{name}", e)
    worst = ctx.metric("layer_error.max", max(errors.values()))
    ctx.metric("layers_compressed", len(errors))
    group = "prune" if pruner is not None else "quant"  # errors vs the float model include pruning
    bound = bound_for(settings, "max_layer_error", option_name(cfg, group))
    if bound is not None:
        ctx.claim(f"worst relative layer error < {bound:g}", worst, bound)
    apply_c = build.compressed_apply_fn(bundle)
    report = _report_fn(ctx, bundle, settings, k_eval)
    value = report(apply_c, compressed)
    if uniform is not None:  # EvoPress: the uniform allocation at the same average sparsity
        value_u = report(apply_c, uniform, "uniform", claim=False)
        if not ctx.smoke:  # the paper's claim (the smoke LM is too untrained to show it)
            ctx.claim("EvoPress allocation's metric < uniform's at equal average", value, value_u)
    _figure(ctx, errors, bundle.name)


def _prune_spec(cfg, bundle):
    """The ``prune=`` option built: a `PruneRecipe`, or a spec of `prune_options`; ``where:
    null`` takes the model's default kernels."""
    node = cfg.prune
    extra = {} if node.get("where") is not None else {"where": bundle.quant_where}
    return build._instantiate(node, **extra)


def _calibration_inputs(cfg, bundle, key):
    """``prune.calibration.num_samples`` inputs of the model's own forward pass."""
    n = int((cfg.prune.get("calibration") or {}).get("num_samples", 32))
    return bundle.calibration_inputs(key, n)


def _prune(ctx, cfg, bundle, key, recipe):
    """``(pruned params, masks)`` under the `PruneRecipe` of ``cfg.prune``, calibrated on the
    model's own forward pass (Hessians: Wanda, SparseGPT) or on its loss gradients (oBERT,
    byte_lm only)."""
    from feynkit.compression import prune
    from feynkit.compression.quant import calibrate

    node = cfg.prune
    spec = node.get("calibration") or {}
    n = int(spec.get("num_samples", 32))
    calibration = None
    t0 = time.perf_counter()
    if "gradients" in recipe.stats:
        if bundle.kind != "lm":
            raise ValueError(
                f"prune={option_name(cfg, 'prune')} needs loss gradients; task=compress "
                f"collects them for byte_lm only (model={bundle.name})."
            )
        from feynkit.experiments.data import token_windows
        from feynkit.experiments.evaluation import lm_nll

        bs, seq_len = int(spec.get("batch_size", 4)), bundle.extras["seq_len"]
        x, y = token_windows(key, bundle.extras["corpus"].validation, n * bs, seq_len)
        windows = jnp.concatenate([x, y[:, -1:]], axis=1).reshape(n, bs, seq_len + 1)
        calibration = prune.collect_gradients(
            lambda p, w: lm_nll(bundle.apply_fn, p, w), bundle.params, windows, recipe.where
        )
    elif recipe.needs_calibration:
        inputs = bundle.calibration_inputs(key, n)
        apply = bundle.calibration_apply or bundle.apply_fn
        calibration = calibrate(apply, bundle.params, inputs, where=recipe.where)
    ctx.metric("prune_calibration_seconds", time.perf_counter() - t0)
    t0 = time.perf_counter()
    pruned, masks = prune.prune_tree(bundle.params, recipe, calibration=calibration)
    ctx.metric("prune_seconds", time.perf_counter() - t0)
    return pruned, masks


def _sparsity_metrics(ctx, cfg, settings, float_params, compressed, masks, errors, requant):
    """Mask sparsity, exact zeros of the final weights, N:M validity, sparse storage bits, and
    the relative error of pruned float layers (quantized ones are in ``errors`` already)."""
    from feynkit.compression import prune, quant

    n, m = cfg.prune.get("n"), cfg.prune.get("m")
    flat_m = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]
    flat_c = dict(
        (quant.path_str(p), leaf)
        for p, leaf in jax.tree_util.tree_flatten_with_path(
            compressed, is_leaf=quant.is_compressed
        )[0]
    )
    flat_f = dict(
        (quant.path_str(p), leaf)
        for p, leaf in jax.tree_util.tree_flatten_with_path(float_params)[0]
    )
    zeros = total = sparse_bits = 0
    nm_ok = True
    for p, mask in flat_m:
        if mask is None:
            continue
        name = quant.path_str(p)
        leaf = flat_c[name]
        w_hat = leaf.dequantize() if quant.is_compressed(leaf) else leaf
        w_hat = jnp.asarray(w_hat, jnp.float32).reshape(mask.shape)
        zeros += int(jnp.sum(w_hat == 0))
        total += mask.size
        sparse_bits += prune.sparse_storage_bits(leaf, mask, n=n, m=m)
        if n is not None:
            nm_ok &= prune.is_nm_sparse(w_hat, n, m)
        if name not in errors:
            w = jnp.asarray(flat_f[name], jnp.float32)
            errors[name] = float(
                jnp.linalg.norm(w - w_hat) / jnp.maximum(jnp.linalg.norm(w), 1e-30)
            )
    target = ctx.metric("sparsity.mask", prune.mask_sparsity(masks))
    zeros_frac = ctx.metric("sparsity.zeros", zeros / max(total, 1))
    ctx.metric("sparse_bits_per_weight", sparse_bits / max(total, 1))
    if n is None:
        want = float(cfg.prune.sparsity)
        tol = float(settings.max_sparsity_error)
        ctx.claim(f"mask sparsity within {tol:g} of {want:g}", abs(target - want), tol)
    else:
        ctx.claim(f"every group of {m} has at most {n} nonzeros", float(nm_ok), 1.0, ">=")
    if not requant:
        ctx.claim("pruned weights are exact zeros", zeros_frac, target, ">=")


_METRIC_NAMES = {"lm": "perplexity", "diffusion": "denoising_mse", "vae": "reconstruction_mse"}
_METRIC_WORDS = {"lm": "perplexity", "diffusion": "denoising error", "vae": "reconstruction error"}


def _metric_fn(bundle, settings, key):
    """``fn(apply, params) -> float``: what the model is judged by — perplexity on held-out
    windows (byte_lm), the mean squared ε error on noised reference data (diffusion models),
    the reconstruction error (vae)."""
    if bundle.kind == "lm":
        from feynkit.experiments.evaluation import lm_perplexity, scoring_windows

        seq_len = bundle.extras["seq_len"]
        corpus = bundle.extras["corpus"]
        windows = scoring_windows(corpus.test, seq_len, int(settings.eval_windows))
        return lambda apply, params: lm_perplexity(apply, params, windows)
    if bundle.kind == "diffusion":
        n = int(settings.eval_samples)
        k_ref, k_t, k_eps = jax.random.split(key, 3)
        x0, labels = bundle.reference(k_ref, n)
        t = jax.random.uniform(k_t, (n,), minval=0.02, maxval=0.98)
        eps = jax.random.normal(k_eps, x0.shape)
        shape = (n,) + (1,) * (x0.ndim - 1)
        a, s = bundle.schedule.alpha(t).reshape(shape), bundle.schedule.sigma(t).reshape(shape)
        xt = a * x0 + s * eps
        return lambda apply, params: float(
            jnp.mean((apply(params, xt, t, label=labels) - eps) ** 2)
        )
    x = bundle.extras["x_test"][: int(settings.eval_samples)]

    def recon(apply, params):
        p = jax.nn.sigmoid(apply(params, key, x).recon)
        return float(jnp.mean((p - x) ** 2))

    return recon


def _report_fn(ctx, bundle, settings, key):
    """Record the float model's metric now; return ``report(apply, params, label="compressed",
    claim=True) -> value`` recording ``<metric>.<label>`` and its ratio to the float value, with
    the claim ratio < the task's bound (perplexity: max_perplexity_ratio, else
    max_error_ratio)."""
    fn = _metric_fn(bundle, settings, key)
    name, word = _METRIC_NAMES[bundle.kind], _METRIC_WORDS[bundle.kind]
    base = ctx.metric(f"{name}.float", fn(bundle.apply_fn, bundle.params))
    key_ = "max_perplexity_ratio" if bundle.kind == "lm" else "max_error_ratio"
    bound = float(settings[key_])

    def report(apply, params, label="compressed", claim=True):
        value = ctx.metric(f"{name}.{label}", fn(apply, params))
        suffix = "" if label == "compressed" else f".{label}"
        ratio = ctx.metric(f"{name}_ratio{suffix}", value / base)
        if claim:
            ctx.claim(f"{label} / float {word} < {bound:g}", ratio, bound)
        return value

    return report


def _figure(ctx, errors: dict[str, float], model: str) -> None:
    names = list(errors)
    with ctx.figure("layer_errors.png", size=0.25 * len(names) + 2.5) as (fig, axes):
        ax = axes[0, 0]
        ax.barh(np.arange(len(names)), [errors[k] for k in names])
        ax.set_yticks(np.arange(len(names)), names, fontsize=6)
        ax.set_xlabel("relative Frobenius error")
        ax.set_title(f"{model}: per-layer error", fontsize=9)
