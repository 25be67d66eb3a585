"""Replication: exact diffusion inversion with BDIA-DDIM on trained models, vs DDIM inversion.

Claim (Zhang, Lewis & Kleijn 2024): BDIA-DDIM's update is algebraically invertible, so inverting
data x₀ to noise and regenerating reproduces x₀ up to round-off, where DDIM inversion (which
evaluates ε̂ at the wrong end of each step) does not.

Models: the `train_toy` class-conditional ScoreMLP (2-D mixture of 8 Gaussians; data points
conditioned on their own labels) and, unless disabled, the `train_digits` class-conditional UNet
(held-out 8x8 digits with their labels); ε-prediction on the linear VP schedule, a uniform grid
from t = 1 to t_min. For each: max and RMS error of x₀ → invert → regenerate (BDIA with γ and
with a smaller γ, for which the inverse recursion is unstable, and DDIM), and of
x_T → sample → invert (BDIA and DDIM), all in float32.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import MISSING

from feynkit.core.schedules import LinearSchedule
from feynkit.experiments import harness
from feynkit.experiments import train as tr
from feynkit.experiments.data import gaussian_mixture_2d, load_digits_split
from feynkit.inference.diffusion import ddim, sample, time_grid
from feynkit.inference.diffusion.bdia import bdia_invert, bdia_sample
from feynkit.inference.diffusion.guidance import guided_ddim_inversion


@dataclasses.dataclass
class BDIAInversionConfig(harness.ReplicationConfig):
    """Schema of `configs/experiment/bdia_inversion.yaml` (the values live there)."""

    num_steps: int = MISSING
    t_min: float = MISSING
    gamma: float = MISSING
    unstable_gamma: float = MISSING  # reported: inverse recursion amplifies round-off ~ γ^(−N/2)
    num_toy_points: int = MISSING
    digits: bool = MISSING
    num_digits: int = MISSING
    max_bdia_error: float = MISSING  # claim: BDIA reconstruction max error (float32)
    ddim_factor: float = MISSING  # claim: DDIM reconstruction error > factor × BDIA's

    def __post_init__(self):
        harness.require(self.gamma > 0, "gamma", f"must be > 0, got {self.gamma}.")
        harness.require(
            self.unstable_gamma > 0, "unstable_gamma", f"must be > 0, got {self.unstable_gamma}."
        )
        harness.require(self.num_steps >= 2, "num_steps", "must be >= 2.")
        harness.require(0 < self.t_min < 1, "t_min", f"must lie in (0, 1), got {self.t_min}.")
        harness.require(self.num_toy_points >= 1, "num_toy_points", "must be >= 1.")
        harness.require(self.num_digits >= 1, "num_digits", "must be >= 1.")


def _errors(a, b) -> tuple[float, float]:
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return float(np.abs(d).max()), float(np.sqrt(np.mean(d**2)))


def _round_trips(eps, schedule, x0, x_T, ts, gamma, unstable_gamma, cond):
    """Errors of the four round trips, all in one compiled function."""
    kw = {"cond": cond}

    def recon(g):
        z0, z1, _ = bdia_invert(eps, schedule, x0, ts, g, **kw)
        return bdia_sample(eps, schedule, z0, ts, g, x_next=z1, **kw)[0]

    xs, xs_prev, _ = bdia_sample(eps, schedule, x_T, ts, gamma, **kw)
    back = bdia_invert(eps, schedule, xs, ts, gamma, x_next=xs_prev, **kw)[0]
    d_lat, _ = guided_ddim_inversion(eps, x0, ts, schedule, **kw)
    d_regen, _ = sample(jax.random.key(0), ddim(schedule), eps, d_lat, ts, **kw)
    d_xs, _ = sample(jax.random.key(0), ddim(schedule), eps, x_T, ts, **kw)
    d_back, _ = guided_ddim_inversion(eps, d_xs, ts, schedule, **kw)
    return {
        "bdia.recon": recon(gamma),
        "bdia_unstable_gamma.recon": recon(unstable_gamma),
        "ddim.recon": d_regen,
        "bdia.sample_invert": back,
        "ddim.sample_invert": d_back,
    }


def _evaluate(res, prefix, eps, schedule, x0, labels, key, ex) -> dict:
    ts = time_grid(ex.num_steps, 1.0, ex.t_min)
    x_T = jax.random.normal(key, x0.shape, x0.dtype)
    t0 = time.perf_counter()
    out = jax.jit(_round_trips, static_argnums=(0, 1, 5, 6))(
        eps, schedule, x0, x_T, ts, ex.gamma, ex.unstable_gamma, {"label": labels}
    )
    errs = {}
    for name, value in out.items():
        target = x_T if name.endswith("sample_invert") else x0
        mx, rms = _errors(value, target)
        errs[name] = res.metric(f"{prefix}.{name}.max_error", mx)
        res.metric(f"{prefix}.{name}.rms_error", rms)
    res.metric(f"{prefix}.seconds", time.perf_counter() - t0)
    res.claim(f"{prefix}: BDIA invert→regenerate max error", errs["bdia.recon"], ex.max_bdia_error)
    res.claim(
        f"{prefix}: BDIA sample→invert max error", errs["bdia.sample_invert"], ex.max_bdia_error
    )
    res.claim(
        f"{prefix}: DDIM invert→regenerate max error > {ex.ddim_factor:g} × BDIA's",
        errs["ddim.recon"],
        ex.ddim_factor * errs["bdia.recon"],
        ">",
    )
    return {k: np.asarray(v) for k, v in out.items()}


@harness.replication("bdia_inversion", BDIAInversionConfig)
def run(ex: BDIAInversionConfig, ctx: harness.Context) -> None:
    from feynkit.experiments.zoo import trained_toy_model

    tr.quiet_checkpoint_logging()
    res = ctx
    key = ctx.key
    schedule = LinearSchedule()

    model, cached = trained_toy_model(seed=ctx.seed, smoke=ctx.smoke)
    toy_eps = lambda x, t, label, p=cached.params: model.forward(p, x, t, label)
    x0, labels = gaussian_mixture_2d(jax.random.fold_in(key, 0), ex.num_toy_points)
    toy = _evaluate(res, "toy", toy_eps, schedule, x0, labels, jax.random.fold_in(key, 1), ex)
    plot_data = {"toy": (np.asarray(x0), toy)}

    if ex.digits:
        from feynkit.experiments.zoo import trained_digits_models

        split = load_digits_split()
        (unet, _), cached_d = trained_digits_models(seed=ctx.seed, split=split, smoke=ctx.smoke)
        params = cached_d["unet"].params
        digits_eps = lambda x, t, label, p=params: unet.forward(p, x, t, label)
        n = min(ex.num_digits, len(split.x_test))
        xd = jnp.asarray(split.x_test[:n])
        yd = jnp.asarray(split.y_test[:n])
        digits = _evaluate(
            res, "digits", digits_eps, schedule, xd, yd, jax.random.fold_in(key, 2), ex
        )
        plot_data["digits"] = (np.asarray(xd), digits)
    ncols = 3 if "digits" in plot_data else 2
    with ctx.figure("bdia_inversion.png", 1, ncols, figsize=(4.2 * ncols, 4)) as (fig, axes):
        _draw(plot_data, axes[0])


def _draw(plot_data, axes) -> None:
    x0, out = plot_data["toy"]
    for ax, (name, title) in zip(
        axes[:2], (("bdia.recon", "BDIA"), ("ddim.recon", "DDIM")), strict=True
    ):
        ax.scatter(x0[:, 0], x0[:, 1], s=4, c="k", label="x0")
        ax.scatter(out[name][:, 0], out[name][:, 1], s=4, c="C1", alpha=0.6, label="regenerated")
        mx = np.abs(out[name] - x0).max()
        ax.set_title(f"toy: {title} invert→regenerate, max err {mx:.1e}", fontsize=9)
        ax.set_aspect("equal")
        ax.legend(fontsize=7)
    if "digits" in plot_data:
        xd, outd = plot_data["digits"]
        rows = [xd[:8], outd["bdia.recon"][:8], outd["ddim.recon"][:8]]
        grid = np.concatenate([np.concatenate([im[..., 0] for im in r], axis=1) for r in rows], 0)
        axes[2].imshow(np.clip(grid, -1, 1), cmap="gray")
        axes[2].set_title("digits: data / BDIA / DDIM round trip", fontsize=9)
        axes[2].set_axis_off()
