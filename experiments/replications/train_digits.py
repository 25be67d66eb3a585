"""Training: a class-conditional UNet on scikit-learn's 8x8 digits, judged by a digits classifier.

Two models are trained (each cached by its own config): the UNet ε_θ(x_t, t, y) by denoising
score matching with 10% null labels, and a noise-aware `ImageClassifier` (half of each batch
clean, the rest noised along the VP path), which serves as the feature extractor and judge.
Both come from `zoo.trained_digits_models`. Class-conditional samples (`diffusion.sample` with
`diffusion.euler_maruyama` on the reverse SDE from x₁ ~ N(0, I) to t_min, then Tweedie's x̂₀;
optionally with classifier-free guidance ε_u + w (ε_c − ε_u), `diffusion.cfg`) are scored by

  fd_digits       Fréchet distance between Gaussians fitted to the classifier's penultimate
                  features (the pooled activations feeding its logits, at t = 0) of the samples
                  and of the held-out test digits (an FID for 8x8 digits);
  class_accuracy  how often the classifier assigns a sample the label it was drawn for.

References: Heusel et al. (2017), "GANs trained by a two time-scale update rule converge to a
local Nash equilibrium" (FID); Ho & Salimans (2022), "Classifier-Free Diffusion Guidance".
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import MISSING

from feynkit.core.checkpoint import save_checkpoint
from feynkit.core.schedules import LinearSchedule
from feynkit.experiments import harness, zoo
from feynkit.experiments import train as tr
from feynkit.experiments.data import load_digits_split
from feynkit.experiments.metrics import frechet_distance
from feynkit.experiments.zoo import DIGITS_NUM_CLASSES as NUM_CLASSES
from feynkit.inference import diffusion


@dataclasses.dataclass
class TrainDigitsConfig(harness.ReplicationConfig, zoo.DigitsModelsConfig):
    """Schema of `configs/experiment/train_digits.yaml`: the model fields of
    `zoo.DigitsModelsConfig` (which define the cached models) and the evaluation."""

    samples_per_class: int = MISSING
    sampler_steps: int = MISSING
    guidance_weight: float = MISSING  # 1: plain conditional sampling; > 1: classifier-free
    max_fd: float = MISSING  # claim: fd_digits below this
    baseline_factor: float = MISSING  # claim: fd_digits < Gaussian baseline's fd / this
    min_class_accuracy: float = MISSING  # claim: classifier agrees with the conditioning label

    def __post_init__(self):
        harness.require(self.samples_per_class >= 2, "samples_per_class", "must be >= 2.")
        harness.require(self.sampler_steps >= 1, "sampler_steps", "must be >= 1.")
        harness.require(0.0 < self.t_min < 1.0, "t_min", f"must lie in (0, 1), got {self.t_min}.")
        harness.require(self.baseline_factor > 0, "baseline_factor", "must be > 0.")


@harness.replication("train_digits", TrainDigitsConfig)
def run(ex: TrainDigitsConfig, ctx: harness.Context) -> None:
    """Train (or load) the zoo's digits models and score class-conditional samples; with
    ``smoke=true`` the models are the zoo's smoke models (`zoo.DIGITS_SMOKE`)."""
    tr.quiet_checkpoint_logging()
    res = ctx
    key = ctx.key
    schedule = LinearSchedule()
    split = load_digits_split()
    train_data = (jnp.asarray(split.x_train), jnp.asarray(split.y_train))
    (unet, classifier), cached = zoo.trained_digits_models(ex, ctx.seed, split, smoke=ctx.smoke)
    for name, c in cached.items():
        save_checkpoint(ctx.out_dir / "checkpoints" / name, 0, c.params)
        res.metric(f"cache_hit.{name}", float(c.hit))
        if c.info.get("history"):
            res.metric(f"final_train_loss.{name}", c.info["history"][-1][1])
        if "train_seconds" in c.info:
            res.metric(f"train_seconds.{name}", c.info["train_seconds"])
    res.metric("cache_hit", float(all(c.hit for c in cached.values())))
    unet_params, clf_params = cached["unet"].params, cached["classifier"].params

    features_and_logits = zoo.digits_judge(classifier, clf_params)

    n = ex.samples_per_class * NUM_CLASSES
    labels = jnp.repeat(jnp.arange(NUM_CLASSES), ex.samples_per_class)
    w = ex.guidance_weight

    solver = diffusion.euler_maruyama(schedule)
    ts = diffusion.time_grid(ex.sampler_steps, 1.0, ex.t_min)
    guidance = None if w == 1.0 else diffusion.cfg(w)

    @jax.jit
    def sample(params, key):
        k_init, k_steps = jax.random.split(key)
        x, _ = diffusion.sample(
            k_steps,
            solver,
            lambda x, t, label: unet.forward(params, x, t, label),
            jax.random.normal(k_init, (n, 8, 8, 1)),
            ts,
            guidance=guidance,
            cond={"label": labels},
            uncond={"label": jnp.full_like(labels, NUM_CLASSES)},
            denoise_final=True,
        )
        return x

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
    _plot(ctx, np.asarray(samples), np.asarray(split.x_test), y_test, cached)


def _plot(ctx: harness.Context, samples, x_test, y_test, cached) -> None:
    kw = dict(figsize=(12, 6), gridspec_kw={"width_ratios": [1, 1, 1.2]})
    with ctx.figure("train_digits.png", 1, 3, **kw) as (fig, axes):
        _draw(axes[0], samples, x_test, y_test, cached)


def _draw(axes, samples, x_test, y_test, cached) -> None:
    per_class = samples.shape[0] // NUM_CLASSES
    cols = min(per_class, 8)
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
