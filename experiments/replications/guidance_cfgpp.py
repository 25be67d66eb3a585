"""Replication: CFG++ vs CFG with DDIM — adherence/diversity trade-off curves on an exact target.

Chung et al. (2025) claim that CFG's extrapolated x̂₀^ω = x̂₀_u + ω(x̂₀_c − x̂₀_u) leaves the data
manifold, and that CFG++ (interpolate x̂₀ with λ ∈ [0, 1], re-noise with the unconditional ε̂_u)
stays on it: over the paper's ranges (λ ∈ [0, 1] against ω ∈ [1, 12.5]) CFG++ gives a better
trade-off of condition adherence against sample quality/diversity, and a DDIM inversion that
reconstructs better.

Under DDIM one CFG++ step with λ *is* a CFG step with the time-varying ω_t = λσ̃_t/(σ̃_t − σ̃_s),
so pairing λ with any single ω only tests a schedule. Instead both methods are swept over their
whole ranges and compared as curves, at matched adherence:

- target: the exact 2-D Gaussian mixture of `fkc_gmm`'s CFG case (p(x) = 4 components, the
  class c = components 0 and 1, p(c) = 1/2), exact ε for both branches (no learned model), so
  adherence is the exact posterior p(c | x) and the guided family p(x|c)^w p(x)^(1−w) is sampled
  exactly (rejection sampling) as a reference curve;
- per run (DDIM, η = 0, `num_steps`, same noise): adherence = mean p(c | x₀); recall and
  precision (k-NN manifolds, Kynkäänniemi et al. 2019) against exact draws of p(x | c);
  x̂₀ off-manifold error along the trajectory (mean −log p_data of the guided x̂₀, data density
  at t_min);
- at matched adherence: each CFG++ λ is paired with the ω whose adherence is equal
  (interpolated on the ω sweep, then run), and DDIM inversion x₀ → x_T → x̂₀ of exact p(x|c)
  draws is compared by RMSE.

Claims (the paper's, on this target): at matched adherence CFG++'s recall ≥ CFG's (mean over
the matched λ) and its inversion RMSE lower than CFG's.
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
from feynkit.inference.diffusion.guidance import cfg, cfg_pp, guided_ddim_inversion
from feynkit.inference.diffusion.prediction import as_denoiser
from feynkit.inference.diffusion.sampler import sample, time_grid
from feynkit.inference.diffusion.solvers import ddim
from feynkit.models import GaussianMixture, sample_guided

UNCOND = GaussianMixture.create(
    [0.25] * 4, [[-2.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, -2.0]], scales=0.8
)
COND = UNCOND.select([0, 1])
COND_MASS = 0.5


@dataclasses.dataclass
class GuidanceCFGppConfig(harness.ReplicationConfig):
    """Schema of `configs/experiment/guidance_cfgpp.yaml` (the values live there)."""

    lambdas: list[float] = MISSING  # CFG++ sweep, in [0, 1]
    omegas: list[float] = MISSING  # CFG sweep (the paper's [1, 12.5])
    num_samples: int = MISSING
    num_steps: int = MISSING
    t_min: float = MISSING
    recall_k: int = MISSING  # k of the k-NN manifolds of precision/recall

    def __post_init__(self):
        harness.require(
            bool(self.lambdas) and all(0.0 <= v <= 1.0 for v in self.lambdas),
            "lambdas",
            f"must be non-empty and in [0, 1], got {list(self.lambdas)}.",
        )
        harness.require(
            len(self.omegas) >= 2 and all(v >= 1.0 for v in self.omegas),
            "omegas",
            f"needs >= 2 weights >= 1, got {list(self.omegas)}.",
        )
        harness.require(self.num_steps >= 2, "num_steps", f"must be ≥ 2, got {self.num_steps}.")
        harness.require(self.recall_k >= 1, "recall_k", f"must be ≥ 1, got {self.recall_k}.")


def posterior(x, schedule, t) -> jax.Array:
    """Exact p(c | x) at time t."""
    c, u = COND.marginal(schedule, t), UNCOND.marginal(schedule, t)
    return jnp.exp(jnp.log(COND_MASS) + c.log_prob(x) - u.log_prob(x))


def _knn_radius(x, k):
    d = jnp.linalg.norm(x[:, None] - x[None], axis=-1)
    return jnp.sort(d, axis=1)[:, k]  # column 0 is the point itself


def precision_recall(fake, real, k: int) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls."""
    r_real, r_fake = _knn_radius(real, k), _knn_radius(fake, k)
    d = jnp.linalg.norm(fake[:, None] - real[None], axis=-1)  # (n_fake, n_real)
    precision = jnp.mean(jnp.any(d <= r_real[None], axis=1))
    recall = jnp.mean(jnp.any(d <= r_fake[:, None], axis=0))
    return float(precision), float(recall)


