"""Replication: Feynman–Kac correctors on Gaussian-mixture targets with exact scores.

Claim (Skreta et al. 2025): reweighting the naive SDE (scaled score, summed scores, CFG) with the
FKC weights and resampling samples the intended target — p^β, p₁p₂, p_c^w p^(1−w) — while the
naive SDE does not; the error falls as particles grow.

For each variant and dimension the run draws ground truth exactly (a closed-form mixture for the
product, rejection samplers for the tempered and guided targets, all at t_min), runs the naive
SDE and FKC at each particle count over several seeds (one compile each), and reports
the weighted energy distance to the ground truth, averaged over seeds.

Every error stands beside its floor: the same metric computed for exact samples of the same
size (``floor``), so ``ratio`` = error / floor says how close a sampler gets to the target (1 is
as good as exact draws; weighted particles have an ESS below n, so even a perfect FKC sits
above 1). A second metric, the per-mode mass error (max over the modes of |mass − exact mass|,
points assigned to the component of highest responsibility), is reported the same way. At the
largest particle count FKC is also run with K MALA rejuvenation moves on π̃_t after each
resampling (`smc.langevin_rejuvenation`, through ``diffusion.sample`` with Euler–Maruyama
steps and the FKC corrector of the variant), which restores lineages that weighting-only FKC
loses on sharp targets.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import MISSING

from feynkit.core import LinearSchedule, get_resampler, systematic_resample
from feynkit.experiments import harness
from feynkit.experiments.evaluation import fkc_over_seeds
from feynkit.experiments.metrics import energy_distance
from feynkit.inference import diffusion as dif
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
    num_mass_reference: int = MISSING  # exact draws that fix each mode's exact mass
    rejuvenation_moves: int = MISSING  # MALA moves after each resampling (0: no such run)
    rejuvenation_step: float = MISSING  # h_t = rejuvenation_step · σ_t²

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
        harness.require(self.num_mass_reference >= 2, "num_mass_reference", "must be >= 2.")
        harness.require(self.rejuvenation_moves >= 0, "rejuvenation_moves", "must be >= 0.")
        harness.require(self.rejuvenation_step > 0, "rejuvenation_step", "must be > 0.")


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


def ground_truth(key, variant: str, targets: dict, cfg, schedule, n: int | None = None):
    """n (default ``num_reference``) exact draws from the variant's target at t_min."""
    ms = [g.marginal(schedule, cfg.t_min) for g in targets["models"]]
    n = cfg.num_reference if n is None else n
    if variant == "anneal":
        return sample_tempered(key, ms[0], cfg.beta, n)
    if variant == "product":
        prod, _ = ms[0].product(ms[1])
        return prod.sample(key, n)
    return sample_guided(key, ms[1], ms[0], cfg.guidance_weight, targets["cond_mass"], n)


def mode_mixture(variant: str, targets: dict, cfg, schedule):
    """The mixture whose components define the modes of the variant's target at t_min."""
    ms = [g.marginal(schedule, cfg.t_min) for g in targets["models"]]
    return ms[0].product(ms[1])[0] if variant == "product" else ms[0]


def mode_masses(modes, x, w=None) -> jax.Array:
    """(Weighted) mass of each mode: points assigned to the component of highest
    responsibility."""
    lab = jnp.argmax(modes.component_log_probs(x), -1)
    w = jnp.full(x.shape[0], 1.0 / x.shape[0]) if w is None else w / jnp.sum(w)
    return jnp.zeros(modes.num_components).at[lab].add(w)


