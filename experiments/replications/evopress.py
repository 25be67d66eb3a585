"""Replication: EvoPress — searched per-layer sparsities against uniform at equal average.

Every attention and MLP kernel of the `train_lm` TransformerLM is pruned once at each level of
`levels` by Wanda (`feynkit.compression.prune.wanda_mask`: |W|·‖X_j‖ per output channel, the
input norms from the Hessian diagonal of `calib_windows` training windows), giving EvoPress's
database (`feynkit.compression.prune.evopress.build_database`). Starting from the uniform
allocation (every kernel at `target_sparsity`), `kl_search_from_uniform` runs `generations` of
`offspring` level-switch mutants (sparsity moves between kernels of equal size, so the
parameter-weighted average stays exactly at the target), selected in two stages on the
KL divergence of the pruned model's next-byte distribution from the dense model's: the first
`stage_windows[0]` calibration windows keep `survivors[0]` candidates, all `stage_windows[1]`
windows pick the next parent. (EvoPress draws a fresh calibration minibatch per stage and
generation; fixed subsets are used here.)

Reported: validation perplexity (first `eval_tokens` bytes, not used by the search) and
calibration KL of the dense, uniform and searched models; the searched allocation per kernel.

Claim (the paper's): the searched non-uniform allocation has lower perplexity than uniform at
equal average sparsity (and the averages are equal).

References: Sieberling et al. (2025), "EvoPress: Towards Optimal Dynamic Model Compression via
Evolutionary Search"; Sun et al. (2024), "A Simple and Effective Pruning Approach for LLMs"
(Wanda).
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import MISSING

from feynkit.compression.prune import wanda_mask
from feynkit.compression.prune.evopress import (
    assemble,
    average_sparsity,
    build_database,
    kl_search_from_uniform,
)
from feynkit.compression.quant.calibration import linear_hessians
from feynkit.compression.quant.tree import LINEAR_KERNELS
from feynkit.experiments import harness
from feynkit.experiments.evaluation import consecutive_windows, lm_nll_fn
from feynkit.experiments.zoo import load_lm


@dataclasses.dataclass
class EvoPressConfig(harness.ReplicationConfig):
    """Schema of `configs/experiment/evopress.yaml` (the values live there)."""

    cache_dir: str | None = MISSING
    lm_smoke: bool = MISSING
    calib_windows: int = MISSING
    calib_len: int = MISSING
    eval_tokens: int = MISSING
    levels: list[float] = MISSING
    target_sparsity: float = MISSING
    generations: int = MISSING
    offspring: int = MISSING
    stage_windows: list[int] = MISSING
    survivors: list[int] = MISSING

    def __post_init__(self):
        for key in ("calib_windows", "calib_len", "eval_tokens", "offspring"):
            harness.require(getattr(self, key) >= 1, key, "must be >= 1.")
        harness.require(
            any(math.isclose(self.target_sparsity, s) for s in self.levels),
            "target_sparsity",
            f"must be one of levels {self.levels} (the uniform start).",
        )
        harness.require(
            len(self.stage_windows) == len(self.survivors) and self.survivors[-1:] == [1],
            "survivors",
            "must have one entry per stage_windows entry and end with 1.",
        )
        harness.require(
            all(1 <= w <= self.calib_windows for w in self.stage_windows),
            "stage_windows",
            f"entries must lie in [1, calib_windows={self.calib_windows}].",
        )


@harness.replication("evopress", EvoPressConfig)
def run(ex: EvoPressConfig, ctx: harness.Context) -> None:
    model, params, corpus, lm_ex = load_lm(ex)
    params = jax.device_put(params)
    calib = consecutive_windows(corpus.train, ex.calib_windows, ex.calib_len)
    t0 = time.perf_counter()
    H = linear_hessians(model, params, calib, LINEAR_KERNELS)

    def wanda(path, w, s):
        return jnp.where(wanda_mask(w, jnp.diagonal(H[path]), s), w, jnp.zeros((), w.dtype))

    db = build_database(params, LINEAR_KERNELS, ex.levels, wanda)
    ctx.metric("database_seconds", time.perf_counter() - t0)
    t0 = time.perf_counter()
    res, uniform, fits = kl_search_from_uniform(
        ctx.key,
        model.forward,
        params,
        db,
        calib,
        ex.target_sparsity,
        ex.stage_windows,
        ex.survivors,
        generations=ex.generations,
        offspring=ex.offspring,
    )
    ctx.metric("search_seconds", time.perf_counter() - t0)
    nll = lm_nll_fn(model.forward, corpus.validation[: ex.eval_tokens + 1], lm_ex.seq_len)
    ppl = {"dense": ctx.metric("dense.ppl", math.exp(nll(params)))}
    for name, lv in (("uniform", uniform), ("searched", res.levels)):
        pruned = assemble(params, db, jnp.asarray(lv))
        ppl[name] = ctx.metric(f"{name}.ppl", math.exp(nll(pruned)))
        ctx.metric(f"{name}.calib_kl", fits[-1](jnp.asarray(lv)))
        ctx.metric(f"{name}.avg_sparsity", average_sparsity(db, lv))
    for p, lv in zip(db.paths, res.levels, strict=True):
        ctx.metric(f"searched.sparsity.{p}", float(db.levels[lv]))
    ctx.claim(
        "searched and uniform allocations have equal average sparsity (|difference| < 1e-9)",
        abs(average_sparsity(db, res.levels) - average_sparsity(db, uniform)),
        1e-9,
    )
    ctx.claim(
        f"EvoPress allocation perplexity < uniform at {ex.target_sparsity:g} average sparsity",
        ppl["searched"],
        ppl["uniform"],
    )
    with ctx.figure("evopress.png", ncols=2, size=4.0) as (fig, axes):
        axes[0, 0].plot(res.history, "o-", ms=3)
        axes[0, 0].set_xlabel("generation")
        axes[0, 0].set_ylabel("parent fitness (calibration KL)")
        names = [p.replace("/kernel", "") for p in db.paths]
        axes[0, 1].barh(np.arange(len(names)), db.levels[res.levels])
        axes[0, 1].axvline(ex.target_sparsity, color="k", ls="--", lw=1)
        axes[0, 1].set_yticks(np.arange(len(names)), names, fontsize=6)
        axes[0, 1].set_xlabel("searched sparsity")
