"""The ``prune=`` options of task=compress that are not a mask over unchanged shapes.

``prune=magnitude|wanda|sparsegpt|obert`` build a `PruneRecipe` (masks, `prune_tree`). The four
options here build a spec that `run_compress` hands to its runner in this module:

  * ``prune=flap`` (`FlapSpec`): FLAP structured pruning of the byte LM's attention heads and
    MLP channels at ``prune.sparsity`` (the removed fraction of attention + MLP parameters);
    the arrays really shrink, and the smaller model is what the task measures (perplexity,
    parameters and bytes before and after, kept heads/channels per layer). Layer errors are
    those of the same structure zeroed at full shape (before bias compensation), the only
    ones a shrunk kernel has against its dense original.
  * ``prune=evopress`` (`EvoPressSpec`): every selected kernel pruned at every sparsity of
    ``prune.levels`` by the base pruner (``prune.base``: magnitude, wanda or sparsegpt) once,
    then EvoPress's evolutionary search over per-kernel levels at the average ``prune.sparsity``
    (fitness: KL of the next-byte distribution from the dense model's on calibration windows);
    the searched model then gets the usual pruned-model metrics, and the allocation is
    reported per kernel.
  * ``prune=wina`` (`WinaSpec`): activation sparsity is a property of the forward pass, not of
    the parameters: the model's metric is evaluated with WINA gating (|x|·‖W_row‖) at
    ``prune.sparsity`` and, in the same run, with the magnitude-only TEAL-style gate (|x|) at
    the same sparsity; the gated fraction is measured inside the forward pass.
  * ``prune=dare`` (`DareSpec`): the byte LM fine-tuned on one stdlib subset (the fine-tunes of
    `zoo.finetuned_lms`, shared with the dare_merge replication), its delta DARE'd at
    ``prune.sparsity`` (the drop rate p); reported: the subset perplexity of the base, the
    fine-tune and the DARE'd fine-tune, and the measured fraction of dropped delta entries.

`validate_combination` checks the model each needs (flap, dare, evopress: byte_lm) and that
quant= stays none for wina and dare (nothing there is a weight to quantize on its own).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from feynkit.compression.prune.flap import FLAP_STRUCTURES

__all__ = [
    "DareSpec",
    "EVOPRESS_BASES",
    "EvoPressSpec",
    "FlapSpec",
    "WinaSpec",
    "dare",
    "evopress",
    "flap",
    "run_dare",
    "run_wina",
    "shrunk_layer_errors",
    "structured_prune",
    "evopress_prune",
    "wina",
]

EVOPRESS_BASES = ("magnitude", "wanda", "sparsegpt")
WINA_PROBE = 32  # calibration inputs the gated fraction and output error are measured on


def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"prune.{name}={value!r} must be a number in [0, 1).")
    return float(value)


def _where(where: str | Sequence[str] | None):
    return None if where is None else (where if isinstance(where, str) else tuple(where))


@dataclasses.dataclass(frozen=True)
class FlapSpec:
    """prune=flap: removed parameter fraction, FLAP structure, bias compensation."""

    sparsity: float
    structure: str
    bias_compensation: bool


def flap(
    sparsity: float = 0.2, structure: str = "AL-AM", bias_compensation: bool = True
) -> FlapSpec:
    """prune=flap: `FlapSpec` (sparsity: fraction of attention + MLP parameters removed)."""
    if structure not in FLAP_STRUCTURES:
        raise ValueError(f"prune.structure={structure!r}: choose one of {FLAP_STRUCTURES}.")
    return FlapSpec(_fraction("sparsity", sparsity), structure, bool(bias_compensation))


@dataclasses.dataclass(frozen=True)
class EvoPressSpec:
    """prune=evopress: average sparsity, base pruner, level grid and search settings."""

    sparsity: float
    base: str
    levels: tuple[float, ...]
    generations: int
    offspring: int
    stage_windows: tuple[int, ...]
    survivors: tuple[int, ...]
    where: Any


def evopress(
    sparsity: float = 0.6,
    base: str = "wanda",
    levels: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    generations: int = 40,
    offspring: int = 12,
    stage_windows: Sequence[int] = (8, 64),
    survivors: Sequence[int] = (3, 1),
    where: str | Sequence[str] | None = None,
) -> EvoPressSpec:
    """prune=evopress: `EvoPressSpec`; ``sparsity`` must be one of ``levels`` (the uniform
    allocation the search starts from)."""
    s = _fraction("sparsity", sparsity)
    if base not in EVOPRESS_BASES:
        raise ValueError(f"prune.base={base!r}: choose one of {EVOPRESS_BASES}.")
    levels = tuple(float(v) for v in levels)
    if not any(math.isclose(s, v) for v in levels):
        raise ValueError(f"prune.sparsity={s:g} must be one of prune.levels {list(levels)}.")
    if len(stage_windows) != len(survivors) or list(survivors)[-1:] != [1]:
        raise ValueError(
            "prune.stage_windows and prune.survivors need one entry per selection stage, and "
            f"survivors must end with 1; got {list(stage_windows)} and {list(survivors)}."
        )
    if generations < 0 or offspring < 1 or min(stage_windows) < 1:
        raise ValueError("prune.generations >= 0, prune.offspring >= 1, stage_windows >= 1.")
    return EvoPressSpec(
        s,
        base,
        levels,
        int(generations),
        int(offspring),
        tuple(int(w) for w in stage_windows),
        tuple(int(k) for k in survivors),
        _where(where),
    )


@dataclasses.dataclass(frozen=True)
class WinaSpec:
    """prune=wina: activation sparsity and the Dense modules it gates."""

    sparsity: float
    modules: Any


def wina(sparsity: float = 0.5, modules: str | Sequence[str] | None = None) -> WinaSpec:
    """prune=wina: `WinaSpec` (modules: regexes over Dense module paths; None: the byte LM's
    attention and MLP projections, every Dense module of other models)."""
    return WinaSpec(_fraction("sparsity", sparsity), _where(modules))


@dataclasses.dataclass(frozen=True)
class DareSpec:
    """prune=dare: drop rate, rescaling, the fine-tune it acts on."""

    sparsity: float
    rescale: bool
    q: float | None
    subset: str
    finetune_steps: int
    finetune_steps_smoke: int
    finetune_lr: float
    subset_bytes: int
    subset_bytes_smoke: int
    where: Any


def dare(
    sparsity: float = 0.9,
    rescale: bool = True,
    q: float | None = None,
    subset: str = "net",
    finetune_steps: int = 60,
    finetune_steps_smoke: int = 40,
    finetune_lr: float = 1e-3,
    subset_bytes: int = 600_000,
    subset_bytes_smoke: int = 200_000,
    where: str | Sequence[str] | None = None,
) -> DareSpec:
    """prune=dare: `DareSpec` (subset: a name of `zoo.LM_FINETUNE_SUBSETS`)."""
    from feynkit.experiments.zoo import LM_FINETUNE_SUBSETS

    p = _fraction("sparsity", sparsity)
    if subset not in LM_FINETUNE_SUBSETS:
        raise ValueError(f"prune.subset={subset!r}: choose one of {sorted(LM_FINETUNE_SUBSETS)}.")
    if q is not None and not 1.0 - p - 1e-9 <= float(q) <= 1.0:
        raise ValueError(f"prune.q={q} must lie in [1 - sparsity, 1] = [{1 - p:g}, 1] or be null.")
    for name, v in (
        ("finetune_steps", finetune_steps),
        ("finetune_steps_smoke", finetune_steps_smoke),
        ("subset_bytes", subset_bytes),
        ("subset_bytes_smoke", subset_bytes_smoke),
    ):
        if int(v) < 1:
            raise ValueError(f"prune.{name}={v} must be >= 1.")
    if not finetune_lr > 0:
        raise ValueError(f"prune.finetune_lr={finetune_lr} must be > 0.")
    return DareSpec(
        p,
        bool(rescale),
        None if q is None else float(q),
        subset,
        int(finetune_steps),
        int(finetune_steps_smoke),
        float(finetune_lr),
        int(subset_bytes),
        int(subset_bytes_smoke),
        _where(where),
    )


SPECS = (FlapSpec, EvoPressSpec, WinaSpec, DareSpec)


def _count(tree) -> int:
    return sum(int(np.prod(jnp.shape(x))) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------
# FLAP
# ---------------------------------------------------------------------------------------------


def structured_prune(ctx, spec: FlapSpec, bundle, inputs):
    """FLAP on the byte LM: ``(shrunk params, zeroed full-shape params, plan)``; reports the
    parameter counts, kept heads/channels per layer and the removed fraction."""
    from feynkit.compression.prune.flap import flap_plan, flap_prune, flap_statistics

    model, params = bundle.extras["model"], bundle.params
    hd = model.head_dim
    t0 = time.perf_counter()
    stats = flap_statistics(bundle.apply_fn, params, inputs)
    ctx.metric("prune_calibration_seconds", time.perf_counter() - t0)
    t0 = time.perf_counter()
    plan = flap_plan(params, stats, spec.sparsity, hd, spec.structure)
    shrunk = flap_prune(params, stats, plan, hd, bias_compensation=spec.bias_compensation)
    ctx.metric("prune_seconds", time.perf_counter() - t0)
    zeroed = flap_prune(params, stats, plan, hd, bias_compensation=False, shrink=False)
    n0 = ctx.metric("params.float", _count(params))
    n1 = ctx.metric("params.pruned", _count(shrunk))
    ctx.metric("params_ratio", n1 / n0)
    ctx.metric("removed_fraction", plan.removed_fraction)
    for name in plan.heads:  # read off the shrunk arrays
        layer = shrunk[name]
        ctx.metric(f"heads_kept.{name}", layer["self_attn"]["q_proj"]["kernel"].shape[1] // hd)
        ctx.metric(f"channels_kept.{name}", layer["mlp"]["gate_proj"]["kernel"].shape[1])
    ctx.claim("the shrunk model has fewer parameters (params ratio < 1)", n1 / n0, 1.0)
    return shrunk, zeroed, plan


def shrunk_layer_errors(float_params, zeroed) -> dict[str, float]:
    """‖W − W_zeroed‖_F / ‖W‖_F of every attention/MLP kernel FLAP touched (full shapes)."""
    from feynkit.compression.quant import path_str

    flat_z = dict((path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(zeroed)[0])
    out = {}
    for p, w in jax.tree_util.tree_flatten_with_path(float_params)[0]:
        name = path_str(p)
        if not re.search(r"(self_attn|mlp)/\w+_proj/kernel$", name):
            continue
        w = jnp.asarray(w, jnp.float32)
        out[name] = float(
            jnp.linalg.norm(w - flat_z[name]) / jnp.maximum(jnp.linalg.norm(w), 1e-30)
        )
    return out


# ---------------------------------------------------------------------------------------------
# EvoPress
# ---------------------------------------------------------------------------------------------


def evopress_prune(ctx, spec: EvoPressSpec, bundle, inputs, where):
    """``(pruned params, masks)`` of the EvoPress allocation over `where`'s kernels."""
    from feynkit.compression.prune import RECIPES, prune_tree
    from feynkit.compression.prune.evopress import (
        assemble,
        average_sparsity,
        build_database,
        kl_search_from_uniform,
    )
    from feynkit.compression.quant import calibrate

    params = bundle.params
    (windows,) = inputs
    if max(spec.stage_windows) > len(windows):
        raise ValueError(
            f"prune.stage_windows={list(spec.stage_windows)} needs at most "
            f"prune.calibration.num_samples={len(windows)} windows per stage."
        )
    t0 = time.perf_counter()
    calib = (
        calibrate(bundle.apply_fn, params, windows, where=where)
        if spec.base != "magnitude"
        else None
    )
    values, masks = {}, {}
    for s in spec.levels:
        pruned, m = prune_tree(params, RECIPES[spec.base](s, where=where), calibration=calib)
        values[s], masks[s] = _flat(pruned), _flat(m)
    db = build_database(params, where, spec.levels, lambda p, w, s: values[s][p])
    mask_db = build_database(params, where, spec.levels, lambda p, w, s: masks[s][p])
    ctx.metric("database_seconds", time.perf_counter() - t0)
    t0 = time.perf_counter()
    res, uniform, fits = kl_search_from_uniform(
        jax.random.fold_in(ctx.key, 7),
        bundle.apply_fn,
        params,
        db,
        windows,
        spec.sparsity,
        spec.stage_windows,
        spec.survivors,
        generations=spec.generations,
        offspring=spec.offspring,
    )
    ctx.metric("search_seconds", time.perf_counter() - t0)
    ctx.metric("evopress.uniform_calib_kl", res.history[0])
    ctx.metric("evopress.searched_calib_kl", res.fitness)
    avg = ctx.metric("evopress.avg_sparsity", average_sparsity(db, res.levels))
    for p, lv in zip(db.paths, res.levels, strict=True):
        ctx.metric(f"evopress.sparsity.{p}", float(db.levels[lv]))
    ctx.claim(
        "searched calibration KL <= the uniform allocation's (elitist search)",
        res.fitness,
        res.history[0],
        "<=",
    )
    ctx.claim(
        f"average sparsity of the allocation equals {spec.sparsity:g} (|difference| < 1e-9)",
        abs(avg - average_sparsity(db, uniform)),
        1e-9,
    )
    none_masks = jax.tree.map(lambda _: None, params)
    lv = jnp.asarray(res.levels)
    keep = assemble(none_masks, mask_db, lv)
    return assemble(params, db, lv), keep, assemble(params, db, jnp.asarray(uniform))


