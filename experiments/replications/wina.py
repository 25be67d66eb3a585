"""Replication: WINA vs magnitude-only (TEAL-style) activation sparsity on the trained byte LM.

The inputs of every attention and MLP projection (q/k/v/o, gate/up/down) of the `train_lm`
TransformerLM are sparsified per token at a target sparsity s — the k = d − round(s·d)
entries with the largest score survive — inside the model's own forward pass
(`feynkit.compression.prune.wina.sparse_activation_apply`):

  * magnitude (TEAL-style): score |x_i|;
  * WINA: score |x_i| · ‖W_{i,:}‖₂ (the norm of the weights the input feeds).

Reported per method and s: the relative output error ‖z − z_dense‖ / ‖z_dense‖ of the logits z
on `eval_windows` validation windows, the mean KL(dense ‖ sparse) of the next-byte
distributions, and the perplexity; the achieved sparsity equals s by construction. TEAL's
calibrated thresholds and WINA's column orthogonalisation and greedy per-layer allocation are
not part of this comparison (both methods share the same top-k rule, so only the score differs).

Claims (the paper's): WINA's output error is below magnitude-only's at 50% and at 65%.

References: Chen et al. (2025), "WINA: Weight Informed Neuron Activation for Accelerating Large
Language Model Inference"; Liu et al. (2025), "Training-Free Activation Sparsity in Large
Language Models" (TEAL).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from omegaconf import MISSING

from feynkit.compression.prune.wina import sparse_activation_apply
from feynkit.experiments import harness
from feynkit.experiments.evaluation import scoring_windows, token_nll
from feynkit.experiments.zoo import load_lm


@dataclasses.dataclass
class WinaConfig(harness.ReplicationConfig):
    """Schema of `configs/experiment/wina.yaml` (the values live there)."""

    cache_dir: str | None = MISSING
    lm_smoke: bool = MISSING
    eval_windows: int = MISSING
    sparsities: list[float] = MISSING

    def __post_init__(self):
        harness.require(self.eval_windows >= 1, "eval_windows", "must be >= 1.")
        harness.require(bool(self.sparsities), "sparsities", "must list at least one level.")
        for s in self.sparsities:
            harness.require(0 < s < 1, "sparsities", f"entries must lie in (0, 1), got {s}.")


def _errors(forward, params, w, dense_logits):
    logits = forward(params, w[:, :-1])
    rel = jnp.linalg.norm(logits - dense_logits) / jnp.linalg.norm(dense_logits)
    logp, logq = jax.nn.log_softmax(dense_logits), jax.nn.log_softmax(logits)
    kl = jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1))
    nll = jnp.mean(token_nll(logits, w[:, 1:]))
    return rel, kl, nll


@harness.replication("wina", WinaConfig)
def run(ex: WinaConfig, ctx: harness.Context) -> None:
    model, params, corpus, lm_ex = load_lm(ex)
    w = jnp.asarray(scoring_windows(corpus.validation, lm_ex.seq_len, ex.eval_windows))
    dense_logits = jax.jit(model.forward)(params, w[:, :-1])
    dense_nll = float(jnp.mean(token_nll(dense_logits, w[:, 1:])))
    ctx.metric("dense.ppl", math.exp(dense_nll))
    err = {}
    for s in ex.sparsities:
        tag = f"s{round(100 * s)}"
        for method in ("wina", "magnitude"):
            fwd = jax.jit(sparse_activation_apply(model.forward, s, method))
            rel, kl, nll = _errors(fwd, params, w, dense_logits)
            err[(method, s)] = ctx.metric(f"{tag}.{method}.output_error", float(rel))
            ctx.metric(f"{tag}.{method}.kl", float(kl))
            ctx.metric(f"{tag}.{method}.ppl", math.exp(float(nll)))
            print(f"{tag} {method:>9}: rel. output error {float(rel):.4f}  KL {float(kl):.4f}")
        ctx.claim(
            f"WINA output error < magnitude-only's at {round(100 * s)}% activation sparsity",
            err[("wina", s)],
            err[("magnitude", s)],
        )
    with ctx.figure("wina.png", size=4.0) as (fig, axes):
        ax = axes[0, 0]
        for method in ("wina", "magnitude"):
            ax.plot(ex.sparsities, [err[(method, s)] for s in ex.sparsities], "o-", label=method)
        ax.set_xlabel("activation sparsity")
        ax.set_ylabel("relative logit error")
        ax.legend()
