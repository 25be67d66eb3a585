"""Replication: FLAP structured pruning of the trained byte LM — perplexity with and without bias
compensation, and the speed of the smaller model.

FLAP (`feynkit.compression.prune.flap`) scores attention heads and MLP channels by the
fluctuation of their inputs (Var x_j · ‖W_j‖²) on `calib_windows` windows of the training split,
standardises the scores per layer, removes the lowest-scoring units across all layers until
`ratio` of the attention + MLP parameters are gone (AL-AM), and adds the compensation bias
Σ_removed x̄_j W_j to o_proj/down_proj. Each ratio is run with and without the bias (and, for
reference, with the uniform per-layer structure UL-UM plus bias). The pruned parameters really
are smaller arrays: the same `TransformerLM` runs them (it reads the head counts and widths off
the kernels).

Reported per variant: validation perplexity (first `eval_tokens` bytes), the removed parameter
fraction, and for AL-AM with bias the median wall time of a jitted full-sequence forward pass
(`timing_batch` × seq_len tokens) against the dense model's, timed interleaved in the same run.

Claim (the paper's ablation): with bias compensation the perplexity is lower than without, at
each ratio; the shrunk model's forward pass is faster than the dense one.

References: An et al. (2024), "Fluctuation-based Adaptive Structured Pruning for Large Language
Models" (Table 5: bias compensation ablation).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import jax
import numpy as np
from omegaconf import MISSING

from feynkit.compression.prune.flap import flap_plan, flap_prune, flap_statistics
from feynkit.experiments import harness
from feynkit.experiments.evaluation import consecutive_windows, lm_nll_fn
from feynkit.experiments.zoo import load_lm


@dataclasses.dataclass
class PruneStructuredConfig(harness.ReplicationConfig):
    """Schema of `configs/experiment/prune_structured.yaml` (the values live there)."""

    cache_dir: str | None = MISSING
    lm_smoke: bool = MISSING
    calib_windows: int = MISSING
    calib_len: int = MISSING
    eval_tokens: int = MISSING
    ratios: list[float] = MISSING
    timing_batch: int = MISSING
    timing_repeats: int = MISSING

    def __post_init__(self):
        for key in ("calib_windows", "calib_len", "eval_tokens", "timing_batch", "timing_repeats"):
            harness.require(getattr(self, key) >= 1, key, "must be >= 1.")
        harness.require(bool(self.ratios), "ratios", "must list at least one ratio.")
        for r in self.ratios:
            harness.require(0 < r < 1, "ratios", f"entries must lie in (0, 1), got {r}.")


def forward_seconds(fns: dict, tokens, repeats: int) -> dict[str, float]:
    """Median seconds per call of each jitted ``fn(params, tokens)``, timed interleaved (one
    call of each per round, so load drifts hit all alike) after a compile-and-warm-up call."""
    for fn, params in fns.values():
        jax.block_until_ready(fn(params, tokens))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, (fn, params) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, tokens))
            samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@harness.replication("prune_structured", PruneStructuredConfig)
def run(ex: PruneStructuredConfig, ctx: harness.Context) -> None:
    model, params, corpus, lm_ex = load_lm(ex)
    params = jax.device_put(params)  # restored leaves may be host arrays (copied every call)
    calib = consecutive_windows(corpus.train, ex.calib_windows, ex.calib_len)
    t0 = time.perf_counter()
    stats = flap_statistics(model.forward, params, calib)
    ctx.metric("calibration_seconds", time.perf_counter() - t0)
    nll = lm_nll_fn(model.forward, corpus.validation[: ex.eval_tokens + 1], lm_ex.seq_len)
    ppl = {"dense": ctx.metric("dense.ppl", math.exp(nll(params)))}
    n_dense = ctx.metric("dense.params", _count(params))
    hd = model.head_dim
    timing_tokens = np.asarray(
        consecutive_windows(corpus.validation, ex.timing_batch, lm_ex.seq_len), np.int32
    )
    fwd = jax.jit(model.forward)
    timings = {"dense": (fwd, params)}
    for ratio in ex.ratios:
        tag = f"r{round(100 * ratio)}"
        for structure in ("AL-AM", "UL-UM"):
            plan = flap_plan(params, stats, ratio, hd, structure)
            for bias in (True, False) if structure == "AL-AM" else (True,):
                name = f"{tag}.{'adaptive' if structure == 'AL-AM' else 'uniform'}"
                name += "" if bias else ".nobias"
                pruned = flap_prune(params, stats, plan, hd, bias_compensation=bias)
                ppl[name] = ctx.metric(f"{name}.ppl", math.exp(nll(pruned)))
                ctx.metric(f"{name}.removed_fraction", plan.removed_fraction)
                ctx.metric(f"{name}.params_ratio", _count(pruned) / n_dense)
                heads = sum(int(h.sum()) for h in plan.heads.values())
                ctx.metric(f"{name}.heads_kept", heads)
                print(f"{name:>22}: ppl {ppl[name]:.4f}  removed {plan.removed_fraction:.3f}")
                if structure == "AL-AM" and bias:
                    timings[tag] = (fwd, pruned)
        ctx.claim(
            f"FLAP {tag}: bias compensation lowers perplexity",
            ppl[f"{tag}.adaptive"],
            ppl[f"{tag}.adaptive.nobias"],
        )
    seconds = forward_seconds(timings, timing_tokens, ex.timing_repeats)
    ctx.metric("dense.forward_ms", 1e3 * seconds["dense"])
    for ratio in ex.ratios:
        tag = f"r{round(100 * ratio)}"
        ctx.metric(f"{tag}.adaptive.forward_ms", 1e3 * seconds[tag])
        ctx.metric(f"{tag}.adaptive.speedup", seconds["dense"] / seconds[tag])
    top = f"r{round(100 * max(ex.ratios))}"
    ctx.claim(
        f"FLAP {top}: the shrunk model's forward pass is faster than the dense one (speed-up > 1)",
        ctx.results.metrics[f"{top}.adaptive.speedup"],
        1.0,
        ">",
    )
    with ctx.figure("prune_structured.png", size=4.0) as (fig, axes):
        ax = axes[0, 0]
        rs = list(ex.ratios)
        for suffix, label in (
            ("adaptive", "AL-AM + bias"),
            ("adaptive.nobias", "AL-AM, no bias"),
            ("uniform", "UL-UM + bias"),
        ):
            ax.plot(rs, [ppl[f"r{round(100 * r)}.{suffix}"] for r in rs], "o-", label=label)
        ax.axhline(ppl["dense"], color="k", ls="--", lw=1, label="dense")
        ax.set_xlabel("removed fraction of attention + MLP parameters")
        ax.set_ylabel("validation perplexity")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