def _flat(tree) -> dict:
    from feynkit.compression.quant import path_str

    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return {path_str(p): x for p, x in leaves if x is not None}


# ---------------------------------------------------------------------------------------------
# WINA
# ---------------------------------------------------------------------------------------------


def run_wina(ctx, spec: WinaSpec, bundle, report) -> None:
    """The model's metric with WINA and with magnitude-only gating at ``spec.sparsity``, the
    gated fraction measured inside the forward pass, and the relative output error
    ‖f_gated − f‖ / ‖f‖ on `WINA_PROBE` calibration inputs (the paper's measure)."""
    from feynkit.compression.prune.wina import sparse_activation_apply

    modules = spec.modules if spec.modules is not None else (None if bundle.kind == "lm" else ".*")
    kw = {} if modules is None else {"where": modules}
    probe = bundle.calibration_inputs(jax.random.key(0), WINA_PROBE)
    gated_apply = bundle.calibration_apply or bundle.apply_fn
    dense = jax.tree.leaves(jax.jit(gated_apply)(bundle.params, *probe))
    values, errors = {}, {}
    for method in ("wina", "magnitude"):
        apply = sparse_activation_apply(bundle.apply_fn, spec.sparsity, method, **kw)
        stats_apply = sparse_activation_apply(
            gated_apply, spec.sparsity, method, return_gated=True, **kw
        )
        out, gated = jax.jit(stats_apply)(bundle.params, *probe)
        frac = float(np.mean([float(v) for v in gated.values()]))
        ctx.metric(f"activation_sparsity.{method}", frac)
        ctx.metric(f"gated_layers.{method}", len(gated))
        diff = sum(
            float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(out), dense, strict=True)
        )
        norm = sum(float(jnp.sum(b**2)) for b in dense)
        errors[method] = ctx.metric(f"output_error.{method}", math.sqrt(diff / max(norm, 1e-30)))
        values[method] = report(apply, bundle.params, method, claim=method == "wina")
        if method == "wina":
            dims = [int(x.shape[0]) for x in _dense_kernels(bundle.params)]
            tol = 0.5 / min(dims) + 1e-6 if dims else 1e-6
            ctx.claim(
                f"gated fraction within {tol:.2g} of prune.sparsity={spec.sparsity:g}",
                abs(frac - spec.sparsity),
                tol,
            )
    _bars(ctx, "wina.png", {"float": None, **values}, f"{bundle.name}: gated at {spec.sparsity:g}")
    if not ctx.smoke:  # the paper's claim; the smoke LM (ppl ~80) is too untrained to show it
        ctx.claim(
            f"WINA output error < magnitude-only's at {spec.sparsity:g} activation sparsity",
            errors["wina"],
            errors["magnitude"],
        )


