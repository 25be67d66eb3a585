"""Replication: gradual magnitude pruning vs one-shot pruning at 80–90 % sparsity, same budget.

Starting from the trained byte-level LM (`train_lm`), every attention and MLP kernel is pruned
by magnitude (ranked within each kernel) to a final sparsity s_f ∈ ``sparsities`` in two ways,
each followed by the same ``finetune_steps`` AdamW steps on the training split (same batches,
same learning-rate schedule):

* one-shot: the mask is chosen at step 0 at s_f and kept fixed;
* gradual: the cubic schedule of Zhu & Gupta, s_t = s_f (1 − (t − t₀)/(nΔt))³-complement from 0
  at t₀ = 0 to s_f at ``ramp_fraction`` of the budget, masks updated every ``frequency`` steps.

Both are one Optax transformation (`gradual_magnitude_pruning`, masks in the optimizer state,
chained after the optimizer; one-shot is the same transformation with s_i = s_f) that keeps the
pruned weights at exactly zero. Also reported: one-shot without fine-tuning, and the dense
model fine-tuned for the same steps (the reference the pruned models recover towards).

Claim (Zhu & Gupta 2017, Section 3: gradual pruning lets the network recover from pruning
damage between steps): gradual reaches a lower perplexity than one-shot at each s_f.

References: Zhu & Gupta (2017), "To prune, or not to prune"; Lee et al. (2024), jaxpruner.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from omegaconf import MISSING

from feynkit.compression import prune
from feynkit.compression.quant import LINEAR_KERNELS, match_paths
from feynkit.experiments import harness
from feynkit.experiments.evaluation import lm_nll_fn
from feynkit.experiments.losses import next_token_loss
from feynkit.experiments.train import make_optimizer, train, window_batch_fn
from feynkit.experiments.zoo import load_lm


@dataclasses.dataclass
class PruneGradualConfig(harness.ReplicationConfig):
    """Schema of `configs/experiment/prune_gradual.yaml` (the values live there)."""

    cache_dir: str | None = MISSING
    lm_smoke: bool = MISSING
    sparsities: list[float] = MISSING
    finetune_steps: int = MISSING
    ramp_fraction: float = MISSING  # gradual: s_f reached at this fraction of the budget
    frequency: int = MISSING  # gradual: steps between mask updates
    batch_size: int = MISSING
    learning_rate: float = MISSING
    warmup_steps: int = MISSING
    eval_tokens: int = MISSING
    dense_reference: bool = MISSING  # also fine-tune the dense model for the same steps

    def __post_init__(self):
        for s in self.sparsities:
            harness.require(0 < s < 1, "sparsities", f"entries must lie in (0, 1), got {s}.")
        harness.require(self.finetune_steps >= 2, "finetune_steps", "must be >= 2.")
        harness.require(0 < self.ramp_fraction <= 1, "ramp_fraction", "must lie in (0, 1].")
        harness.require(self.frequency >= 1, "frequency", "must be >= 1.")


@harness.replication("prune_gradual", PruneGradualConfig)
def run(ex: PruneGradualConfig, ctx: harness.Context) -> None:
    model, params, corpus, lm_ex = load_lm(ex)
    nll = lm_nll_fn(model.forward, corpus.validation[: ex.eval_tokens + 1], lm_ex.seq_len)
    loss_fn = next_token_loss(model.forward)
    batch_fn = window_batch_fn(ex.batch_size, lm_ex.seq_len)
    data = jnp.asarray(corpus.train)
    T = ex.finetune_steps
    paths = match_paths(params, LINEAR_KERNELS)
    ppl = {"float": ctx.metric("float.ppl", math.exp(nll(params)))}

    def finetune(name, pruner):
        opt = make_optimizer(ex.learning_rate, T, ex.warmup_steps)
        if pruner is not None:
            opt = optax.chain(opt, pruner)
        key = jax.random.fold_in(jax.random.key(ctx.seed), 7)
        state, hist = train(
            loss_fn,
            opt,
            params,
            batch_fn,
            key,
            T,
            data=data,
            log_every=max(1, T // 4),
            steps_per_call=max(1, T // 4),
            progress=False,
            desc=name,
        )
        p = state.params
        ppl[name] = ctx.metric(f"{name}.ppl", math.exp(nll(p)))
        ctx.metric(f"{name}.train_seconds", hist[-1][2])
        if pruner is not None:
            masks = prune.pruning_masks(state.opt_state)
            flat_p = traverse_util.flatten_dict(p, sep="/")
            flat_m = traverse_util.flatten_dict(masks, sep="/")
            ctx.metric(f"{name}.sparsity", prune.mask_sparsity(masks))
            ok = all(bool(jnp.all(flat_p[q][~flat_m[q]] == 0)) for q in paths)
            ctx.metric(f"{name}.exact_zeros", float(ok))
        print(f"{name:>20}: ppl {ppl[name]:.4f}", flush=True)

    if ex.dense_reference:
        finetune("dense_finetuned", None)
    for s in ex.sparsities:
        tag = f"{round(100 * s)}"
        oneshot, _ = prune.prune_tree(
            params, prune.magnitude_recipe(s, granularity="layer"), where=LINEAR_KERNELS
        )
        ppl[f"oneshot_noft.{tag}"] = ctx.metric(f"oneshot_noft.{tag}.ppl", math.exp(nll(oneshot)))
        kw = dict(granularity="layer", where=LINEAR_KERNELS)
        finetune(
            f"oneshot.{tag}",
            prune.gradual_magnitude_pruning(s, 0, 1, frequency=1, initial_sparsity=s, **kw),
        )
        end = max(1, int(round(ex.ramp_fraction * T)))
        finetune(
            f"gradual.{tag}",
            prune.gradual_magnitude_pruning(s, 0, end, frequency=min(ex.frequency, end), **kw),
        )
        ctx.claim(
            f"gradual < one-shot perplexity at {tag}% after {T} fine-tuning steps",
            ppl[f"gradual.{tag}"],
            ppl[f"oneshot.{tag}"],
        )
    with ctx.figure("prune_gradual.png", size=4.0) as (fig, axes):
        ax = axes[0, 0]
        xs = np.array(ex.sparsities) * 100
        for kind, mk in (("oneshot_noft", "x"), ("oneshot", "o"), ("gradual", "s")):
            ax.plot(xs, [ppl[f"{kind}.{round(x)}"] for x in xs], marker=mk, label=kind)
        ax.axhline(ppl["float"], color="k", ls="--", lw=1, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("validation perplexity")
        ax.legend(fontsize=7)
