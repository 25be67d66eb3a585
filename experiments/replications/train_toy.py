"""Training: a class-conditional ScoreMLP on the 2-D mixture of 8 Gaussians on a circle.

The network is trained by denoising score matching (ε-prediction, linear VP schedule, labels
dropped to the null label 10% of the time, on fresh draws every step) and sampled with the
Euler–Maruyama discretisation of the reverse SDE

    dx = [f(t) x − g(t)² s_θ(x, t, y)] dt + g(t) dW̄,   s_θ = −ε_θ/σ_t,   t: 1 → t_min,

finished by one Tweedie denoising step x₀ ≈ (x − σ ε_θ)/α. Claims: the energy distance of
class-conditional samples (labels uniform) to fresh data is below a bound and below that of a
moment-matched Gaussian; samples with label k land in mode k.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from feynkit.core.checkpoint import save_checkpoint
from feynkit.core.schedules import LinearSchedule, VPSchedule
from feynkit.experiments import train as tr
from feynkit.experiments.data import circle_centers, gaussian_mixture_2d
from feynkit.experiments.metrics import energy_distance, mode_weights
from feynkit.experiments.replications import register
from feynkit.experiments.results import Results
from feynkit.models import ScoreMLP

CACHE_VERSION = 1  # bump when the training code changes what a config trains


@dataclasses.dataclass
class TrainToyConfig:
    name: str = "train_toy"
    cache_dir: str | None = None  # model cache (default $FEYNKIT_CACHE or ~/.cache/feynkit)
    # data: gaussian_mixture_2d
    num_modes: int = 8
    radius: float = 4.0
    scale: float = 0.5
    # model
    hidden: int = 128
    num_layers: int = 3
    time_features: int = 64
    # training
    steps: int = 3000
    batch_size: int = 512
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    label_dropout: float = 0.1
    t_min: float = 1e-3
    checkpoint_every: int = 1000
    # evaluation
    num_samples: int = 4000
    sampler_steps: int = 500
    max_energy_distance: float = 0.1  # claim: energy distance of samples to data below this
    min_mode_accuracy: float = 0.95  # claim: label-k samples nearest to centre k
    baseline_factor: float = 4.0  # claim: energy distance < moment-matched Gaussian's / this


SMOKE = dict(
    hidden=64,
    num_layers=2,
    steps=200,
    batch_size=256,
    num_samples=256,
    sampler_steps=50,
    checkpoint_every=200,
    max_energy_distance=0.5,
    min_mode_accuracy=0.5,
    baseline_factor=1.0,
)


def euler_maruyama_sample(
    key: jax.Array,
    eps_fn,
    shape: tuple[int, ...],
    schedule: VPSchedule,
    num_steps: int,
    t_min: float = 1e-3,
) -> jax.Array:
    """Reverse-SDE samples from ε-prediction ``eps_fn(x, t)`` (t a scalar), x₁ ~ N(0, I).

    x_{t−h} = x_t − [f(t) x_t + β(t) ε(x_t, t)/σ_t] h + sqrt(β(t) h) z on a uniform grid from 1
    to t_min, then x₀ = (x − σ ε(x, t_min))/α at t_min (Tweedie's denoiser).

    References:
      Song et al. (2021), "Score-Based Generative Modeling through Stochastic Differential
      Equations", eq. 6.
    """
    ts = jnp.linspace(1.0, t_min, num_steps + 1)
    k_init, k_steps = jax.random.split(key)

    def body(x, inputs):
        t, t_next, k = inputs
        h = t - t_next
        drift = schedule.drift_coef(t) * x + schedule.beta(t) * eps_fn(x, t) / schedule.sigma(t)
        noise = jnp.sqrt(schedule.beta(t) * h) * jax.random.normal(k, shape)
        return x - drift * h + noise, None

    x0 = jax.random.normal(k_init, shape)
    x, _ = jax.lax.scan(body, x0, (ts[:-1], ts[1:], jax.random.split(k_steps, num_steps)))
    return (x - schedule.sigma(t_min) * eps_fn(x, t_min)) / schedule.alpha(t_min)


def _model(ex: TrainToyConfig) -> ScoreMLP:
    return ScoreMLP(ex.hidden, ex.num_layers, ex.num_modes, ex.time_features)


def _defining_config(ex: TrainToyConfig, seed: int) -> dict:
    """What the trained parameters depend on (the cache key), not evaluation settings."""
    keep = (
        "num_modes radius scale hidden num_layers time_features steps batch_size "
        "learning_rate warmup_steps label_dropout t_min"
    ).split()
    return {
        "name": "train_toy-score_mlp",
        "version": CACHE_VERSION,
        "seed": seed,
        **{k: getattr(ex, k) for k in keep},
    }


def train_score_mlp(ex: TrainToyConfig, key: jax.Array, checkpoint_dir: Path | None):
    """Train the conditional ScoreMLP on fresh mixture draws; returns (params, info)."""
    model = _model(ex)
    params = model.init_params(jax.random.fold_in(key, 0), 2)
    loss_fn = tr.denoising_score_loss(
        model.forward, LinearSchedule(), ex.num_modes, ex.label_dropout, ex.t_min
    )

    def batch_fn(data, k, step):
        return gaussian_mixture_2d(k, ex.batch_size, ex.num_modes, ex.radius, ex.scale)

    optimizer = tr.make_optimizer(ex.learning_rate, ex.steps, ex.warmup_steps)
    t0 = time.perf_counter()
    state, history = tr.train(
        loss_fn,
        optimizer,
        params,
        batch_fn,
        jax.random.fold_in(key, 1),
        ex.steps,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=ex.checkpoint_every,
        log_every=100,
        steps_per_call=100,
        desc="score_mlp",
    )
    info = {"train_seconds": time.perf_counter() - t0, "history": history}
    return state.params, info


def trained_toy_model(
    ex: TrainToyConfig | None = None, seed: int = 0, smoke: bool = False
) -> tuple[ScoreMLP, tr.CachedModel]:
    """The `train_toy` conditional ScoreMLP and its parameters, from the model cache or trained.

    ε-prediction on the linear VP schedule; ``model.forward(params, x, t, label)`` with label
    ``None`` (or ``ex.num_modes``) for the unconditional branch. Replications of guidance
    methods share this model; `ex` defaults to the `train_toy` experiment's default config.
    """
    ex = TrainToyConfig() if ex is None else ex
    if smoke:
        ex = dataclasses.replace(ex, **SMOKE)
    cached = tr.cached_train(
        _defining_config(ex, seed),
        functools.partial(train_score_mlp, ex, jax.random.fold_in(jax.random.key(seed), 0)),
        directory=ex.cache_dir,
    )
    return _model(ex), cached


@register("train_toy", TrainToyConfig)
def run(cfg, out_dir: Path) -> Results:
    ex = tr.experiment_config(cfg, TrainToyConfig, SMOKE)
    tr.quiet_checkpoint_logging()
    res = Results("train_toy", cfg.seed)
    key = jax.random.key(cfg.seed)
    schedule = LinearSchedule()
    model, cached = trained_toy_model(ex, cfg.seed)
    params = cached.params
    save_checkpoint(Path(out_dir) / "checkpoints" / "score_mlp", ex.steps, params)
    res.metric("cache_hit", float(cached.hit))
    history = cached.info.get("history", [])
    if history:
        res.metric("final_train_loss", history[-1][1])
    if "train_seconds" in cached.info:
        res.metric("train_seconds", cached.info["train_seconds"])

    n = ex.num_samples

    @functools.partial(jax.jit, static_argnames="label_free")
    def sample(params, key, labels, label_free=False):
        def eps_fn(x, t):
            return model.forward(params, x, t, None if label_free else labels)

        return euler_maruyama_sample(key, eps_fn, (n, 2), schedule, ex.sampler_steps, ex.t_min)

    k_data, k_ref, k_lab, k_cond, k_uncond, k_base = jax.random.split(jax.random.fold_in(key, 2), 6)
    data, _ = gaussian_mixture_2d(k_data, n, ex.num_modes, ex.radius, ex.scale)
    ref, _ = gaussian_mixture_2d(k_ref, n, ex.num_modes, ex.radius, ex.scale)
    labels = jax.random.randint(k_lab, (n,), 0, ex.num_modes)
    t0 = time.perf_counter()
    cond = jax.block_until_ready(sample(params, k_cond, labels))
    res.metric("sample_seconds", time.perf_counter() - t0)
    uncond = sample(params, k_uncond, labels, label_free=True)

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
    res.figures.append(_plot(data, cond, labels, uncond, history, out_dir))
    return res


def _plot(data, cond, labels, uncond, history, out_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6))
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
    fig.tight_layout()
    path = Path(out_dir) / "train_toy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
