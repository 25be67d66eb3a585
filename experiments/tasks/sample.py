"""task=sample: model × solver × guidance × corrector × quant → samples, metrics, a figure.

One `diffusion.sample` call serves every combination: the solver from ``solver/``, guidance from
``guidance/`` (classifier guidance wraps the model instead), the corrector from ``corrector/``
(its weights and log Ẑ come back in the info), the parameters from ``quant/``. Metrics as fit
the model: energy distance and mode weights against exact draws of the intended target (analytic
mixtures: the conditional, tempered, product or CFG target), against data (toy_mlp), fd_digits
and class accuracy (digits_unet); ESS and log Ẑ with a corrector; NFE and wall time.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig

from feynkit.experiments import distributed
from feynkit.experiments.tasks import build
from feynkit.experiments.tasks.common import bound_for, task_settings
from feynkit.experiments.tasks.validate import validate_combination

__all__ = ["SampleTask", "run_sample"]


@dataclasses.dataclass
class SampleTask:
    """The ``task`` node of task=sample (schema: unknown keys and wrong types are rejected)."""

    name: str = "sample"
    num_samples: int = 1024
    num_steps: int = 200
    t_max: float = 1.0
    t_min: float = 1e-3
    spacing: str = "uniform"
    label: int | None = None
    denoise_final: bool = True
    batch_branches: bool = True
    num_reference: int = 4096
    max_energy_distance: dict[str, float] = dataclasses.field(default_factory=dict)
    max_fd_digits: float = 10.0
    min_class_accuracy: dict[str, float] = dataclasses.field(default_factory=dict)
    smoke_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


def _conditioning(cfg: DictConfig, bundle, settings, n: int, key):
    """(labels, cond, uncond) of the run; `labels` are the classes the samples should have
    (guidance and fkc_cfg condition on them, an FK-steering reward scores them)."""
    corrector = build.target_name(cfg.corrector)
    guided = not build.is_none(cfg.guidance) or corrector == "fkc_cfg_corrector"
    if corrector == "fkc_product_corrector":
        cond, uncond = bundle.experts(n)
        return None, cond, uncond
    if bundle.num_classes is None:
        return None, {}, {}
    null = jnp.full((n,), bundle.null_label, jnp.int32)
    steering = corrector == "fk_steering_corrector"
    if settings.label is not None or corrector is not None and (guided or steering):
        # Particles of one SMC run share one target: one label (task.label, default class 0).
        label = 0 if settings.label is None else int(settings.label)
        labels = jnp.full((n,), label, jnp.int32)
    elif guided:
        labels = jax.random.randint(key, (n,), 0, bundle.num_classes)
    else:
        return None, {"label": null}, {"label": null}
    if steering and not guided:  # the reward steers the unconditional model
        return labels, {"label": null}, {"label": null}
    return labels, {"label": labels}, {"label": null}


def _guided_truth(key, tgt, sched, t_min, w, labels, n):
    """Exact draws of p_c^w p^(1−w) for each sample's class c (w ≥ 1)."""
    from feynkit.models import sample_guided

    full = tgt.sub(len(tgt.classes)).marginal(sched, t_min)
    out = np.zeros((n, tgt.mixture.dim), np.float32)
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        mass = float(jnp.sum(tgt.mixture.weights[np.asarray(tgt.classes[int(c)])]))
        sub = tgt.sub(int(c)).marginal(sched, t_min)
        k = jax.random.fold_in(key, int(c))
        out[idx] = np.asarray(sample_guided(k, sub, full, w, mass, len(idx)))
    return jnp.asarray(out)