def _model(schedule):
    def model_fn(x, t, label):
        g_c = COND.marginal(schedule, t[0])
        g_u = UNCOND.marginal(schedule, t[0])
        s = jnp.where(label[:, None] == 1, g_c.score(x), g_u.score(x))
        return -schedule.sigma(t[0]) * s

    return model_fn


def _runner(schedule, ts, n):
    model_fn = _model(schedule)
    denoise = as_denoiser(model_fn, schedule)
    kw = dict(cond={"label": jnp.ones(n, jnp.int32)}, uncond={"label": jnp.zeros(n, jnp.int32)})
    data = UNCOND.marginal(schedule, ts[-1])

    @functools.partial(jax.jit, static_argnames="plus_plus")
    def run(key, scale, x0_data, plus_plus):
        guidance = cfg_pp(scale) if plus_plus else cfg(scale)
        x_init = jax.random.normal(key, x0_data.shape)
        solver = ddim(schedule, 0.0)
        x, info = sample(
            key, solver, model_fn, x_init, ts, guidance=guidance, **kw, return_trajectory=True
        )

        def offmanifold(xt, t):  # −log p_data of the guided x̂₀ this method forms
            pc, pu = denoise(xt, t, **kw["cond"]), denoise(xt, t, **kw["uncond"])
            x0 = pu.x0 + scale * (pc.x0 - pu.x0)
            return -jnp.mean(data.log_prob(x0))

        off = jnp.mean(jax.vmap(offmanifold)(info.trajectory[:-1], ts[:-1]))
        x_T, _ = guided_ddim_inversion(model_fn, x0_data, ts, schedule, guidance=guidance, **kw)
        rec, _ = sample(key, solver, model_fn, x_T, ts, guidance=guidance, **kw)
        rmse = jnp.sqrt(jnp.mean(jnp.sum((rec - x0_data) ** 2, -1)))
        return x, off, rmse

    return run


def _matched(adherence: float, adh: np.ndarray, omegas: np.ndarray) -> float | None:
    """The ω whose adherence equals `adherence` (linear interpolation on the ω sweep, which
    is increasing in ω), or None outside the sweep's range."""
    order = np.argsort(adh)
    a, w = adh[order], omegas[order]
    if not a[0] <= adherence <= a[-1]:
        return None
    return float(np.interp(adherence, a, w))


