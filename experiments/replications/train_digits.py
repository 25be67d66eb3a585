"""Training: a class-conditional UNet on scikit-learn's 8x8 digits, judged by a digits classifier.

Two models are trained (each cached by its own config): the UNet ε_θ(x_t, t, y) by denoising
score matching with 10% null labels, and a noise-aware `ImageClassifier` (half of each batch
clean, the rest noised along the VP path), which serves as the feature extractor and judge.
Class-conditional samples (Euler–Maruyama on the reverse SDE, `train_toy.euler_maruyama_sample`,
optionally with classifier-free guidance ε_u + w (ε_c − ε_u)) are scored by

  fd_digits       Fréchet distance between Gaussians fitted to the classifier's penultimate
                  features (the pooled activations feeding its logits, at t = 0) of the samples
                  and of the held-out test digits (an FID for 8x8 digits);
  class_accuracy  how often the classifier assigns a sample the label it was drawn for.

References: Heusel et al. (2017), "GANs trained by a two time-scale update rule converge to a
local Nash equilibrium" (FID); Ho & Salimans (2022), "Classifier-Free Diffusion Guidance".
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from feynkit.core.checkpoint import save_checkpoint
from feynkit.core.schedules import LinearSchedule
from feynkit.experiments import train as tr
from feynkit.experiments.data import load_digits_split
from feynkit.experiments.metrics import frechet_distance
from feynkit.experiments.replications import register
from feynkit.experiments.replications.train_toy import euler_maruyama_sample
from feynkit.experiments.results import Results
from feynkit.models import ImageClassifier, UNet

CACHE_VERSION = 1  # bump when the training code changes what a config trains
NUM_CLASSES = 10


@dataclasses.dataclass
class TrainDigitsConfig:
    name: str = "train_digits"
    cache_dir: str | None = None  # model cache (default $FEYNKIT_CACHE or ~/.cache/feynkit)
    # UNet
    channels: int = 16
    time_features: int = 32
    steps: int = 2500
    batch_size: int = 128
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    label_dropout: float = 0.1
    t_min: float = 1e-3
    # classifier (features for fd_digits, judge for class_accuracy)
    classifier_channels: int = 32
    classifier_steps: int = 1500
    classifier_learning_rate: float = 2e-3
    clean_fraction: float = 0.5
    checkpoint_every: int = 500
    # evaluation
    samples_per_class: int = 50
    sampler_steps: int = 200
    guidance_weight: float = 1.0  # 1: plain conditional sampling; > 1: classifier-free guidance
    max_fd: float = 2.0  # claim: fd_digits below this (measured 0.90, seed 0)
    baseline_factor: float = 4.0  # claim: fd_digits < Gaussian baseline's fd / this
    min_class_accuracy: float = 0.9  # claim: classifier agrees with the conditioning label


SMOKE = dict(
    channels=8,
    time_features=16,
    steps=150,
    batch_size=64,
    classifier_channels=8,
    classifier_steps=150,
    checkpoint_every=150,
    samples_per_class=10,
    sampler_steps=30,
    max_fd=1e6,
    baseline_factor=1e-6,  # smoke runs check the pipeline, not the quality
    min_class_accuracy=0.0,
)


def penultimate_features(classifier: nn.Module, params, x: jax.Array, t) -> jax.Array:
    """The input of the classifier's final ``logits`` layer (its penultimate activations)."""
    captured = []

    def interceptor(next_fun, args, kwargs, context):
        if context.module.name == "logits" and context.method_name == "__call__":
            captured.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        classifier.forward(params, x, t)
    if len(captured) != 1:
        raise ValueError("the classifier has no single submodule named 'logits'.")
    return captured[0]


def digits_judge(classifier: nn.Module, params):
    """``judge(x) -> (features, logits)`` of clean images (clipped to [−1, 1], t = 0), jitted:
    the feature space of `fd_digits` and the classifier that scores class accuracy."""

    @jax.jit
    def judge(x):
        x = jnp.clip(x, -1.0, 1.0)
        t = jnp.zeros(x.shape[:1])
        return penultimate_features(classifier, params, x, t), classifier.forward(params, x, t)

    return judge


def _models(ex: TrainDigitsConfig) -> tuple[UNet, ImageClassifier]:
    unet = UNet(ex.channels, NUM_CLASSES, ex.time_features)
    classifier = ImageClassifier(NUM_CLASSES, ex.classifier_channels, ex.time_features)
    return unet, classifier


