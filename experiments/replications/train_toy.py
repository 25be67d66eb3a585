"""Training: a class-conditional ScoreMLP on the 2-D mixture of 8 Gaussians on a circle.

The network (`zoo.trained_toy_model`) is trained by denoising score matching (ε-prediction,
linear VP schedule, labels dropped to the null label 10% of the time, on fresh draws every step)
and sampled through `diffusion.sample` with `diffusion.euler_maruyama`, the discretisation of the
reverse SDE

    dx = [f(t) x − g(t)² s_θ(x, t, y)] dt + g(t) dW̄,   s_θ = −ε_θ/σ_t,   t: 1 → t_min,

finished by one Tweedie denoising step x₀ ≈ (x − σ ε_θ)/α. Claims: the energy distance of
class-conditional samples (labels uniform) to fresh data is below a bound and below that of a
moment-matched Gaussian; samples with label k land in mode k.
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
from feynkit.experiments.data import circle_centers, gaussian_mixture_2d
from feynkit.experiments.metrics import energy_distance, mode_weights
from feynkit.inference import diffusion


@dataclasses.dataclass
class TrainToyConfig(harness.ReplicationConfig, zoo.ToyModelConfig):
    """Schema of `configs/experiment/train_toy.yaml`: the model fields of `zoo.ToyModelConfig`
    (which define the cached model) and the evaluation; the values live in the YAML."""

    num_samples: int = MISSING
    sampler_steps: int = MISSING
    max_energy_distance: float = MISSING  # claim: energy distance of samples to data below this
    min_mode_accuracy: float = MISSING  # claim: label-k samples nearest to centre k
    baseline_factor: float = MISSING  # claim: energy distance < moment-matched Gaussian's / this

    def __post_init__(self):
        harness.require(self.num_samples >= 2, "num_samples", "must be >= 2.")
        harness.require(self.sampler_steps >= 1, "sampler_steps", "must be >= 1.")
        harness.require(self.num_modes >= 1, "num_modes", "must be >= 1.")
        harness.require(0.0 < self.t_min < 1.0, "t_min", f"must lie in (0, 1), got {self.t_min}.")
        harness.require(self.baseline_factor > 0, "baseline_factor", "must be > 0.")


@harness.replication("train_toy", TrainToyConfig)
def run(ex: TrainToyConfig, ctx: harness.Context) -> None:
    """Train (or load) the zoo's toy model and score its Euler–Maruyama samples.

    With ``smoke=true`` the model is the zoo's smoke model (`zoo.TOY_SMOKE`), the one every
    smoke run shares; the YAML's ``smoke_overrides`` shrink the evaluation.
    """
    tr.quiet_checkpoint_logging()
    res = ctx
    key = ctx.key
    schedule = LinearSchedule()
    model, cached = zoo.trained_toy_model(ex, ctx.seed, smoke=ctx.smoke)
    params = cached.params
    save_checkpoint(ctx.out_dir / "checkpoints" / "score_mlp", 0, params)
    res.metric("cache_hit", float(cached.hit))
    history = cached.info.get("history", [])
    if history:
        res.metric("final_train_loss", history[-1][1])
    if "train_seconds" in cached.info:
        res.metric("train_seconds", cached.info["train_seconds"])

    n = ex.num_samples

    solver = diffusion.euler_maruyama(schedule)
    ts = diffusion.time_grid(ex.sampler_steps, 1.0, ex.t_min)

    @jax.jit
    def sample(params, key, labels):
        """Euler–Maruyama from x₁ ~ N(0, I) to t_min, then Tweedie's x̂₀ (`denoise_final`)."""
        k_init, k_steps = jax.random.split(key)
        x, _ = diffusion.sample(
            k_steps,
            solver,
            lambda x, t, label: model.forward(params, x, t, label),
            jax.random.normal(k_init, (n, 2)),
            ts,
            cond={"label": labels},
            denoise_final=True,
        )
        return x

    k_data, k_ref, k_lab, k_cond, k_uncond, k_base = jax.random.split(jax.random.fold_in(key, 2), 6)
    data, _ = gaussian_mixture_2d(k_data, n, ex.num_modes, ex.radius, ex.scale)
    ref, _ = gaussian_mixture_2d(k_ref, n, ex.num_modes, ex.radius, ex.scale)
    labels = jax.random.randint(k_lab, (n,), 0, ex.num_modes)
    t0 = time.perf_counter()
    cond = jax.block_until_ready(sample(params, k_cond, labels))
    res.metric("sample_seconds", time.perf_counter() - t0)
    uncond = sample(params, k_uncond, jnp.full_like(labels, ex.num_modes))

    ref_np = np.asarray(ref, np.float64)
    chol = np.linalg.cholesky(np.cov(ref_np, rowvar=False))
    z = np.asarray(jax.random.normal(k_base, (n, 2)), np.float64)
    gauss = jnp.asarray(ref_np.mean(0)[None, :] + z @ chol.T, jnp.float32)
    ed = {
        "conditional": energy_distance(cond, data),
        "unconditional": energy_distance(uncond, data),
        "data_floor": energy_distance(ref, data),
        "baseline_gaussian": energy_distance(gauss, data),
        "baseline_standard_normal": energy_distance(jax.random.normal(k_base, (n, 2)), data),
    }
    for name, value in ed.items():
        res.metric(f"energy_distance.{name}", value)
    centers = circle_centers(ex.num_modes, ex.radius)
    nearest = jnp.argmin(jnp.sum((cond[:, None, :] - centers[None]) ** 2, -1), axis=1)
    accuracy = res.metric("mode_accuracy", jnp.mean(nearest == labels))
    weights = mode_weights(uncond, centers)
    res.metric("unconditional_mode_weight_min", weights.min())
    res.metric("unconditional_mode_weight_max", weights.max())

    res.claim(
        "energy distance (conditional samples, data) < bound",
        ed["conditional"],
        ex.max_energy_distance,
    )
    res.claim(
        f"energy distance < moment-matched Gaussian's / {ex.baseline_factor:g}",
        ed["conditional"],
        float(ed["baseline_gaussian"]) / ex.baseline_factor,
    )
    res.claim("label-k samples in mode k", accuracy, ex.min_mode_accuracy, ">")
    _plot(ctx, data, cond, labels, uncond, history)


def _plot(ctx: harness.Context, data, cond, labels, uncond, history) -> None:
    with ctx.figure("train_toy.png", 1, 4, size=3.5) as (fig, axes):
        _draw(axes[0], data, cond, labels, uncond, history)


def _draw(axes, data, cond, labels, uncond, history) -> None:
    panels = [
        ("fresh data", np.asarray(data), None),
        ("conditional samples", np.asarray(cond), np.asarray(labels)),
        ("unconditional (null label)", np.asarray(uncond), None),
    ]
    for ax, (title, pts, c) in zip(axes, panels, strict=False):
        ax.scatter(
            pts[:, 0], pts[:, 1], s=2, alpha=0.5, c=c, cmap="tab10" if c is not None else None
        )
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-6, 6)
        ax.set_ylim(-6, 6)
        ax.set_aspect("equal")
    if history:
        steps, losses = zip(*((h[0], h[1]) for h in history), strict=True)
        axes[3].plot(steps, losses)
        axes[3].set_yscale("log")
    axes[3].set_title("training loss (per chunk)", fontsize=9)
    axes[3].set_xlabel("step")
