"""Replication: Feynman–Kac correctors on Gaussian-mixture targets with exact scores.

Claim (Skreta et al. 2025): reweighting the naive SDE (scaled score, summed scores, CFG) with the
FKC weights and resampling samples the intended target — p^β, p₁p₂, p_c^w p^(1−w) — while the
naive SDE does not; the error falls as particles grow.

For each variant and dimension the run draws ground truth exactly (a closed-form mixture for the
product, rejection samplers for the tempered and guided targets, all at t_min), runs the naive
SDE and FKC at each particle count over several seeds (one compile each), and reports
the weighted energy distance to the ground truth, averaged over seeds.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import MISSING

from feynkit.core import LinearSchedule, get_resampler, systematic_resample
from feynkit.experiments import harness
from feynkit.experiments.metrics import energy_distance
from feynkit.inference import smc
from feynkit.models import GaussianMixture, sample_guided, sample_tempered

VARIANTS = ("anneal", "product", "cfg")


@dataclasses.dataclass
class FKCGMMConfig(harness.ReplicationConfig):
    """Schema of `configs/experiment/fkc_gmm.yaml` (the values live there)."""

    variants: list[str] = MISSING
    dims: list[int] = MISSING
    particles: list[int] = MISSING
    num_seeds: int = MISSING
    num_steps: int = MISSING
    t_min: float = MISSING
    beta: float = MISSING  # annealing: target p^beta
    guidance_weight: float = MISSING  # cfg: target p_c^w p^(1-w)
    ess_threshold: float = MISSING
    resampler: str = MISSING
    num_reference: int = MISSING
    improvement: float = MISSING  # claim: naive_error / fkc_error > improvement

    def __post_init__(self):
        for v in self.variants:
            harness.require(
                v in VARIANTS, "variants", f"has unknown {v!r}; choose from {VARIANTS}."
            )
        harness.require(
            len(self.particles) >= 2 and sorted(self.particles) == list(self.particles),
            "particles",
            f"needs >= 2 increasing counts, got {list(self.particles)}.",
        )
        harness.require(
            self.beta > 0, "beta", f"(inverse temperature) must be > 0, got {self.beta}."
        )
        harness.require(self.num_seeds >= 1, "num_seeds", "must be >= 1.")
        harness.require(self.num_reference >= 2, "num_reference", "must be >= 2.")


def _embed(means_2d, dim: int) -> np.ndarray:
    """2-D component means placed in the first two coordinates of R^dim."""
    m = np.asarray(means_2d, dtype=np.float64)
    return np.concatenate([m, np.zeros((m.shape[0], dim - 2))], axis=1)


def make_targets(variant: str, dim: int) -> dict:
    """The pretrained mixtures of one variant (`models`) and what defines its ground truth.

    The structure lives in the first two coordinates; in higher dimensions each component is
    isotropic, so the remaining coordinates carry component-dependent widths (which is where
    naive score scaling goes most wrong).
    """
    if dim < 2:
        raise ValueError(f"fkc_gmm dimensions must be >= 2, got {dim}.")
    if variant == "anneal":
        p = GaussianMixture.create(
            [0.2, 0.3, 0.5],
            _embed([[-2.5, 0.0], [0.0, 2.5], [2.0, -1.5]], dim),
            scales=[0.5, 0.7, 1.0],
        )
        return {"models": [p]}
    if variant == "product":
        p1 = GaussianMixture.create([0.5, 0.5], _embed([[-2.0, 0.0], [2.0, 2.0]], dim), scales=0.8)
        p2 = GaussianMixture.create([0.5, 0.5], _embed([[-1.6, 0.4], [2.0, -1.0]], dim), scales=0.8)
        return {"models": [p1, p2]}
    if variant == "cfg":
        uncond = GaussianMixture.create(
            [0.25] * 4,
            _embed([[-2.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, -2.0]], dim),
            scales=0.8,
        )
        # class c = components 0 and 1; p(x) = 0.5 p(x | c) + 0.5 p(x | not c)
        return {"models": [uncond, uncond.select([0, 1])], "cond_mass": 0.5}
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}.")


def build(variant: str, targets: dict, cfg, schedule) -> smc.WeightedSDE:
    models = targets["models"]
    scores = [lambda x, t, g=g: g.marginal(schedule, t).score(x) for g in models]
    logps = [lambda x, t, g=g: g.marginal(schedule, t).log_prob(x) for g in models]
    if variant == "anneal":
        return smc.annealed_sde(scores[0], schedule, cfg.beta, logps[0])
    if variant == "product":
        return smc.product_sde(scores, schedule, logps)
    return smc.cfg_sde(scores[0], scores[1], schedule, cfg.guidance_weight, logps)


def ground_truth(key, variant: str, targets: dict, cfg, schedule) -> jax.Array:
    """Exact draws from the variant's target at t_min."""
    ms = [g.marginal(schedule, cfg.t_min) for g in targets["models"]]
    n = cfg.num_reference
    if variant == "anneal":
        return sample_tempered(key, ms[0], cfg.beta, n)
    if variant == "product":
        prod, _ = ms[0].product(ms[1])
        return prod.sample(key, n)
    return sample_guided(key, ms[1], ms[0], cfg.guidance_weight, targets["cond_mass"], n)