def _exact_target(key, cfg, bundle, settings, labels, n: int):
    """Exact draws from the target this combination means to sample (analytic models), or None
    when the combination has no closed-form target (e.g. APG)."""
    from feynkit.models import sample_tempered

    tgt = bundle.target
    sched, t_min = bundle.schedule, settings.t_min
    if labels is not None:  # the run's label proportions, for n draws
        labels = np.resize(np.asarray(labels), n)
    corrector = build.target_name(cfg.corrector)
    guidance = build.target_name(cfg.guidance)
    null = len(tgt.classes)
    if corrector == "fkc_product_corrector":
        a, b = (tgt.sub(null + 1 + i) for i in range(2))
        return jax.jit(
            lambda k: a.marginal(sched, t_min).product(b.marginal(sched, t_min))[0].sample(k, n)
        )(key)
    if corrector == "fkc_anneal_corrector":
        base = tgt.sub(null if labels is None else int(labels[0]))
        if labels is not None and np.unique(np.asarray(labels)).size > 1:
            return None
        return sample_tempered(key, base.marginal(sched, t_min), float(cfg.corrector.beta), n)
    if corrector == "fkc_cfg_corrector":  # plain CFG does not sample this target (FKC does)
        w = float(cfg.corrector.scale)
        return None if w < 1 else _guided_truth(key, tgt, sched, t_min, w, labels, n)
    if corrector == "fk_steering_corrector":
        # exp(λ log p(c | x)) p(x) = p_c^λ p^(1−λ) up to a constant: the CFG target at w = λ.
        reward = (cfg.corrector.get("reward") or {}).get("kind", "auto")
        lam = float(cfg.corrector.lam)
        if guidance is None and reward in ("auto", "classifier") and lam >= 1:
            return _guided_truth(key, tgt, sched, t_min, lam, labels, n)
        return None
    if guidance is None and corrector is None:
        if labels is None:
            full = tgt.sub(null)
            return jax.jit(lambda k: full.marginal(sched, t_min).sample(k, n))(key)
        return bundle.reference(key, n, labels)[0]
    return None


def _linear_ag_coefficients(cfg, bundle, solver, model_fn, ts, key, settings):
    from feynkit.inference.diffusion import fit_linear_ag, linear_ag_calibration

    cal = cfg.guidance.get("calibration") or {}
    m = int(cal.get("num_samples", 64))
    k1, k2, k3 = jax.random.split(key, 3)
    labels = jax.random.randint(k1, (m,), 0, bundle.num_classes)
    eps_c, eps_u = linear_ag_calibration(
        k2,
        solver,
        model_fn,
        jax.random.normal(k3, (m, *bundle.x_shape)),
        ts,
        float(cfg.guidance.scale),
        prediction=bundle.prediction,
        cond={"label": labels},
        uncond={"label": jnp.full((m,), bundle.null_label)},
    )
    return fit_linear_ag(eps_c, eps_u, int(cal.get("history", 1)), float(cal.get("ridge", 1e-6)))