@harness.replication("guidance_cfgpp", GuidanceCFGppConfig)
def run(ex: GuidanceCFGppConfig, ctx: harness.Context) -> None:
    key = ctx.key
    schedule = LinearSchedule()
    n = ex.num_samples
    k_real, k_data, k_run, k_tilt = jax.random.split(key, 4)
    ts = time_grid(ex.num_steps, 1.0, ex.t_min, "uniform", schedule)
    c_m, u_m = COND.marginal(schedule, ex.t_min), UNCOND.marginal(schedule, ex.t_min)
    real = c_m.sample(k_real, n)  # exact p(x | c): the recall reference
    data = c_m.sample(k_data, n)  # exact p(x | c): the points to invert
    runner = _runner(schedule, ts, n)

    def metrics(x):
        prec, rec = precision_recall(x, real, ex.recall_k)
        return {
            "adherence": float(jnp.mean(posterior(x, schedule, ex.t_min))),
            "precision": prec,
            "recall": rec,
        }

    curves = {"cfgpp": [], "cfg": [], "exact_tilted": []}
    for lam in ex.lambdas:
        x, off, rmse = runner(k_run, jnp.float32(lam), data, True)
        m = metrics(x) | {"x0_offmanifold": float(off), "inversion_rmse": float(rmse)}
        ctx.metrics(m, f"cfgpp.lambda{lam:g}.")
        curves["cfgpp"].append(m)
    for w in ex.omegas:
        x, off, rmse = runner(k_run, jnp.float32(w), data, False)
        m = metrics(x) | {"x0_offmanifold": float(off), "inversion_rmse": float(rmse)}
        ctx.metrics(m, f"cfg.omega{w:g}.")
        curves["cfg"].append(m)
        exact = sample_guided(jax.random.fold_in(k_tilt, int(100 * w)), c_m, u_m, w, COND_MASS, n)
        m = metrics(exact)
        ctx.metrics(m, f"exact_tilted.w{w:g}.")
        curves["exact_tilted"].append(m)
    # the floor of recall/precision: exact p(x|c) draws of the same size
    ctx.metrics(metrics(c_m.sample(jax.random.fold_in(k_real, 1), n)), "exact_conditional.")

    adh_cfg = np.array([m["adherence"] for m in curves["cfg"]])
    omegas = np.asarray(ex.omegas, float)
    gaps, inv_pp, inv_cfg = [], [], []
    for lam, m in zip(ex.lambdas, curves["cfgpp"], strict=True):
        w = _matched(m["adherence"], adh_cfg, omegas)
        if w is None:
            ctx.metric(f"matched.lambda{lam:g}.outside_cfg_range", 1.0)
            continue
        x, off, rmse = runner(k_run, jnp.float32(w), data, False)
        mc = metrics(x)
        ctx.metric(f"matched.lambda{lam:g}.omega", w)
        ctx.metric(f"matched.lambda{lam:g}.cfg_adherence", mc["adherence"])
        ctx.metric(f"matched.lambda{lam:g}.cfg_recall", mc["recall"])
        ctx.metric(f"matched.lambda{lam:g}.cfg_precision", mc["precision"])
        ctx.metric(f"matched.lambda{lam:g}.cfg_inversion_rmse", float(rmse))
        ctx.metric(f"matched.lambda{lam:g}.recall_gap", m["recall"] - mc["recall"])
        gaps.append(m["recall"] - mc["recall"])
        inv_pp.append(m["inversion_rmse"])
        inv_cfg.append(float(rmse))
    ctx.metric("matched.count", len(gaps))
    if gaps:
        ctx.metric("matched.mean_recall_gap", float(np.mean(gaps)))
        ctx.metric("matched.cfgpp_inversion_rmse", float(np.mean(inv_pp)))
        ctx.metric("matched.cfg_inversion_rmse", float(np.mean(inv_cfg)))
        ctx.claim(
            "recall at matched adherence: CFG++ ≥ CFG (mean gap over matched λ)",
            float(np.mean(gaps)),
            0.0,
            ">=",
        )
        ctx.claim(
            "DDIM inversion RMSE at matched adherence: CFG++ < CFG (mean over matched λ)",
            float(np.mean(inv_pp)),
            float(np.mean(inv_cfg)),
        )
    with ctx.figure("guidance_cfgpp.png", 1, 2) as (fig, axes):
        _draw(axes[0], curves)


def _draw(axes, curves) -> None:
    for name, rows in curves.items():
        adh = [r["adherence"] for r in rows]
        axes[0].plot(adh, [r["recall"] for r in rows], "o-", label=name)
        axes[1].plot(adh, [r["precision"] for r in rows], "o-", label=name)
    for ax, what in zip(axes, ("recall", "precision"), strict=True):
        ax.set_xlabel("adherence E p(c | x)")
        ax.set_ylabel(what)
        ax.legend(fontsize=7)
