"""Replication: the FKC CFG corrector on the learned class-conditional digits model.

Classifier-free guidance with weight w runs the SDE whose score is (1 − w) S_u + w S_c. Skreta
et al. (2025, Prop. 3.4) show that this SDE does *not* sample the distribution CFG is meant to
sample, the geometric mixture

    π_w(x) ∝ p(x)^(1−w) p(x | c)^w ∝ p(x | c) · p(c | x)^(w−1),

and that Feynman–Kac weights d log w = g²/2 · w(w − 1) ‖S_c − S_u‖² ds with resampling correct it.
Here both run on the `train_digits` UNet (its conditional and null-label branches), one SMC
population per class, and are compared with a reference for π_w built from real digits: the
images of class c reweighted by p̂(c | x)^(w−1), with p̂ the `train_digits` classifier standing
in for the model's implicit classifier (self-normalised importance sampling). Metrics: the
Fréchet distance in the classifier's feature space to that reference (weighted moments), class
accuracy and mean log p̂(c | x) of the samples. The claim: FKC's Fréchet distance to π_w is below
plain CFG's.

Particles are Euler–Maruyama paths from t = 1 to t_min, finished by one Tweedie step with the
guided ε; the FKC population is resampled by its final weights before it is scored.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import MISSING

from feynkit.core import RESAMPLERS, LinearSchedule, get_resampler, systematic_resample
from feynkit.experiments import harness
from feynkit.experiments import train as tr
from feynkit.experiments.data import load_digits_split
from feynkit.experiments.metrics import frechet_distance_gaussians
from feynkit.experiments.zoo import DIGITS_NUM_CLASSES as NUM_CLASSES
from feynkit.experiments.zoo import digits_judge, trained_digits_models
from feynkit.inference import smc

IMAGE_SHAPE = (8, 8, 1)
DIM = 64


@dataclasses.dataclass
class FKCCFGDigitsConfig(harness.ReplicationConfig):
    """Schema of `configs/experiment/fkc_cfg_digits.yaml` (the values live there)."""

    guidance_weights: list[float] = MISSING
    classes: list[int] = MISSING
    particles: int = MISSING  # per class
    num_steps: int = MISSING
    t_min: float = MISSING  # the weight rate grows like 1/σ_t² near t = 0
    ess_threshold: float = MISSING
    resampler: str = MISSING
    improvement: float = MISSING  # claim: naive FD / FKC FD > this

    def __post_init__(self):
        for c in self.classes:
            harness.require(
                0 <= c < NUM_CLASSES, "classes", f"must lie in 0..{NUM_CLASSES - 1}, got {c}."
            )
        harness.require(
            bool(self.guidance_weights) and min(self.guidance_weights) > 1.0,
            "guidance_weights",
            f"must be > 1 (1 is unguided), got {list(self.guidance_weights)}.",
        )
        harness.require(self.particles >= 1, "particles", f"must be ≥ 1, got {self.particles}.")
        harness.require(0.0 < self.t_min < 1.0, "t_min", f"must lie in (0, 1), got {self.t_min}.")
        harness.require(
            0.0 <= self.ess_threshold <= 1.0,
            "ess_threshold",
            f"is a fraction of the particles, in [0, 1]; got {self.ess_threshold}.",
        )
        harness.require(
            self.resampler in RESAMPLERS,
            "resampler",
            f"must be one of {sorted(RESAMPLERS)}, got {self.resampler!r}.",
        )


def weighted_moments(feats: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features under normalised weights (float64)."""
    f = np.asarray(feats, np.float64)
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    mu = w @ f
    c = f - mu
    return mu, (c * w[:, None]).T @ c / (1.0 - np.sum(w**2))


def _sampler(unet, params, schedule, ex: FKCCFGDigitsConfig, w: float, resample_fn):
    """One compiled run for any class label and for both FKC and the naive CFG SDE."""

    def eps(x_flat, t, label):
        x = x_flat.reshape(-1, *IMAGE_SHAPE)
        tb = jnp.full((x.shape[0],), t, x.dtype)
        lab = jnp.full((x.shape[0],), label, jnp.int32)
        return unet.forward(params, x, tb, lab).reshape(x_flat.shape)

    @jax.jit
    def run(key, label, weighted):
        def score(lab):
            return lambda x, t: -eps(x, t, lab) / schedule.sigma(t)

        sde = smc.cfg_sde(score(NUM_CLASSES), score(label), schedule, w)
        k_run, k_res = jax.random.split(key)
        state, info = smc.fkc_sample(
            k_run,
            sde,
            ex.particles,
            DIM,
            ex.num_steps,
            t_min=ex.t_min,
            weighted=weighted,
            resample_fn=resample_fn,
            ess_threshold=ex.ess_threshold,
        )
        x, log_w = state.particles, state.log_weights
        t = jnp.asarray(ex.t_min, x.dtype)
        e_u, e_c = eps(x, t, NUM_CLASSES), eps(x, t, label)
        e = e_u + w * (e_c - e_u)
        x0 = (x - schedule.sigma(t) * e) / schedule.alpha(t)
        ess_final = 1.0 / jnp.sum(jnp.exp(2.0 * log_w)) / x.shape[0]
        return x0.reshape(-1, *IMAGE_SHAPE), log_w, jnp.sum(info.resampled), ess_final

    return run