def run_sample(cfg: DictConfig, ctx: Any) -> None:
    """Sample `cfg.model` with the configured solver, guidance, corrector and quantizer."""
    from feynkit.inference import diffusion

    validate_combination(cfg)
    settings = task_settings(cfg, ctx.smoke)
    bundle = build.build_model(cfg, ctx.seed, ctx.smoke)
    solver = build.build_solver(cfg, bundle)
    k_quant, k_label, k_init, k_run, k_ref, k_cal = jax.random.split(ctx.key, 6)
    n = int(settings.num_samples)

    recipe, params = build.compress_params(cfg, bundle, k_quant)
    apply = bundle.apply_fn if recipe is None else build.compressed_apply_fn(bundle)
    model_fn = lambda x, t, **c: apply(params, x, t, **c)  # noqa: E731
    if recipe is not None:
        from feynkit.compression import quant

        ctx.metric("quant.bits_per_weight", _bits_per_weight(quant, params))
        ctx.metric("quant.bytes", quant.tree_nbytes(params))

    ts = diffusion.time_grid(
        int(settings.num_steps),
        float(settings.t_max),
        float(settings.t_min),
        settings.spacing,
        bundle.schedule,
    )
    labels, cond, uncond = _conditioning(cfg, bundle, settings, n, k_label)
    prediction = bundle.prediction
    extra = {}
    if build.target_name(cfg.guidance) == "linear_ag":
        extra["coefficients"] = _linear_ag_coefficients(
            cfg, bundle, solver, model_fn, ts, k_cal, settings
        )
    guidance = build.build_guidance(cfg, bundle, **extra)
    if build.target_name(cfg.guidance) == "classifier_guided_model":
        model_fn = build.classifier_model(cfg, bundle, model_fn)
        prediction = "prediction"
    corrector = build.build_corrector(cfg, bundle, labels)
    kwargs = {} if corrector is None else {"corrector": corrector}
    if guidance is None and build.target_name(cfg.corrector) != "fkc_product_corrector":
        uncond = None if build.target_name(cfg.corrector) != "fkc_cfg_corrector" else uncond

    def run(key, x_init):
        return diffusion.sample(
            key,
            solver,
            model_fn,
            x_init,
            ts,
            prediction=prediction,
            guidance=guidance,
            cond=cond,
            uncond=uncond,
            denoise_final=bool(settings.denoise_final),
            batch_branches=bool(settings.batch_branches),
            **kwargs,
        )

    # FKC's annealed and product targets start from the law p_T^beta (p_T^2) normalised.
    spread = {
        "fkc_anneal_corrector": lambda: float(cfg.corrector.beta),
        "fkc_product_corrector": lambda: 2.0,
    }
    c_name = build.target_name(cfg.corrector)
    shrink = spread[c_name]() if c_name in spread else 1.0
    sigma_max = float(bundle.schedule.sigma(float(settings.t_max)))
    x_init = sigma_max / shrink**0.5 * jax.random.normal(k_init, (n, *bundle.x_shape))
    devices = jax.device_count()
    if devices > 1 and n % devices == 0:  # samples over every device of every process
        x_init = distributed.shard_global(np.asarray(x_init))
    ctx.metric("devices", devices if n % devices == 0 else 1)
    t0 = time.perf_counter()
    compiled = jax.jit(run).lower(k_run, x_init).compile()
    ctx.metric("compile_seconds", time.perf_counter() - t0)
    t0 = time.perf_counter()
    x, info = jax.block_until_ready(compiled(k_run, x_init))
    x, info = distributed.gather((x, info))  # full values on every process
    ctx.metric("wall_seconds", time.perf_counter() - t0)
    ctx.metric("nfe", info.nfe)

    weights = None
    if corrector is not None:
        lw = jnp.asarray(info.log_weights)
        weights = jnp.exp(lw - jax.nn.logsumexp(lw))
        ctx.metric("log_normalizer", info.log_normalizer)
        ess = jnp.asarray(info.ess)
        ctx.metric("ess_final", ess[-1] if ess.ndim else ess)
        ctx.metric("ess_min", jnp.min(ess))
        ctx.metric("resample_steps", jnp.sum(jnp.asarray(info.resampled)))
    flat = np.asarray(x).reshape(n, -1)
    finite = float(np.mean(np.all(np.isfinite(flat), -1)))
    ctx.metric("finite_fraction", finite)
    ctx.claim("samples finite (fraction)", finite, 0.999, ">")
    _metrics(cfg, ctx, bundle, settings, x, weights, labels, k_ref)
    _figure(ctx, bundle, x, weights, labels)


def _bits_per_weight(quant, params) -> float:
    return float(quant.tree_bits_per_weight(params))


