"""Training: a Bernoulli VAE on binarised 8x8 digits, scored by its ELBO on the test split.

Pixels are binarised once (value > 8 of 16, i.e. x > 0 on the [−1, 1] scale), so p_θ(x | z) is a
proper Bernoulli likelihood and the ELBO a lower bound on log p(x) in nats per image. Reported on
the test split: the ELBO (mean of one-sample estimates over several draws), its reconstruction
and KL terms, and the tighter importance-weighted bound

    log p(x) ≥ E log (1/K) Σ_k p(x | z_k) p(z_k) / q(z_k | x),   z_k ~ q(z | x).

The baseline is exact: the test log-likelihood of independent per-pixel Bernoullis fitted to the
training images (add-one smoothed), the best model that ignores correlations between pixels.

References: Kingma & Welling (2014), "Auto-Encoding Variational Bayes"; Burda, Grosse &
Salakhutdinov (2016), "Importance Weighted Autoencoders".
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import MISSING

from feynkit.core.checkpoint import save_checkpoint
from feynkit.experiments import harness, zoo
from feynkit.experiments import train as tr
from feynkit.experiments.data import load_digits_split
from feynkit.models import VAE, VAEOutput, decoder_log_prob


@dataclasses.dataclass
class TrainVAEConfig(harness.ReplicationConfig, zoo.VAEModelConfig):
    """Schema of `configs/experiment/train_vae.yaml`: the model fields of `zoo.VAEModelConfig`
    (which define the cached model) and the evaluation."""

    elbo_draws: int = MISSING  # one-sample ELBOs averaged per test image
    iwae_samples: int = MISSING
    max_neg_elbo: float = MISSING  # claim: test −ELBO (nats per image) below this
    baseline_margin: float = MISSING  # claim: test ELBO > independent-pixel baseline + this

    def __post_init__(self):
        harness.require(self.elbo_draws >= 1, "elbo_draws", "must be >= 1.")
        harness.require(self.iwae_samples >= 1, "iwae_samples", "must be >= 1.")
        harness.require(self.latent_dim >= 1, "latent_dim", "must be >= 1.")


def iwae_bound(model: VAE, params, key, x: jax.Array, num_samples: int) -> jax.Array:
    """Per-image importance-weighted bound log (1/K) Σ_k p(x, z_k)/q(z_k | x)."""
    mean, logvar = model.encode(params, x)
    eps = jax.random.normal(key, (num_samples, *mean.shape), mean.dtype)
    z = mean[None] + jnp.exp(0.5 * logvar[None]) * eps  # (K, B, k)
    recon = model.decode(params, z)
    out = VAEOutput(mean, logvar, z, recon, jnp.zeros_like(recon))
    x = jnp.broadcast_to(x[None], recon.shape)
    log_px_z = decoder_log_prob(x, out, model.likelihood, len(model.data_shape))
    log_pz = -0.5 * jnp.sum(z**2 + math.log(2 * math.pi), -1)
    log_qz = -0.5 * jnp.sum(eps**2 + logvar[None] + math.log(2 * math.pi), -1)
    return jax.nn.logsumexp(log_px_z + log_pz - log_qz, axis=0) - math.log(num_samples)


def independent_bernoulli_loglik(x_train: np.ndarray, x_test: np.ndarray) -> float:
    """Mean test log-likelihood (nats per image) of add-one smoothed per-pixel Bernoullis."""
    p = (x_train.sum(0) + 1.0) / (x_train.shape[0] + 2.0)
    ll = x_test * np.log(p) + (1 - x_test) * np.log1p(-p)
    return float(ll.reshape(len(x_test), -1).sum(1).mean())


@harness.replication("train_vae", TrainVAEConfig)
def run(ex: TrainVAEConfig, ctx: harness.Context) -> None:
    """Train (or load) the zoo's VAE and bound its test log-likelihood; with ``smoke=true`` the
    model is the zoo's smoke model (`zoo.VAE_SMOKE`)."""
    tr.quiet_checkpoint_logging()
    res = ctx
    key = ctx.key
    split = load_digits_split()
    x_train, x_test = zoo.binarize(split.x_train), zoo.binarize(split.x_test)
    model, cached = zoo.trained_vae(ex, ctx.seed, split, smoke=ctx.smoke)
    params = cached.params
    save_checkpoint(ctx.out_dir / "checkpoints" / "vae", 0, params)
    res.metric("cache_hit", float(cached.hit))
    if cached.info.get("history"):
        res.metric("final_train_loss", cached.info["history"][-1][1])
    if "train_seconds" in cached.info:
        res.metric("train_seconds", cached.info["train_seconds"])

    @jax.jit
    def evaluate(params, key, x):
        def one(k):
            out = model.forward(params, k, x)
            rec = decoder_log_prob(x, out, model.likelihood, 3)
            kl = 0.5 * jnp.sum(jnp.exp(out.logvar) + out.mean**2 - 1.0 - out.logvar, -1)
            return rec, kl

        rec, kl = jax.lax.map(one, jax.random.split(key, ex.elbo_draws))
        return rec.mean(), kl.mean()

    k_eval, k_iwae, k_prior = jax.random.split(jax.random.fold_in(key, 1), 3)
    xt = jnp.asarray(x_test)
    rec, kl = evaluate(params, k_eval, xt)
    elbo = res.metric("test_elbo", rec - kl)
    res.metric("test_reconstruction", rec)
    res.metric("test_kl", kl)
    iwae = jax.jit(iwae_bound, static_argnums=(0, 4))(model, params, k_iwae, xt, ex.iwae_samples)
    res.metric(f"test_iwae_k{ex.iwae_samples}", jnp.mean(iwae))
    train_elbo = jnp.mean(tr.vae_elbo(model, params, k_eval, jnp.asarray(x_train)))
    res.metric("train_elbo", train_elbo)
    baseline = independent_bernoulli_loglik(x_train, x_test)
    res.metric("baseline_independent_pixels", baseline)
    res.claim("test -ELBO (nats/image) < bound", -elbo, ex.max_neg_elbo)
    res.claim(
        f"test ELBO > independent-pixel log-likelihood + {ex.baseline_margin:g}",
        elbo,
        baseline + ex.baseline_margin,
        ">",
    )
    recon = jax.nn.sigmoid(model.decode(params, model.encode(params, xt[:10])[0]))
    prior = jax.nn.sigmoid(model.decode(params, jax.random.normal(k_prior, (10, model.latent_dim))))
    _plot(ctx, x_test[:10], np.asarray(recon), np.asarray(prior), cached.info.get("history", []))


def _plot(ctx: harness.Context, x, recon, prior, history) -> None:
    kw = dict(figsize=(11, 3.2), gridspec_kw={"width_ratios": [1.6, 1]})
    with ctx.figure("train_vae.png", 1, 2, **kw) as (fig, axes):
        _draw(axes[0], x, recon, prior, history)


def _draw(axes, x, recon, prior, history) -> None:
    rows = np.concatenate([r.reshape(10, 8, 8) for r in (x, recon, prior)])
    grid = rows.reshape(3, 10, 8, 8).transpose(0, 2, 1, 3).reshape(24, 80)
    axes[0].imshow(grid, cmap="gray_r", vmin=0, vmax=1)
    axes[0].set_title("test digits / reconstructions (mean) / prior samples (mean)", fontsize=9)
    axes[0].axis("off")
    if history:
        steps, losses = zip(*((h[0], h[1]) for h in history), strict=True)
        axes[1].plot(steps, losses)
    axes[1].set_xlabel("step")
    axes[1].set_title("training −ELBO (nats/image)", fontsize=9)