def reference_moments(judge, split, classes, w: float):
    """Moments of the π_w proxy in feature space: real images of each class weighted by
    p̂(c | x)^(w − 1) (classes equally weighted), and the weights' ESS fraction."""
    x_real = np.concatenate([split.x_train, split.x_test])
    y_real = np.concatenate([split.y_train, split.y_test])
    f_real, logits_real = map(np.asarray, judge(jnp.asarray(x_real)))
    logp_real = np.asarray(jax.nn.log_softmax(logits_real, -1), np.float64)
    ref_w = np.zeros(len(y_real))
    for c in classes:
        m = y_real == c
        lw = (w - 1.0) * logp_real[m, c]
        wc = np.exp(lw - lw.max())
        ref_w[m] = wc / wc.sum() / len(classes)
    sel = ref_w > 0
    return (*weighted_moments(f_real, ref_w), 1.0 / np.sum(ref_w[sel] ** 2) / sel.sum())


def _evaluate(ctx, prefix, judge, ex, x, w_particles, ref):
    labels = np.repeat(np.asarray(ex.classes), ex.particles)
    feats, logits = map(np.asarray, judge(x))
    logp = np.asarray(jax.nn.log_softmax(logits, -1), np.float64)
    # FKC's particles carry their final weights (resampling them would only add noise).
    mu, cov = weighted_moments(feats, w_particles)
    fd = ctx.metric(f"{prefix}.fd_to_reference", frechet_distance_gaussians(mu, cov, *ref[:2]))
    ctx.metric(f"{prefix}.class_accuracy", w_particles @ (np.argmax(logits, -1) == labels))
    ctx.metric(f"{prefix}.mean_log_p_class", w_particles @ logp[np.arange(len(labels)), labels])
    saturated = np.mean(np.abs(np.asarray(x)) >= 1.0, axis=(1, 2, 3))
    ctx.metric(f"{prefix}.saturated_pixel_fraction", w_particles @ saturated)
    return fd


@harness.replication("fkc_cfg_digits", FKCCFGDigitsConfig)
def run(ex: FKCCFGDigitsConfig, ctx: harness.Context) -> None:
    tr.quiet_checkpoint_logging()
    key = ctx.key
    schedule = LinearSchedule()
    split = load_digits_split()
    (unet, classifier), cached = trained_digits_models(seed=ctx.seed, split=split, smoke=ctx.smoke)
    ctx.metric("cache_hit", float(all(c.hit for c in cached.values())))
    judge = digits_judge(classifier, cached["classifier"].params)
    resample_fn = get_resampler(ex.resampler)
    rows = []
    for gw in ex.guidance_weights:
        sampler = _sampler(unet, cached["unet"].params, schedule, ex, gw, resample_fn)
        ref = reference_moments(judge, split, ex.classes, gw)
        ctx.metric(f"w{gw:g}.reference_ess_fraction", ref[2])
        fds = {}
        for method, weighted in (("fkc", True), ("naive_cfg", False)):
            prefix = f"w{gw:g}.{method}"
            t0 = time.perf_counter()
            xs, ws, resamples, ess = [], [], [], []
            for c in ex.classes:
                out = sampler(jax.random.fold_in(key, c), jnp.int32(c), jnp.asarray(weighted))
                xs.append(out[0])
                ws.append(np.exp(np.asarray(out[1], np.float64)) / len(ex.classes))
                resamples.append(int(out[2]))
                ess.append(float(out[3]))
            x = jnp.concatenate(xs)
            fds[method] = _evaluate(ctx, prefix, judge, ex, x, np.concatenate(ws), ref)
            ctx.metric(f"{prefix}.seconds", time.perf_counter() - t0)
            if weighted:
                ctx.metric(f"{prefix}.resamples_per_run", float(np.mean(resamples)))
                ctx.metric(f"{prefix}.final_ess_fraction", float(np.mean(ess)))
            first = np.asarray(systematic_resample(jax.random.fold_in(key, 99), np.log(ws[0]), 8))
            rows.append((f"w={gw:g} {method}", fds[method], np.asarray(xs[0])[first]))
        ctx.claim(
            f"w={gw:g}: FD to π_w, fkc < naive CFG / {ex.improvement:g}",
            fds["fkc"],
            fds["naive_cfg"] / ex.improvement,
        )
    size = (5, 0.9 * len(rows) + 0.5)
    with ctx.figure("fkc_cfg_digits.png", len(rows), 1, figsize=size) as (fig, axes):
        _draw(axes[:, 0], rows, ex)


def _draw(axes, rows, ex: FKCCFGDigitsConfig) -> None:
    for ax, (title, fd, x) in zip(axes, rows, strict=True):
        ax.imshow(x[..., 0].transpose(1, 0, 2).reshape(8, -1), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_title(f"{title}: FD {fd:.2f} (class {ex.classes[0]})", fontsize=8)
        ax.axis("off")