def _rejuvenated_sampler(variant, targets, cfg, schedule, n, dim):
    """FKC with K MALA moves on π̃_t after each resampling: ``diffusion.sample`` with
    Euler–Maruyama steps (the SDE `fkc_sample` integrates) and the variant's FKC corrector."""
    models = targets["models"]

    def eps(g, x, t):
        return -schedule.sigma(t[0]) * g.marginal(schedule, t[0]).score(x)

    if variant == "anneal":
        a = [cfg.beta]
        model, branches = (lambda x, t: eps(models[0], x, t)), {}
        make = smc.fkc_anneal_corrector
        kwargs = {"beta": cfg.beta}
    else:
        # branch 1 = cond (or expert 0), branch 0 = uncond (or expert 1)
        first, second = (models[0], models[1]) if variant == "product" else (models[1], models[0])
        a = [1.0, 1.0] if variant == "product" else [cfg.guidance_weight, 1 - cfg.guidance_weight]

        def model(x, t, branch):
            return eps(first, x, t) if branch == 1 else eps(second, x, t)

        branches = {"cond": {"branch": 1}, "uncond": {"branch": 0}, "batch_branches": False}
        make = smc.fkc_product_corrector if variant == "product" else smc.fkc_cfg_corrector
        kwargs = {} if variant == "product" else {"scale": cfg.guidance_weight}
    parts = [models[0]] if variant == "anneal" else [first, second]

    def log_density(x, t):
        return sum(ai * g.marginal(schedule, t).log_prob(x) for ai, g in zip(a, parts, strict=True))

    rejuv = smc.langevin_rejuvenation(cfg.rejuvenation_moves, cfg.rejuvenation_step, log_density)
    corr = make(
        **kwargs, ess_threshold=cfg.ess_threshold, resample=cfg.resampler, rejuvenation=rejuv
    )
    ts = dif.time_grid(cfg.num_steps, 1.0, cfg.t_min)
    scale = 1.0 / np.sqrt(sum(a))

    def one(k):
        x0 = scale * jax.random.normal(jax.random.fold_in(k, 1), (n, dim))
        x, info = dif.sample(
            k, dif.euler_maruyama(schedule), model, x0, ts, corrector=corr, **branches
        )
        return x, info.log_weights, info.acceptance

    return jax.jit(lambda keys: jax.lax.map(one, keys))