def _dense_kernels(params):
    return [x for x in jax.tree.leaves(params) if jnp.ndim(x) == 2]


# ---------------------------------------------------------------------------------------------
# DARE
# ---------------------------------------------------------------------------------------------


def run_dare(ctx, spec: DareSpec, cfg, settings, smoke: bool) -> None:
    """Fine-tune (cached, `zoo.finetuned_lms`), DARE its delta, perplexity on the subset."""
    from feynkit.compression.prune.dare import dare_delta, merge_deltas, task_vector
    from feynkit.compression.quant import LINEAR_KERNELS, match_paths
    from feynkit.experiments import zoo
    from feynkit.experiments.evaluation import lm_perplexity, scoring_windows
    from feynkit.experiments.tasks.build import option_kwargs

    ex = zoo.LMConfig(**option_kwargs(cfg.model))
    model, base, fts = zoo.finetuned_lms(
        ex,
        int(ctx.seed),
        smoke,
        steps=spec.finetune_steps_smoke if smoke else spec.finetune_steps,
        learning_rate=spec.finetune_lr,
        max_bytes=spec.subset_bytes_smoke if smoke else spec.subset_bytes,
        subsets=[spec.subset],
    )
    seq_len = zoo.model_config(zoo.LMConfig, ex, smoke).seq_len
    cached, corpus = fts[spec.subset]
    theta0, theta = jax.device_put(base.params), jax.device_put(cached.params)
    windows = scoring_windows(corpus.validation, seq_len, int(settings.eval_windows))
    if len(windows) < 1:
        raise ValueError(f"the {spec.subset!r} validation split is too short for one window.")
    ctx.metric("eval_windows", len(windows))
    where = LINEAR_KERNELS if spec.where is None else spec.where
    delta = task_vector(theta0, theta)
    t0 = time.perf_counter()
    sparse = dare_delta(
        jax.random.fold_in(ctx.key, 11),
        delta,
        spec.sparsity,
        rescale=spec.rescale,
        q=spec.q,
        where=where,
    )
    dared = merge_deltas(theta0, [sparse], [1.0])
    ctx.metric("prune_seconds", time.perf_counter() - t0)
    selected = set(match_paths(delta, where))
    from feynkit.compression.quant import path_str

    dropped = total = 0
    for p, d in jax.tree_util.tree_flatten_with_path(sparse)[0]:
        if path_str(p) in selected:
            dropped += int(jnp.sum(d == 0))
            total += int(d.size)
    frac = ctx.metric("sparsity.delta", dropped / max(total, 1))
    ctx.metric("delta_entries", total)
    tol = float(settings.max_sparsity_error)
    ctx.claim(
        f"dropped delta fraction within {tol:g} of {spec.sparsity:g}",
        abs(frac - spec.sparsity),
        tol,
    )
    apply = model.forward
    ppl = {
        name: ctx.metric(f"perplexity.{name}", lm_perplexity(apply, p, windows))
        for name, p in (("base", theta0), ("finetuned", theta), ("compressed", dared))
    }
    ratio = ctx.metric("perplexity_ratio", ppl["compressed"] / ppl["finetuned"])
    gain = ppl["base"] - ppl["finetuned"]
    if gain > 0:
        ctx.metric("finetune_gain_kept", (ppl["base"] - ppl["compressed"]) / gain)
    bound = float(settings.max_perplexity_ratio)
    ctx.claim(f"DARE'd / fine-tuned perplexity on {spec.subset} < {bound:g}", ratio, bound)
    _bars(ctx, "dare.png", ppl, f"byte_lm on {spec.subset}: DARE p={spec.sparsity:g}")
    return ppl


def _bars(ctx, filename: str, values: dict, title: str) -> None:
    """A bar chart of the model's metric per variant (None: read ``<metric>.float``)."""
    name = "perplexity"
    for k, v in list(values.items()):
        if v is None:
            found = [m for m in ctx.results.metrics if m.endswith(".float")]
            values[k] = ctx.results.metrics[found[0]] if found else float("nan")
            name = found[0].rsplit(".", 1)[0] if found else name
    with ctx.figure(filename, size=3.5) as (fig, axes):
        ax = axes[0, 0]
        ax.bar(list(values), list(values.values()))
        ax.set_ylabel(name)
        ax.set_title(title, fontsize=9)