def _defining_configs(ex: TrainDigitsConfig, seed: int) -> tuple[dict, dict]:
    common = {"version": CACHE_VERSION, "seed": seed, "data": "sklearn_digits_split_0.2_0"}
    unet = {
        "name": "train_digits-unet",
        **common,
        **{
            k: getattr(ex, k)
            for k in "channels time_features steps batch_size learning_rate warmup_steps "
            "label_dropout t_min".split()
        },
    }
    classifier = {
        "name": "train_digits-classifier",
        **common,
        "channels": ex.classifier_channels,
        "time_features": ex.time_features,
        "steps": ex.classifier_steps,
        "batch_size": ex.batch_size,
        "learning_rate": ex.classifier_learning_rate,
        "warmup_steps": ex.warmup_steps,
        "clean_fraction": ex.clean_fraction,
        "t_min": ex.t_min,
    }
    return unet, classifier


def _train(model, loss_fn, data, steps, lr, ex, key, desc, checkpoint_dir):
    params = jax.jit(model.init_params)(jax.random.fold_in(key, 0))
    t0 = time.perf_counter()
    state, history = tr.train(
        loss_fn,
        tr.make_optimizer(lr, steps, ex.warmup_steps),
        params,
        tr.array_batch_fn(ex.batch_size),
        jax.random.fold_in(key, 1),
        steps,
        data=data,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=ex.checkpoint_every,
        log_every=50,
        steps_per_call=1,  # conv gradients run far slower inside an XLA loop on the CPU
        desc=desc,
    )
    return state.params, {"train_seconds": time.perf_counter() - t0, "history": history}


def trained_digits_models(
    ex: TrainDigitsConfig | None = None, seed: int = 0, split=None, smoke: bool = False
) -> tuple[tuple[UNet, ImageClassifier], dict[str, tr.CachedModel]]:
    """The `train_digits` models and their parameters, from the model cache or trained.

    Returns ``((unet, classifier), {"unet": CachedModel, "classifier": CachedModel})``: the
    class-conditional ε-prediction UNet (linear VP schedule; label ``None`` is the null label)
    and the noise-aware classifier ``classifier.forward(params, x, t) -> logits``. Replications
    of guidance methods share these; `ex` defaults to the `train_digits` default config, and
    ``smoke=True`` applies the smoke settings (small, quickly trained models for smoke runs).
    """
    ex = TrainDigitsConfig() if ex is None else ex
    if smoke:
        ex = dataclasses.replace(ex, **SMOKE)
    split = load_digits_split() if split is None else split
    key = jax.random.key(seed)
    schedule = LinearSchedule()
    train_data = (jnp.asarray(split.x_train), jnp.asarray(split.y_train))
    unet, classifier = _models(ex)
    unet_cfg, clf_cfg = _defining_configs(ex, seed)
    unet_loss = tr.denoising_score_loss(
        unet.forward, schedule, NUM_CLASSES, ex.label_dropout, ex.t_min
    )
    clf_loss = tr.noisy_classifier_loss(classifier.forward, schedule, ex.t_min, ex.clean_fraction)
    jobs = {
        "unet": (unet_cfg, unet, unet_loss, ex.steps, ex.learning_rate),
        "classifier": (
            clf_cfg,
            classifier,
            clf_loss,
            ex.classifier_steps,
            ex.classifier_learning_rate,
        ),
    }
    cached = {}
    for i, (name, (defining, model, loss_fn, steps, lr)) in enumerate(jobs.items()):
        train_fn = functools.partial(
            _train, model, loss_fn, train_data, steps, lr, ex, jax.random.fold_in(key, i), name
        )
        cached[name] = tr.cached_train(defining, train_fn, directory=ex.cache_dir)
    return (unet, classifier), cached


