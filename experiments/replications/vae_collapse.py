"""Posterior-collapse diagnostic ("Beyond Vanilla VAEs", Dang et al. 2024) on the digits VAE.

The zoo's Bernoulli VAE on binarised 8x8 digits is trained with the ELBO (β = 1, healthy) and
as a β-VAE with a large β (the KL term weighted β times, the regime the paper's linear analysis
predicts to collapse). On the test split the diagnostic reports, per latent dimension, the KL
E_x KL(q(z_i | x) ‖ N(0, 1)) (ε-posterior collapse: KL_i < ε) and the active-unit statistic
Var_x E[z_i | x] (Burda et al. 2016), and flags a model as collapsed when at least half of its
dimensions are ε-collapsed.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from omegaconf import MISSING

from feynkit.experiments import harness, zoo
from feynkit.experiments import train as tr
from feynkit.experiments.data import load_digits_split
from feynkit.inference.vi import collapse_report


@dataclasses.dataclass
class VAECollapseConfig(harness.ReplicationConfig, zoo.VAEModelConfig):
    collapse_beta: float = MISSING  # β of the collapsed model
    kl_threshold: float = MISSING  # ε of ε-posterior collapse (nats)
    activity_threshold: float = MISSING  # active unit: Var_x E[z_i | x] above this
    max_collapsed_fraction: float = MISSING

    def __post_init__(self):
        harness.require(self.collapse_beta > 1, "collapse_beta", "must be > 1.")
        harness.require(self.kl_threshold > 0, "kl_threshold", "must be > 0.")
        harness.require(self.activity_threshold > 0, "activity_threshold", "must be > 0.")
        harness.require(
            0 < self.max_collapsed_fraction <= 1, "max_collapsed_fraction", "must lie in (0, 1]."
        )


@harness.replication("vae_collapse", VAECollapseConfig)
def run(ex: VAECollapseConfig, ctx: harness.Context) -> None:
    tr.quiet_checkpoint_logging()
    split = load_digits_split()
    x_test = jnp.asarray(zoo.binarize(split.x_test))
    reports = {}
    for label, beta in (("healthy", 1.0), ("high_beta", ex.collapse_beta)):
        cfg = zoo.model_config(zoo.VAEModelConfig, ex, ctx.smoke)
        cfg = dataclasses.replace(cfg, beta=beta)
        model, cached = zoo.trained_vae(cfg, ctx.seed, split)
        mean, logvar = model.encode(cached.params, x_test)
        rep = collapse_report(
            mean, logvar, ex.kl_threshold, ex.activity_threshold, ex.max_collapsed_fraction
        )
        reports[label] = rep
        ctx.metric(f"{label}.beta", beta)
        ctx.metric(f"{label}.total_kl", jnp.sum(rep.kl_per_dim))
        ctx.metric(f"{label}.collapsed_fraction", rep.collapsed_fraction)
        ctx.metric(f"{label}.active_units", jnp.sum(rep.active_dims))
        ctx.metric(f"{label}.flagged", rep.collapsed)
        for i, (kl, act) in enumerate(
            zip(np.asarray(rep.kl_per_dim), np.asarray(rep.activity), strict=True)
        ):
            ctx.metric(f"{label}.kl_dim{i}", kl)
            ctx.metric(f"{label}.activity_dim{i}", act)
    ctx.claim("the diagnostic flags the high-β VAE", reports["high_beta"].collapsed, 0.5, ">")
    ctx.claim("the diagnostic passes the healthy VAE", reports["healthy"].collapsed, 0.5, "<")
    ctx.claim(
        "high-β VAE has fewer active units",
        jnp.sum(reports["high_beta"].active_dims),
        jnp.sum(reports["healthy"].active_dims),
        "<",
    )

    with ctx.figure("vae_collapse.png", 1, 2) as (fig, axes):
        for j, (label, rep) in enumerate(reports.items()):
            dims = np.arange(len(rep.kl_per_dim))
            axes[0, 0].bar(dims + 0.4 * j, np.asarray(rep.kl_per_dim), 0.4, label=label)
            axes[0, 1].bar(dims + 0.4 * j, np.asarray(rep.activity), 0.4, label=label)
        axes[0, 0].axhline(ex.kl_threshold, color="k", lw=0.8)
        axes[0, 1].axhline(ex.activity_threshold, color="k", lw=0.8)
        axes[0, 0].set_yscale("log")
        axes[0, 1].set_yscale("log")
        axes[0, 0].set_title("KL per latent dimension (nats)", fontsize=9)
        axes[0, 1].set_title("Var_x E[z_i | x] (active units)", fontsize=9)
        axes[0, 0].set_xlabel("latent dimension")
        axes[0, 1].set_xlabel("latent dimension")
        axes[0, 0].legend(fontsize=8)
