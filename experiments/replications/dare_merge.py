"""Replication: DARE on fine-tunes of the byte LM, and merging two fine-tunes (Super Mario).

The `train_lm` base is fine-tuned (`zoo.finetuned_lms`) on two disjoint groups of standard-library
packages that its own corpus does not contain: "net" (email, http, urllib) and "gui" (tkinter,
idlelib). For each fine-tune, the delta δ = θ_ft − θ_0 of every attention and MLP kernel is
DARE'd (`feynkit.compression.prune.dare`): a fraction p = `drop_rate` of its entries is dropped
at random and the survivors are rescaled by 1/(1 − p); the other deltas (embeddings, norms,
lm_head) are kept. Compared on each task's validation bytes:

  * base, fine-tune, DARE (p, rescale), drop without rescale (p), and at the extreme rate
    `extreme_rate` DARE against DAREx-q (rescale 1/q, q searched on the task's training
    windows with the mask fixed; the grid contains q = 1 − p, plain DARE);
  * merges of both fine-tunes, θ_0 + λ (δ̂_net + δ̂_gui) with `merge_weight` λ (0.5: averaging
    the two models, Super Mario's average merging) with DARE'd deltas, the same with the full
    deltas, and plain task arithmetic (λ = 1) of the DARE'd deltas.

Claims (the papers'): DARE at p = 0.9 keeps each task's perplexity within `keep_bound` × the
fine-tune's; it beats dropping without rescale; the DARE merge serves both tasks — each task's
perplexity below the base's and within `merge_bound` × its fine-tune's; DAREx-q is no worse than
DARE at the extreme rate.

References: Yu et al. (2024), "Language Models are Super Mario"; Deng et al. (2025), "DARE the
Extreme".
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from omegaconf import MISSING

from feynkit.compression.prune.dare import (
    dare,
    dare_delta,
    darex_q_search,
    merge_deltas,
    task_vector,
)
from feynkit.compression.quant.tree import LINEAR_KERNELS
from feynkit.experiments import harness
from feynkit.experiments.evaluation import lm_nll_fn
from feynkit.experiments.zoo import LMConfig, finetuned_lms, model_config


@dataclasses.dataclass
class DareMergeConfig(harness.ReplicationConfig):
    """Schema of `configs/experiment/dare_merge.yaml` (the values live there)."""

    cache_dir: str | None = MISSING
    lm_smoke: bool = MISSING
    finetune_steps: int = MISSING
    finetune_lr: float = MISSING
    subset_bytes: int = MISSING
    eval_tokens: int = MISSING
    search_tokens: int = MISSING
    drop_rate: float = MISSING
    extreme_rate: float = MISSING
    merge_weight: float = MISSING  # λ of θ_0 + λ Σ_k δ̂_k (0.5: averaging two fine-tunes)
    keep_bound: float = MISSING
    merge_bound: float = MISSING

    def __post_init__(self):
        for key in ("finetune_steps", "subset_bytes", "eval_tokens", "search_tokens"):
            harness.require(getattr(self, key) >= 1, key, "must be >= 1.")
        for key in ("drop_rate", "extreme_rate"):
            v = getattr(self, key)
            harness.require(0 <= v < 1, key, f"must lie in [0, 1), got {v}.")
        harness.require(self.finetune_lr > 0, "finetune_lr", "must be > 0.")


@harness.replication("dare_merge", DareMergeConfig)
def run(ex: DareMergeConfig, ctx: harness.Context) -> None:
    lm_ex = LMConfig(cache_dir=ex.cache_dir)
    model, base, fts = finetuned_lms(
        lm_ex,
        0,
        ex.lm_smoke,
        steps=ex.finetune_steps,
        learning_rate=ex.finetune_lr,
        max_bytes=ex.subset_bytes,
    )
    seq_len = model_config(LMConfig, lm_ex, ex.lm_smoke).seq_len
    theta0 = jax.device_put(base.params)
    tasks = list(fts)
    params = {t: jax.device_put(fts[t][0].params) for t in tasks}
    nll = {}
    for t in tasks:
        val = fts[t][1].validation
        if len(val) <= ex.eval_tokens:
            raise ValueError(f"the {t!r} validation split has {len(val)} bytes; lower eval_tokens.")
        nll[t] = lm_nll_fn(model.forward, val[: ex.eval_tokens + 1], seq_len)
    key = ctx.key
    ppl: dict[str, float] = {}

    def score(name, p):
        for t in tasks:
            ppl[f"{name}.{t}"] = ctx.metric(f"{name}.{t}.ppl", math.exp(nll[t](p)))

    score("base", theta0)
    deltas = {t: task_vector(theta0, params[t]) for t in tasks}
    sparse = {}
    for i, t in enumerate(tasks):
        k = jax.random.fold_in(key, i)
        score(f"ft_{t}", params[t])
        sparse[t] = dare_delta(k, deltas[t], ex.drop_rate, where=LINEAR_KERNELS)
        score(f"dare_{t}", merge_deltas(theta0, [sparse[t]], [1.0]))
        score(
            f"drop_{t}",
            dare(k, theta0, params[t], ex.drop_rate, rescale=False, where=LINEAR_KERNELS),
        )
        # DAREx-q at the extreme rate: one fixed mask, q searched on the task's training windows
        train = fts[t][1].train
        search = lm_nll_fn(model.forward, train[: ex.search_tokens + 1], seq_len)
        p = ex.extreme_rate

        def rebuilt(q, k=k, t=t, p=p):
            return dare(k, theta0, params[t], p, q=q, where=LINEAR_KERNELS)

        q_best, _ = darex_q_search(lambda q, rebuilt=rebuilt, search=search: search(rebuilt(q)), p)
        ctx.metric(f"darex_{t}.q", q_best)
        score(f"dare_extreme_{t}", rebuilt(1.0 - p))
        score(f"darex_{t}", rebuilt(q_best))
        ft, dr, dx = (ppl[f"{n}_{t}.{t}"] for n in ("ft", "dare", "drop"))
        ctx.claim(
            f"{t}: DARE p={ex.drop_rate:g} perplexity within {ex.keep_bound:g} x the fine-tune's",
            dr,
            ex.keep_bound * ft,
        )
        ctx.claim(f"{t}: DARE (rescale) perplexity < drop without rescale", dr, dx)
        ctx.claim(
            f"{t}: DAREx-q perplexity <= DARE at p={p:g}",
            ppl[f"darex_{t}.{t}"],
            ppl[f"dare_extreme_{t}.{t}"],
            "<=",
        )
    lam = [ex.merge_weight] * len(tasks)
    score("merge_dare", merge_deltas(theta0, [sparse[t] for t in tasks], lam))
    score("merge_full", merge_deltas(theta0, [deltas[t] for t in tasks], lam))
    score("merge_dare_sum", merge_deltas(theta0, [sparse[t] for t in tasks], [1.0] * len(tasks)))
    for t in tasks:
        m, b, ft = ppl[f"merge_dare.{t}"], ppl[f"base.{t}"], ppl[f"ft_{t}.{t}"]
        ctx.claim(f"merged (DARE) model serves {t}: perplexity < the base's", m, b)
        ctx.claim(
            f"merged (DARE) model serves {t}: perplexity within {ex.merge_bound:g} x the "
            "fine-tune's",
            m,
            ex.merge_bound * ft,
        )
    with ctx.figure("dare_merge.png", ncols=len(tasks), size=3.6) as (fig, axes):
        names = ["base"] + [f"ft_{t}" for t in tasks] + [f"dare_{t}" for t in tasks]
        names += ["merge_dare", "merge_full", "merge_dare_sum"]
        for ax, t in zip(axes[0], tasks, strict=True):
            vals = [ppl[f"{n}.{t}"] for n in names]
            ax.barh(np.arange(len(names)), vals)
            ax.set_yticks(np.arange(len(names)), names, fontsize=7)
            ax.set_xlabel(f"perplexity on {t}")
