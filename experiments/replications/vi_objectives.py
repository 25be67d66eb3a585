"""VI objectives: bound ordering and gradient-estimator variance on a conjugate Gaussian model.

Model: z ~ N(0, I_d), x_n | z ~ N(A z, σ² I) for n = 1..N with a fixed random A, so the
posterior is Gaussian with correlations and log p(x) is closed form. A mean-field Gaussian q
(fitted by STL-ELBO, hence narrower than the posterior, the mean-field under-dispersion) gives
log-weights with real spread. Measured over repeated draws:

* bounds: E[ELBO] ≤ E[Rényi-½] ≤ E[IWAE_K] ≤ log p(x), and E[IWAE_K] increasing in K
  (Burda et al. 2016, Theorem 1) — "Probabilistic Programming with Programmable VI" states the
  objectives as programs; feynkit composes them with estimators the same way;
* gradient variance (trace of the covariance of the φ-gradient) per estimator and K: score
  function, VIMCO's leave-one-out baselines, reparameterisation, DReG; and STL vs the
  reparameterised ELBO gradient at the exact optimum of a full-rank q (STL's is exactly zero).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from omegaconf import MISSING

from feynkit.experiments import harness
from feynkit.inference import vi


@dataclasses.dataclass
class VIObjectivesConfig(harness.ReplicationConfig):
    dim: int = MISSING
    num_data: int = MISSING
    noise: float = MISSING
    ks: list[int] = MISSING  # IWAE sample sizes
    variance_ks: list[int] = MISSING  # K of the estimator-variance table
    num_repeats: int = MISSING  # draws per bound / gradient estimate
    fit_steps: int = MISSING

    def __post_init__(self):
        harness.require(self.dim >= 1, "dim", "must be >= 1.")
        harness.require(self.num_data >= 1, "num_data", "must be >= 1.")
        harness.require(self.noise > 0, "noise", "must be > 0.")
        harness.require(len(self.ks) >= 2 and min(self.ks) >= 1, "ks", "needs >= 2 values >= 1.")
        harness.require(min(self.variance_ks) >= 2, "variance_ks", "needs values >= 2 (VIMCO).")
        harness.require(self.num_repeats >= 10, "num_repeats", "must be >= 10.")
        harness.require(self.fit_steps >= 0, "fit_steps", "must be >= 0.")


def conjugate_model(key, dim: int, num_data: int, noise: float):
    """(log_joint, data, log evidence, posterior mean, posterior covariance)."""
    k_a, k_z, k_x = jax.random.split(key, 3)
    a = np.asarray(jax.random.normal(k_a, (dim, dim))) / math.sqrt(dim) + np.eye(dim)
    z = np.asarray(jax.random.normal(k_z, (dim,)))
    x = z @ a.T + noise * np.asarray(jax.random.normal(k_x, (num_data, dim)))
    prec = np.eye(dim) + num_data * a.T @ a / noise**2
    cov = np.linalg.inv(prec)
    mean = cov @ a.T @ x.sum(0) / noise**2
    # log p(x) = log p(x | z*) + log p(z*) − log p(z* | x) at any z*, here the posterior mean
    resid = x - mean @ a.T
    log_lik = -0.5 * np.sum(resid**2) / noise**2 - 0.5 * x.size * math.log(2 * math.pi * noise**2)
    log_prior = -0.5 * mean @ mean - 0.5 * dim * math.log(2 * math.pi)
    log_post = -0.5 * dim * math.log(2 * math.pi) - 0.5 * np.linalg.slogdet(cov)[1]
    a_j = jnp.asarray(a, jnp.float32)

    def log_joint(z, x):
        pred = jnp.broadcast_to(a_j @ z, x.shape)
        lik = -0.5 * jnp.sum((x - pred) ** 2) / noise**2
        return lik - 0.5 * jnp.sum(z**2)  # constants do not move gradients; added below

    const = -0.5 * x.size * math.log(2 * math.pi * noise**2) - 0.5 * dim * math.log(2 * math.pi)
    return (
        lambda z, x: log_joint(z, x) + const,
        jnp.asarray(x, jnp.float32),
        float(log_lik + log_prior - log_post),
        mean,
        cov,
    )


def grad_variance(objective, key, log_joint, family, params, data, repeats, **kw):
    """Trace of the covariance of the φ-gradient estimator over `repeats` draws."""

    def one(k):
        g = jax.grad(lambda p: objective(k, log_joint, family, p, data, validate=False, **kw))(
            params
        )
        return jnp.concatenate([a.reshape(-1) for a in jax.tree.leaves(g)])

    g = jax.jit(jax.vmap(one))(jax.random.split(key, repeats))
    return float(jnp.sum(jnp.var(g, 0)))


@harness.replication("vi_objectives", VIObjectivesConfig)
def run(ex: VIObjectivesConfig, ctx: harness.Context) -> None:
    key = ctx.key
    log_joint, data, log_z, post_mean, post_cov = conjugate_model(
        jax.random.fold_in(key, 0), ex.dim, ex.num_data, ex.noise
    )
    ctx.metric("log_evidence", log_z)
    mf = vi.MeanFieldGaussian(ex.dim)
    objective = vi.make_objective("elbo", num_samples=8, estimator="stl")
    params, _ = vi.fit(
        jax.random.fold_in(key, 1),
        objective,
        log_joint,
        mf,
        mf.init(0.0, 0.3),
        optimizer=optax.adam(0.02),
        num_steps=ex.fit_steps,
        data=data,
        checkpoint_every=max(ex.fit_steps, 1),
    )

    def mean_bound(fn, k_fold, **kw):
        keys = jax.random.split(jax.random.fold_in(key, k_fold), ex.num_repeats)
        f = jax.jit(jax.vmap(lambda kk: fn(kk, log_joint, mf, params, data, validate=False, **kw)))
        return float(jnp.mean(f(keys)))

    k_max = max(ex.ks)
    elbo = ctx.metric("bound.elbo", mean_bound(vi.elbo, 2))
    renyi = ctx.metric("bound.renyi_0.5", mean_bound(vi.renyi, 3, alpha=0.5, num_samples=k_max))
    iwae = [ctx.metric(f"bound.iwae_k{k}", mean_bound(vi.iwae, 4, num_samples=k)) for k in ex.ks]
    ctx.metric("bound.gap_iwae_kmin", log_z - iwae[0])
    ctx.metric("bound.gap_iwae_kmax", log_z - iwae[-1])
    ctx.metric("bound.min_increment_in_k", min(np.diff(iwae)))
    ctx.claim("ELBO <= Rényi-1/2 (K max)", elbo, renyi, "<=")
    ctx.claim("Rényi-1/2 <= IWAE (K max)", renyi, iwae[-1], "<=")
    ctx.claim("IWAE (K max) <= log p(x)", iwae[-1], log_z, "<=")
    ctx.claim("IWAE increases in K (min increment > 0)", min(np.diff(iwae)), 0.0, ">")
    ctx.claim("IWAE gap at K max < 3/4 gap at K min", log_z - iwae[-1], 0.75 * (log_z - iwae[0]))

    var = {}
    for k in ex.variance_ks:
        for name, fn, kw in [
            ("score", vi.iwae, {"estimator": "score"}),
            ("vimco", vi.iwae, {"estimator": "vimco"}),
            ("reparam", vi.iwae, {"estimator": "reparam"}),
            ("dreg", vi.iwae, {"estimator": "dreg"}),
        ]:
            v = grad_variance(
                fn,
                jax.random.fold_in(key, 10 + k),
                log_joint,
                mf,
                params,
                data,
                ex.num_repeats,
                num_samples=k,
                **kw,
            )
            var[name, k] = ctx.metric(f"variance.iwae_k{k}.{name}", v)
    k_v = max(ex.variance_ks)
    ctx.claim(
        f"K={k_v}: VIMCO variance < score-function variance", var["vimco", k_v], var["score", k_v]
    )
    ctx.claim(
        f"K={k_v}: DReG variance < reparam IWAE variance", var["dreg", k_v], var["reparam", k_v]
    )

    # STL vs reparameterised ELBO gradient at the exact optimum (full-rank q = posterior)
    fr = vi.FullRankGaussian(ex.dim)
    chol = np.linalg.cholesky(post_cov)
    opt = {
        "loc": jnp.asarray(post_mean, jnp.float32),
        "scale_tril": jnp.asarray(np.tril(chol, -1) + np.diag(np.log(np.diag(chol))), jnp.float32),
    }
    for est in ("reparam", "stl"):
        v = grad_variance(
            vi.elbo,
            jax.random.fold_in(key, 99),
            log_joint,
            fr,
            opt,
            data,
            ex.num_repeats,
            estimator=est,
        )
        var[est, "opt"] = ctx.metric(f"variance.optimum_fullrank.elbo_{est}", v)
    ctx.claim(
        "at the optimum: STL variance < 1e-3 x reparam variance",
        var["stl", "opt"],
        1e-3 * var["reparam", "opt"],
    )

    with ctx.figure("vi_objectives.png", 1, 2) as (fig, axes):
        ax = axes[0, 0]
        ax.semilogx(ex.ks, iwae, "o-", label="IWAE$_K$")
        ax.axhline(log_z, color="k", ls="--", label="log p(x)")
        ax.axhline(elbo, color="C3", ls=":", label="ELBO")
        ax.set_xlabel("K")
        ax.set_title("bounds (mean over draws)", fontsize=9)
        ax.legend(fontsize=8)
        ax = axes[0, 1]
        for name in ("score", "vimco", "reparam", "dreg"):
            ax.loglog(ex.variance_ks, [var[name, k] for k in ex.variance_ks], "o-", label=name)
        ax.set_xlabel("K")
        ax.set_title("IWAE φ-gradient variance (trace)", fontsize=9)
        ax.legend(fontsize=8)
