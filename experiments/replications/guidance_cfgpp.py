"""Replication: CFG++ vs CFG with DDIM on the learned class-conditional 2-D toy model.

Chung et al. (2025) claim that CFG's extrapolated denoised estimate x̂₀^ω = x̂₀_u + ω(x̂₀_c − x̂₀_u)
leaves the data manifold, and that CFG++ (interpolate x̂₀ with λ ∈ [0, 1], re-noise with the
unconditional ε̂_u) stays on it; at equal guidance strength this gives better samples and a DDIM
inversion that reconstructs better.

Setup: the `train_toy` ScoreMLP (8 Gaussians N(c_k, 0.5² I) on a circle of radius 4, null label
8), 50-step DDIM (η = 0) on a uniform grid, labels uniform over the 8 classes. Ground truth for
label k is N(c_k, 0.5² I). Equal strength: one DDIM step of CFG++ with λ *is* one DDIM step of
CFG with ω_t = λ σ̃_t/(σ̃_t − σ̃_s) (`cfg_pp_equivalent_scale`); CFG is run at the constant
ω̄(λ) = mean of ω_t over the grid. The paper's nominal pairing (λ ∈ [0, 1] ~ ω ∈ [1, 12.5], i.e.
ω = 1 + 11.5 λ) is reported as well. For each λ:

- off-manifold error of the denoised estimates along the trajectory: mean over steps and
  samples of the distance of the guided x̂₀ to the nearest mode centre;
- samples: energy distance to the conditional ground truth, outward (radial) shift, distance
  to the nearest mode;
- DDIM inversion of ground-truth points x₀ → x_T with the guided predictor, regeneration with
  the same guidance, RMSE ‖x̂₀ − x₀‖.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import MISSING

from feynkit.core import LinearSchedule
from feynkit.experiments import harness
from feynkit.experiments import train as tr
from feynkit.experiments.data import circle_centers
from feynkit.experiments.metrics import energy_distance
from feynkit.experiments.zoo import trained_toy_model
from feynkit.inference.diffusion.guidance import (
    cfg,
    cfg_pp,
    cfg_pp_equivalent_scale,
    guided_ddim_inversion,
)
from feynkit.inference.diffusion.prediction import as_denoiser
from feynkit.inference.diffusion.sampler import sample, time_grid
from feynkit.inference.diffusion.solvers import ddim

NUM_MODES, RADIUS, SCALE = 8, 4.0, 0.5


@dataclasses.dataclass
class GuidanceCFGppConfig(harness.ReplicationConfig):
    """Schema of `configs/experiment/guidance_cfgpp.yaml` (the values live there)."""

    lambdas: list[float] = MISSING
    num_samples: int = MISSING
    num_steps: int = MISSING
    t_min: float = MISSING
    nominal_slope: float = MISSING  # the paper's pairing ω = 1 + slope · λ (λ=1 ~ ω=12.5)
    offmanifold_ratio: float = MISSING  # claim: CFG++ x̂₀ off-manifold error < ratio · CFG's

    def __post_init__(self):
        harness.require(
            bool(self.lambdas) and all(0.0 < v <= 1.0 for v in self.lambdas),
            "lambdas",
            f"must be non-empty and in (0, 1], got {list(self.lambdas)}.",
        )
        harness.require(
            self.nominal_slope > 0, "nominal_slope", f"must be > 0, got {self.nominal_slope}."
        )
        harness.require(self.num_steps >= 2, "num_steps", f"must be ≥ 2, got {self.num_steps}.")


def toy_metrics(x, labels, gt) -> dict[str, float]:
    """Energy distance to ground truth, radial shift along c_y/|c_y|, distance to nearest mode."""
    centers = circle_centers(NUM_MODES, RADIUS)
    c = centers[labels]
    radial = jnp.sum((x - c) * c, -1) / RADIUS
    dist = jnp.min(jnp.linalg.norm(x[:, None, :] - centers[None], axis=-1), axis=1)
    return {
        "energy_distance": float(energy_distance(x, gt)),
        "radial_shift": float(jnp.mean(radial)),
        "mode_distance": float(jnp.mean(dist)),
    }


def _runner(model_fn, schedule, ts, labels, null):
    denoise = as_denoiser(model_fn, schedule)
    centers = circle_centers(NUM_MODES, RADIUS)
    kw = dict(cond={"label": labels}, uncond={"label": null})

    @functools.partial(jax.jit, static_argnames="plus_plus")
    def run(key, scale, x0_data, plus_plus):
        guidance = cfg_pp(scale) if plus_plus else cfg(scale)
        x_init = jax.random.normal(key, x0_data.shape)
        solver = ddim(schedule, 0.0)
        x, info = sample(
            key, solver, model_fn, x_init, ts, guidance=guidance, **kw, return_trajectory=True
        )

        def offmanifold(xt, t):  # the guided x̂₀ this method forms at (x_t, t)
            pc, pu = denoise(xt, t, label=labels), denoise(xt, t, label=null)
            x0 = pu.x0 + scale * (pc.x0 - pu.x0)
            return jnp.mean(jnp.min(jnp.linalg.norm(x0[:, None] - centers[None], axis=-1), 1))

        off = jnp.mean(jax.vmap(offmanifold)(info.trajectory[:-1], ts[:-1]))
        x_T, _ = guided_ddim_inversion(model_fn, x0_data, ts, schedule, guidance=guidance, **kw)
        rec, _ = sample(key, solver, model_fn, x_T, ts, guidance=guidance, **kw)
        rmse = jnp.sqrt(jnp.mean(jnp.sum((rec - x0_data) ** 2, -1)))
        return x, off, rmse

    return run


@harness.replication("guidance_cfgpp", GuidanceCFGppConfig)
def run(ex: GuidanceCFGppConfig, ctx: harness.Context) -> None:
    tr.quiet_checkpoint_logging()
    key = ctx.key
    schedule = LinearSchedule()
    model, cached = trained_toy_model(seed=ctx.seed, smoke=ctx.smoke)
    ctx.metric("cache_hit", float(cached.hit))
    params = cached.params

    def model_fn(x, t, label):
        return model.forward(params, x, t, label)

    n = ex.num_samples
    k_lab, k_gt, k_data, k_run = jax.random.split(key, 4)
    labels = jax.random.randint(k_lab, (n,), 0, NUM_MODES)
    null = jnp.full((n,), NUM_MODES)
    centers = circle_centers(NUM_MODES, RADIUS)
    gt = centers[labels] + SCALE * jax.random.normal(k_gt, (n, 2))
    data = centers[labels] + SCALE * jax.random.normal(k_data, (n, 2))  # points to invert
    ts = time_grid(ex.num_steps, 1.0, ex.t_min, "uniform", schedule)
    runner = _runner(model_fn, schedule, ts, labels, null)
    omega_per_lambda = float(jnp.mean(cfg_pp_equivalent_scale(schedule, ts[:-1], ts[1:], 1.0)))
    ctx.metric("equivalent_omega_per_lambda", omega_per_lambda)

    x, off, rmse = runner(k_run, 1.0, data, False)
    for k, v in toy_metrics(x, labels, gt).items():
        ctx.metric(f"conditional.{k}", v)
    ctx.metric("conditional.inversion_rmse", rmse)
    rows, shown = [], {}
    for lam in ex.lambdas:
        omega = lam * omega_per_lambda
        runs = {
            "cfgpp": (lam, True),
            "cfg": (omega, False),
            "cfg_nominal": (1.0 + ex.nominal_slope * lam, False),
        }
        row = {}
        for method, (scale, pp) in runs.items():
            x, off, rmse = runner(k_run, jnp.float32(scale), data, pp)
            m = toy_metrics(x, labels, gt)
            m.update(x0_offmanifold=float(off), inversion_rmse=float(rmse), scale=float(scale))
            for k, v in m.items():
                ctx.metric(f"lambda{lam:g}.{method}.{k}", v)
            row[method] = m
            if lam == ex.lambdas[len(ex.lambdas) // 2]:
                shown[f"{method} (scale {scale:.2f})"] = np.asarray(x)
        rows.append(row)

    ratio = max(r["cfgpp"]["x0_offmanifold"] / r["cfg"]["x0_offmanifold"] for r in rows)
    ctx.claim(
        f"x̂₀ off-manifold error: CFG++ < {ex.offmanifold_ratio:g} · CFG (worst λ)",
        ratio,
        ex.offmanifold_ratio,
    )
    for key_, what in (
        ("energy_distance", "energy distance to p(x|c)"),
        ("inversion_rmse", "inversion→regeneration RMSE"),
    ):
        pp = float(np.mean([r["cfgpp"][key_] for r in rows]))
        base = float(np.mean([r["cfg"][key_] for r in rows]))
        ctx.claim(f"{what}: CFG++ < CFG at equal strength (mean over λ)", pp, base)
    with ctx.figure("guidance_cfgpp.png", 1, 2 + len(shown)) as (fig, axes):
        _draw(axes[0], rows, ex, shown, np.asarray(labels))


def _draw(axes, rows, ex, shown, labels) -> None:
    lam = ex.lambdas
    panels = (("x0_offmanifold", "x̂₀ distance to manifold"), ("inversion_rmse", "inversion RMSE"))
    for ax, (k, title) in zip(axes[:2], panels, strict=True):
        for method in ("cfg", "cfgpp", "cfg_nominal"):
            ax.plot(lam, [r[method][k] for r in rows], "o-", label=method)
        ax.set_xlabel("λ (CFG at the equivalent ω)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    for ax, (name, x) in zip(axes[2:], shown.items(), strict=False):
        ax.scatter(x[:, 0], x[:, 1], s=2, c=labels, cmap="tab10")
        ax.set_title(name, fontsize=9)
        ax.set_xlim(-7, 7)
        ax.set_ylim(-7, 7)
        ax.set_aspect("equal")