def _metrics(cfg, ctx, bundle, settings, x, weights, labels, key) -> None:
    from feynkit.experiments.metrics import energy_distance, mode_weights

    n = x.shape[0]
    model = bundle.name
    bound = bound_for(settings, "max_energy_distance", model)
    if bundle.target is not None:
        m = int(settings.num_reference)
        # m draws to compare with, and n more for the estimator's floor at these sizes
        both = _exact_target(key, cfg, bundle, settings, labels, m + n)
        if both is not None:
            truth, again = both[:m], both[m:]
            ed = ctx.metric("energy_distance", energy_distance(x, truth, weights))
            ctx.metric("energy_distance_floor", energy_distance(again, truth))
            centers = bundle.target.mixture.means
            mw = mode_weights(x, centers, weights)
            mw_true = mode_weights(truth, centers)
            ctx.metric("mode_weight_error", jnp.max(jnp.abs(mw - mw_true)))
            if bound is not None:
                ctx.claim(f"energy distance to the exact target < {bound:g}", ed, bound)
        else:  # e.g. CFG, APG: no closed form; the distance to the class-conditional data
            m = int(settings.num_reference)
            lab = None if labels is None else np.resize(np.asarray(labels), m)
            ref = bundle.reference(key, m, lab)[0]
            ctx.metric("energy_distance_to_conditional", energy_distance(x, ref, weights))
        if labels is not None:
            logits = bundle.classifier_logits(x, jnp.zeros(x.shape[:1], x.dtype))
            _class_accuracy(ctx, settings, model, jnp.argmax(logits, -1), labels, weights)
    elif bundle.judge is not None:
        from feynkit.experiments.metrics import frechet_distance

        ref, _ = bundle.reference(key, int(settings.num_reference))
        f_x, logits = bundle.judge(x)
        f_ref, _ = bundle.judge(ref)
        if weights is not None:  # resample by the weights for the unweighted metrics
            from feynkit.core import systematic_resample

            idx = systematic_resample(jax.random.fold_in(key, 1), jnp.log(weights), n)
            f_x, logits = f_x[idx], logits[idx]
            labels = None if labels is None else labels[idx]
        fd = ctx.metric("fd_digits", frechet_distance(f_x, f_ref))
        ctx.claim(f"fd_digits < {settings.max_fd_digits:g}", fd, float(settings.max_fd_digits))
        if labels is not None:
            _class_accuracy(ctx, settings, model, jnp.argmax(logits, -1), labels, None)
    elif bundle.reference is not None:
        m = int(settings.num_reference)
        ref, _ = (
            bundle.reference(key, m, np.resize(np.asarray(labels), m))
            if labels is not None
            else bundle.reference(key, m)
        )
        plain = build.is_none(cfg.guidance) and build.is_none(cfg.corrector)
        if plain:  # the model's own distribution: the data it was trained on
            ed = ctx.metric("energy_distance", energy_distance(x, ref, weights))
            if bound is not None:
                ctx.claim(f"energy distance to the data < {bound:g}", ed, bound)
        else:  # guidance sharpens on purpose: recorded, not bounded
            ctx.metric("energy_distance_to_conditional", energy_distance(x, ref, weights))
        centers = bundle.extras.get("centers")
        if centers is not None and labels is not None:
            nearest = jnp.argmin(jnp.sum((x[:, None, :] - centers[None]) ** 2, -1), axis=1)
            _class_accuracy(ctx, settings, model, nearest, labels, weights, "mode_accuracy")
    if weights is not None:
        from feynkit.experiments.tasks.build import reward_fn

        if build.target_name(cfg.corrector) == "fk_steering_corrector":
            r = reward_fn(cfg, bundle, labels)(x)
            ctx.metric("reward_weighted_mean", jnp.sum(weights * r))


def _class_accuracy(ctx, settings, model, predicted, labels, weights, name="class_accuracy"):
    hit = (predicted == labels).astype(jnp.float32)
    acc = ctx.metric(name, jnp.mean(hit) if weights is None else jnp.sum(weights * hit))
    bound = bound_for(settings, "min_class_accuracy", model)
    if bound is not None:
        ctx.claim(f"{name} of conditioned samples > {bound:g}", acc, bound, ">")


def _figure(ctx, bundle, x, weights, labels) -> None:
    x = np.asarray(x)
    if weights is not None:  # show a resampled set
        from feynkit.core import systematic_resample

        idx = systematic_resample(jax.random.key(0), jnp.log(weights), x.shape[0])
        x = x[np.asarray(idx)]
        labels = None if labels is None else np.asarray(labels)[np.asarray(idx)]
    if x.ndim == 2:
        with ctx.figure("samples.png", size=4.0) as (fig, axes):
            ax = axes[0, 0]
            c = None if labels is None else np.asarray(labels)
            cmap = "tab10" if c is not None else None
            ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5, c=c, cmap=cmap)
            ax.set_aspect("equal")
            ax.set_title(f"{bundle.name}: samples", fontsize=9)
        return
    with ctx.figure("samples.png", 4, 8, size=1.0) as (fig, axes):
        for i, ax in enumerate(axes.ravel()):
            ax.axis("off")
            if i < x.shape[0]:
                ax.imshow(np.clip(x[i, ..., 0], -1, 1), cmap="gray", vmin=-1, vmax=1)