@harness.replication("fkc_gmm", FKCGMMConfig)
def run(ex: FKCGMMConfig, ctx: harness.Context) -> None:
    res = ctx
    schedule = LinearSchedule()
    resample_fn = get_resampler(ex.resampler)
    key = ctx.key
    figure_rows = []
    table = []
    for dim in ex.dims:
        for variant in ex.variants:
            t0 = time.perf_counter()
            targets = make_targets(variant, dim)
            sde = build(variant, targets, ex, schedule)
            k_ref, k_run = jax.random.split(jax.random.fold_in(key, 97 * dim + len(variant)))
            k_ref, k_floor, k_mass = jax.random.split(k_ref, 3)
            truth = ground_truth(k_ref, variant, targets, ex, schedule)
            modes = mode_mixture(variant, targets, ex, schedule)
            big = ground_truth(k_mass, variant, targets, ex, schedule, ex.num_mass_reference)
            exact_mass = mode_masses(modes, big)
            prefix = f"{variant}.{dim}d"

            def scores(x, w=None):
                ed = float(energy_distance(x, truth, w))
                mass = float(jnp.max(jnp.abs(mode_masses(modes, x, w) - exact_mass)))
                return ed, mass

            errors, masses = {}, {}
            for n in ex.particles:
                keys = jax.random.split(jax.random.fold_in(k_run, n), ex.num_seeds)
                # the floor: the same metrics for exact samples of the same size
                fl = [
                    scores(
                        ground_truth(
                            jax.random.fold_in(k_floor, 1000 * n + s),
                            variant,
                            targets,
                            ex,
                            schedule,
                            n,
                        )
                    )
                    for s in range(ex.num_seeds)
                ]
                errors["floor", n], masses["floor", n] = np.mean(fl, axis=0)
                runs = []
                sample = fkc_over_seeds(sde, n, dim, ex, resample_fn)
                for method, weighted in (("fkc", True), ("naive", False)):
                    x, lw, n_res = sample(keys, jnp.asarray(weighted))
                    runs.append((method, x, lw))
                    if weighted:
                        res.metric(f"{prefix}.fkc_resamples.n{n}", float(np.mean(n_res)))
                        ess = jnp.mean(1.0 / jnp.sum(jnp.exp(2 * lw), -1)) / n
                        res.metric(f"{prefix}.fkc_final_ess_fraction.n{n}", float(ess))
                if n == ex.particles[-1] and ex.rejuvenation_moves > 0:
                    x, lw, acc = _rejuvenated_sampler(variant, targets, ex, schedule, n, dim)(keys)
                    runs.append(("fkc_rejuv", x, lw))
                    res.metric(f"{prefix}.fkc_rejuv_acceptance", float(jnp.mean(acc)))
                for method, x, lw in runs:
                    sc = [scores(x[s], jnp.exp(lw[s])) for s in range(ex.num_seeds)]
                    errors[method, n], masses[method, n] = np.mean(sc, axis=0)
                    if n == ex.particles[-1] and dim == ex.dims[0] and method != "fkc_rejuv":
                        figure_rows.append((prefix, method, x[0], lw[0], truth))
                for method in ["floor"] + [r[0] for r in runs]:
                    res.metric(f"{prefix}.{method}_error.n{n}", errors[method, n])
                    res.metric(f"{prefix}.{method}_mass_error.n{n}", masses[method, n])
                    if method != "floor":
                        res.metric(
                            f"{prefix}.{method}_ratio.n{n}", errors[method, n] / errors["floor", n]
                        )
                        res.metric(
                            f"{prefix}.{method}_mass_ratio.n{n}",
                            masses[method, n] / masses["floor", n],
                        )
            n_lo, n_hi = ex.particles[0], ex.particles[-1]
            fkc, naive = errors["fkc", n_hi], errors["naive", n_hi]
            res.metric(f"{prefix}.fkc_error", fkc)
            res.metric(f"{prefix}.naive_error", naive)
            res.metric(f"{prefix}.floor_error", errors["floor", n_hi])
            for method in ("fkc", "naive", "fkc_rejuv"):
                if (method, n_hi) in errors:
                    res.metric(
                        f"{prefix}.{method}_ratio", errors[method, n_hi] / errors["floor", n_hi]
                    )
                    res.metric(
                        f"{prefix}.{method}_mass_ratio",
                        masses[method, n_hi] / masses["floor", n_hi],
                    )
            res.claim(
                f"{prefix}: fkc_error < naive_error / {ex.improvement:g}",
                fkc,
                naive / ex.improvement,
            )
            res.claim(
                f"{prefix}: fkc_error falls from n={n_lo} to n={n_hi}", fkc, errors["fkc", n_lo]
            )
            res.metric(f"{prefix}.seconds", time.perf_counter() - t0)
            table.append(
                (prefix, n_hi, {k: (errors[k], masses[k]) for k in errors if k[1] == n_hi})
            )
    _print_table(table)
    _plot(figure_rows, ctx)


def _print_table(table) -> None:
    """A Markdown table of every error beside its floor (for the README)."""
    print(
        "| target | n | floor ED | FKC ED (×floor) | naive ED (×floor) | FKC+rejuv ED (×floor) "
        "| floor mass | FKC mass (×floor) | naive mass (×floor) | FKC+rejuv mass (×floor) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for prefix, n, e in table:
        fe, fm = e["floor", n]

        def cell(m, i, f):
            if (m, n) not in e:
                return "–"
            v = e[m, n][i]
            return f"{v:.3f} ({v / f:.1f}×)"

        print(
            f"| {prefix} | {n} | {fe:.3f} | "
            + " | ".join(cell(m, 0, fe) for m in ("fkc", "naive", "fkc_rejuv"))
            + f" | {fm:.3f} | "
            + " | ".join(cell(m, 1, fm) for m in ("fkc", "naive", "fkc_rejuv"))
            + " |"
        )


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