def _sampler(sde, n, dim, cfg, resample_fn):
    """One compiled function for FKC and the naive SDE (`weighted` is traced), run over seeds
    with `lax.map` (sequential: batching the SMC loop with vmap is slower on CPU)."""

    def one(k, weighted):
        state, info = smc.fkc_sample(
            k,
            sde,
            n,
            dim,
            cfg.num_steps,
            t_min=cfg.t_min,
            weighted=weighted,
            resample_fn=resample_fn,
            ess_threshold=cfg.ess_threshold,
        )
        return state.particles, state.log_weights, jnp.sum(info.resampled)

    return jax.jit(lambda keys, weighted: jax.lax.map(lambda k: one(k, weighted), keys))


@harness.replication("fkc_gmm", FKCGMMConfig)
def run(ex: FKCGMMConfig, ctx: harness.Context) -> None:
    res = ctx
    schedule = LinearSchedule()
    resample_fn = get_resampler(ex.resampler)
    key = ctx.key
    figure_rows = []
    for dim in ex.dims:
        for variant in ex.variants:
            t0 = time.perf_counter()
            targets = make_targets(variant, dim)
            sde = build(variant, targets, ex, schedule)
            k_ref, k_run = jax.random.split(jax.random.fold_in(key, 97 * dim + len(variant)))
            truth = ground_truth(k_ref, variant, targets, ex, schedule)
            prefix = f"{variant}.{dim}d"
            errors = {}
            for n in ex.particles:
                keys = jax.random.split(jax.random.fold_in(k_run, n), ex.num_seeds)
                sample = _sampler(sde, n, dim, ex, resample_fn)
                for method, weighted in (("fkc", True), ("naive", False)):
                    x, lw, n_res = sample(keys, jnp.asarray(weighted))
                    errs = [
                        float(energy_distance(x[s], truth, jnp.exp(lw[s])))
                        for s in range(ex.num_seeds)
                    ]
                    errors[method, n] = float(np.mean(errs))
                    res.metric(f"{prefix}.{method}_error.n{n}", errors[method, n])
                    if weighted:
                        res.metric(f"{prefix}.fkc_resamples.n{n}", float(np.mean(n_res)))
                    if n == ex.particles[-1] and dim == ex.dims[0]:
                        figure_rows.append((prefix, method, x[0], lw[0], truth))
            n_lo, n_hi = ex.particles[0], ex.particles[-1]
            fkc, naive = errors["fkc", n_hi], errors["naive", n_hi]
            res.metric(f"{prefix}.fkc_error", fkc)
            res.metric(f"{prefix}.naive_error", naive)
            res.claim(
                f"{prefix}: fkc_error < naive_error / {ex.improvement:g}",
                fkc,
                naive / ex.improvement,
            )
            res.claim(
                f"{prefix}: fkc_error falls from n={n_lo} to n={n_hi}", fkc, errors["fkc", n_lo]
            )
            res.metric(f"{prefix}.seconds", time.perf_counter() - t0)
    _plot(figure_rows, ctx)


def _plot(rows, ctx: harness.Context) -> None:
    variants = sorted({r[0] for r in rows}, key=lambda p: VARIANTS.index(p.split(".")[0]))
    with ctx.figure("fkc_gmm.png", len(variants), 3, size=3.0) as (fig, axes):
        _draw(rows, variants, axes, ctx.key)


def _draw(rows, variants, axes, key) -> None:
    for i, prefix in enumerate(variants):
        by = {r[1]: r for r in rows if r[0] == prefix}
        truth = np.asarray(by["fkc"][4])
        fkc_x, fkc_lw = by["fkc"][2], by["fkc"][3]
        idx = systematic_resample(key, fkc_lw, fkc_x.shape[0])
        panels = [
            ("ground truth", truth),
            ("naive", np.asarray(by["naive"][2])),
            ("FKC (resampled)", np.asarray(fkc_x[idx])),
        ]
        for j, (title, pts) in enumerate(panels):
            ax = axes[i, j]
            ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.4)
            ax.set_title(f"{prefix}: {title}", fontsize=9)
            ax.set_xlim(-4.5, 4.5)
            ax.set_ylim(-4.5, 4.5)
            ax.set_aspect("equal")
