"""task=train: train the chosen model through the zoo (or restore it from the model cache).

The zoo's loaders (`zoo.trained_toy_model`, `trained_digits_models`, `trained_lm`, `trained_vae`)
train with the values of the ``model/`` option and cache the result by a hash of them; this task
writes the parameters as an Orbax checkpoint into the run directory and records the training
metrics and one held-out check per model kind: the denoising error on noised reference data
(diffusion models; 1 is the error of predicting zero), perplexity on held-out bytes (byte_lm),
the reconstruction error on test digits (vae).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig

from feynkit.experiments.tasks import build
from feynkit.experiments.tasks.common import task_settings
from feynkit.experiments.tasks.validate import validate_combination

__all__ = ["TrainTask", "run_train"]


@dataclasses.dataclass
class TrainTask:
    """The ``task`` node of task=train."""

    name: str = "train"
    eval_samples: int = 1024
    eval_windows: int = 64
    max_denoising_mse: float = 0.5  # diffusion: held-out ε error (predicting 0 scores 1)
    max_perplexity: float = 8.0  # byte_lm: held-out perplexity (uniform bytes: 256)
    max_reconstruction_mse: float = 0.1  # vae: test pixel error of the Bernoulli mean
    smoke_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


def _cached_models(bundle) -> dict[str, Any]:
    cached = bundle.extras.get("cached")
    return cached if isinstance(cached, dict) else {bundle.name: cached}


def run_train(cfg: DictConfig, ctx: Any) -> None:
    """Train (or restore) `cfg.model` and check it on held-out data."""
    from feynkit.core.checkpoint import save_checkpoint
    from feynkit.experiments import train as tr

    validate_combination(cfg)
    settings = task_settings(cfg, ctx.smoke)
    tr.quiet_checkpoint_logging()
    bundle = build.build_model(cfg, ctx.seed, ctx.smoke)
    histories = {}
    for name, cached in _cached_models(bundle).items():
        ctx.metric(f"{name}.cache_hit", float(cached.hit))
        if "train_seconds" in cached.info:
            ctx.metric(f"{name}.train_seconds", cached.info["train_seconds"])
        history = cached.info.get("history") or []
        if history:
            ctx.metric(f"{name}.first_train_loss", history[0][1])
            ctx.metric(f"{name}.final_train_loss", history[-1][1])
            histories[name] = history
        step = int(history[-1][0]) if history else 0
        save_checkpoint(Path(ctx.out_dir) / "checkpoints" / name, step, cached.params)
    key = ctx.key
    if bundle.kind == "diffusion":
        mse = ctx.metric("denoising_mse", _denoising_mse(bundle, int(settings.eval_samples), key))
        bound = float(settings.max_denoising_mse)
        ctx.claim(f"held-out denoising error < {bound:g}", mse, bound)
    elif bundle.kind == "lm":
        from feynkit.experiments.evaluation import lm_perplexity, scoring_windows

        windows = scoring_windows(
            bundle.extras["corpus"].test, bundle.extras["seq_len"], int(settings.eval_windows)
        )
        ppl = ctx.metric("test_perplexity", lm_perplexity(bundle.apply_fn, bundle.params, windows))
        bound = float(settings.max_perplexity)
        ctx.claim(f"test perplexity < {bound:g}", ppl, bound)
    else:
        x = bundle.extras["x_test"][: int(settings.eval_samples)]
        out = bundle.apply_fn(bundle.params, key, x)
        mse = ctx.metric("reconstruction_mse", jnp.mean((jax.nn.sigmoid(out.recon) - x) ** 2))
        bound = float(settings.max_reconstruction_mse)
        ctx.claim(f"test reconstruction error < {bound:g}", mse, bound)
    if histories:
        with ctx.figure("training_loss.png", size=4.0) as (fig, axes):
            ax = axes[0, 0]
            for name, history in histories.items():
                steps, losses = zip(*((h[0], h[1]) for h in history), strict=True)
                ax.plot(steps, losses, label=name)
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_title(f"{bundle.name}: training loss", fontsize=9)
            ax.legend(fontsize=8)


def _denoising_mse(bundle, n: int, key) -> float:
    """E‖ε_θ(α x₀ + σ ε, t, y) − ε‖² / dim over reference data, t ~ U(0.02, 0.98)."""
    k_ref, k_t, k_eps = jax.random.split(key, 3)
    x0, labels = bundle.reference(k_ref, n)
    t = jax.random.uniform(k_t, (n,), minval=0.02, maxval=0.98)
    eps = jax.random.normal(k_eps, x0.shape)
    shape = (n,) + (1,) * (x0.ndim - 1)
    xt = (
        bundle.schedule.alpha(t).reshape(shape) * x0 + bundle.schedule.sigma(t).reshape(shape) * eps
    )
    pred = bundle.apply_fn(bundle.params, xt, t, label=labels)
    return float(np.mean((np.asarray(pred) - np.asarray(eps)) ** 2))