@register("train_digits", TrainDigitsConfig)
def run(cfg, out_dir: Path) -> Results:
    ex = tr.experiment_config(cfg, TrainDigitsConfig, SMOKE)
    tr.quiet_checkpoint_logging()
    res = Results("train_digits", cfg.seed)
    key = jax.random.key(cfg.seed)
    schedule = LinearSchedule()
    split = load_digits_split()
    train_data = (jnp.asarray(split.x_train), jnp.asarray(split.y_train))
    (unet, classifier), cached = trained_digits_models(ex, cfg.seed, split)
    for name, c in cached.items():
        save_checkpoint(Path(out_dir) / "checkpoints" / name, 0, c.params)
        res.metric(f"cache_hit.{name}", float(c.hit))
        if c.info.get("history"):
            res.metric(f"final_train_loss.{name}", c.info["history"][-1][1])
        if "train_seconds" in c.info:
            res.metric(f"train_seconds.{name}", c.info["train_seconds"])
    res.metric("cache_hit", float(all(c.hit for c in cached.values())))
    unet_params, clf_params = cached["unet"].params, cached["classifier"].params

    features_and_logits = digits_judge(classifier, clf_params)

    n = ex.samples_per_class * NUM_CLASSES
    labels = jnp.repeat(jnp.arange(NUM_CLASSES), ex.samples_per_class)
    w = ex.guidance_weight

    @jax.jit
    def sample(params, key):
        def eps_fn(x, t):
            eps_c = unet.forward(params, x, t, labels)
            if w == 1.0:
                return eps_c
            eps_u = unet.forward(params, x, t, None)
            return eps_u + w * (eps_c - eps_u)

        return euler_maruyama_sample(
            key, eps_fn, (n, 8, 8, 1), schedule, ex.sampler_steps, ex.t_min
        )

    k_sample, k_base = jax.random.split(jax.random.fold_in(key, 2))
    t0 = time.perf_counter()
    samples = jnp.clip(jax.block_until_ready(sample(unet_params, k_sample)), -1.0, 1.0)
    res.metric("sample_seconds", time.perf_counter() - t0)

    x_test, y_test = jnp.asarray(split.x_test), np.asarray(split.y_test)
    f_test, logits_test = features_and_logits(x_test)
    f_samples, logits_samples = features_and_logits(samples)
    f_train, _ = features_and_logits(train_data[0])
    # A Gaussian with the training images' pixel mean and covariance: the nontrivial baseline.
    pixels = np.asarray(split.x_train).reshape(len(split.x_train), -1).astype(np.float64)
    chol = np.linalg.cholesky(np.cov(pixels, rowvar=False) + 1e-6 * np.eye(pixels.shape[1]))
    z = np.asarray(jax.random.normal(k_base, (n, pixels.shape[1])), np.float64)
    gauss = jnp.asarray((pixels.mean(0) + z @ chol.T).reshape(n, 8, 8, 1), jnp.float32)
    f_gauss, _ = features_and_logits(gauss)

    res.metric("classifier_test_accuracy", np.mean(np.argmax(logits_test, -1) == y_test))
    fd = res.metric("fd_digits", frechet_distance(f_samples, f_test))
    res.metric("fd_train_vs_test", frechet_distance(f_train, f_test))
    fd_gauss = res.metric("fd_gaussian_baseline", frechet_distance(f_gauss, f_test))
    acc = res.metric("class_accuracy", np.mean(np.argmax(logits_samples, -1) == labels))
    res.claim("fd_digits < bound", fd, ex.max_fd)
    res.claim(
        f"fd_digits < Gaussian baseline / {ex.baseline_factor:g}", fd, fd_gauss / ex.baseline_factor
    )
    res.claim("class accuracy of conditional samples", acc, ex.min_class_accuracy, ">")
    res.figures.append(
        _plot(np.asarray(samples), np.asarray(split.x_test), y_test, cached, out_dir)
    )
    return res


def _plot(samples, x_test, y_test, cached, out_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_class = samples.shape[0] // NUM_CLASSES
    cols = min(per_class, 8)
    fig, axes = plt.subplots(1, 3, figsize=(12, 6), gridspec_kw={"width_ratios": [1, 1, 1.2]})
    grid = samples.reshape(NUM_CLASSES, per_class, 8, 8)[:, :cols]
    real = np.stack([x_test[y_test == c][:cols, ..., 0] for c in range(NUM_CLASSES)])
    for ax, title, g in ((axes[0], "samples (row = label)", grid), (axes[1], "test digits", real)):
        ax.imshow(
            g.transpose(0, 2, 1, 3).reshape(NUM_CLASSES * 8, cols * 8),
            cmap="gray_r",
            vmin=-1,
            vmax=1,
        )
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    for name, c in cached.items():
        if c.info.get("history"):
            steps, losses = zip(*((h[0], h[1]) for h in c.info["history"]), strict=True)
            axes[2].plot(steps, losses, label=name)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("step")
    axes[2].set_title("training loss", fontsize=9)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    path = Path(out_dir) / "train_digits.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
