"""Replication: first- and second-order Tweedie on Gaussian mixtures; Noise2Score on digits.

Part 1 (exact scores). For Gaussian mixtures in 2 and 8 dimensions and several noise levels of
the linear VP schedule, the first-order Tweedie mean and the second-order covariance computed in
float32 from the mixture's score are compared with the closed-form posterior moments (float64);
Hutchinson's diagonal estimator is compared with the exact diagonal as probes grow (claim: the
RMS error falls like K^(−1/2)); and the Gaussian N(mean, second-order cov) is compared with the
first-order N(mean, σ²/α² I) by the Monte Carlo KL from the true (mixture) posterior.

Part 2 (Noise2Score). The score of the *noisy* digits (8x8, one noisy copy per training image,
no clean image in the loss) is learned by denoising score matching with a small extra
perturbation τ (a noise-conditional ScoreMLP, evaluated at τ_min), and Tweedie's formula for the
noise model denoises held-out noisy digits: Gaussian y = x + σε (x in [−1, 1]) and Poisson
y = ζ Poisson(x'/ζ) on intensities x' = (x + 1)/2. A Gaussian score fitted to the noisy training
data (a linear, Wiener-filter-like denoiser) is reported as a baseline. Claim: MSE after
denoising < MSE of the noisy input, for both noise models.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from omegaconf import MISSING

from feynkit.core.schedules import LinearSchedule
from feynkit.experiments import harness
from feynkit.experiments import train as tr
from feynkit.experiments.data import load_digits_split
from feynkit.inference.diffusion.noise2score import noise2score_gaussian, noise2score_poisson
from feynkit.inference.diffusion.tweedie import (
    tweedie_covariance,
    tweedie_covariance_diag_hutchinson,
    tweedie_mean,
)
from feynkit.models import GaussianMixture, ScoreMLP

CACHE_VERSION = 1


@dataclasses.dataclass
class TweedieConfig(harness.ReplicationConfig):
    """Schema of `configs/experiment/tweedie.yaml` (the values live there)."""

    cache_dir: str | None = MISSING
    dims: list[int] = MISSING
    times: list[float] = MISSING
    num_points: int = MISSING
    hutchinson_time: float = MISSING
    hutchinson_probes: int = MISSING  # base K; groups of 1, 4, 16, ... estimates
    hutchinson_repeats: int = MISSING
    num_kl_points: int = MISSING
    num_kl_samples: int = MISSING
    max_rel_error: float = MISSING  # claim: float32 Tweedie moments vs closed form
    # Noise2Score
    noise2score: bool = MISSING
    gaussian_sigma: float = MISSING  # on the [-1, 1] pixel scale
    poisson_zeta: float = MISSING  # gain
    tau_min_factor: float = MISSING  # τ_min = factor · σ (Gaussian) or 0.5 · ζ (Poisson)
    tau_max: float = MISSING
    hidden: int = MISSING
    num_layers: int = MISSING
    steps: int = MISSING
    batch_size: int = MISSING
    learning_rate: float = MISSING

    def __post_init__(self):
        for t in self.times:
            harness.require(0 < t < 1, "times", f"must lie in (0, 1), got {t}.")
        harness.require(
            0 < self.hutchinson_time < 1,
            "hutchinson_time",
            f"must lie in (0, 1), got {self.hutchinson_time}.",
        )
        harness.require(
            self.hutchinson_repeats >= 4,
            "hutchinson_repeats",
            "must be >= 4 (the error-vs-probes slope needs two group sizes).",
        )
        for key in ("num_points", "hutchinson_probes", "num_kl_points", "num_kl_samples"):
            harness.require(getattr(self, key) >= 1, key, "must be >= 1.")
        for key in ("gaussian_sigma", "poisson_zeta", "tau_min_factor", "tau_max"):
            harness.require(getattr(self, key) > 0, key, "must be > 0.")


def make_mixture(dim: int, seed: int = 0) -> GaussianMixture:
    """Four anisotropic components with means on a scale-2 sphere (a fixed NumPy seed)."""
    rng = np.random.default_rng(1000 + dim + seed)
    k = 4
    means = rng.normal(size=(k, dim))
    means *= 2.0 / np.linalg.norm(means, axis=1, keepdims=True)
    a = rng.normal(size=(k, dim, dim)) / np.sqrt(dim)
    covs = 0.25 * np.einsum("kij,klj->kil", a, a) + 0.05 * np.eye(dim)
    return GaussianMixture.create(rng.uniform(0.5, 1.0, size=k), means, covs=covs)


def posterior_mixture(gmm: GaussianMixture, alpha: float, sigma: float, x: np.ndarray):
    """The posterior of x₀ | x_t = x per row, in float64: weights (n, K), means (n, K, d) and
    covs (K, d, d); component k has precision Σ_k⁻¹ + α²/σ² I and mean C_k (Σ_k⁻¹ μ_k + α x/σ²)."""
    w = np.asarray(gmm.weights, np.float64)
    mu = np.asarray(gmm.means, np.float64)
    cov = np.asarray(gmm.covs, np.float64)
    x = np.asarray(x, np.float64)
    d = mu.shape[1]
    eye = np.eye(d)
    marg = alpha**2 * cov + sigma**2 * eye
    diff = x[:, None, :] - alpha * mu[None]  # (n, K, d)
    sol = np.linalg.solve(marg[None], diff[..., None])[..., 0]
    logr = np.log(w) - 0.5 * np.sum(diff * sol, -1) - 0.5 * np.linalg.slogdet(marg)[1]
    r = np.exp(logr - logr.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    prec = np.linalg.inv(cov)
    c = np.linalg.inv(prec + alpha**2 / sigma**2 * eye)  # (K, d, d)
    b = np.einsum("kij,kj->ki", prec, mu)[None] + alpha / sigma**2 * x[:, None, :]
    means = np.einsum("kij,nkj->nki", c, b)
    return r, means, c


def posterior_moments(r, means, covs):
    m = np.einsum("nk,nkd->nd", r, means)
    second = np.einsum("nk,kij->nij", r, covs) + np.einsum("nk,nki,nkj->nij", r, means, means)
    return m, second - np.einsum("ni,nj->nij", m, m)


def _gauss_logpdf(z, m, c):
    d = m.shape[-1]
    chol = np.linalg.cholesky(c)
    sol = np.linalg.solve(chol, (z - m).T).T
    return -0.5 * np.sum(sol**2, -1) - np.log(np.diag(chol)).sum() - 0.5 * d * np.log(2 * np.pi)


def kl_from_posterior(rng, r, means, covs, q_mean, q_cov, num_samples):
    """Monte Carlo KL(p ‖ q) for one point: p the posterior mixture, q a Gaussian; the same
    draws serve every q (common random numbers)."""
    comp = rng.choice(len(r), size=num_samples, p=r)
    chol = np.linalg.cholesky(covs)
    z = means[comp] + np.einsum(
        "nij,nj->ni", chol[comp], rng.normal(size=(num_samples, len(q_mean[0])))
    )
    logp = np.stack(
        [np.log(r[k] + 1e-300) + _gauss_logpdf(z, means[k], covs[k]) for k in range(len(r))]
    )
    logp = np.logaddexp.reduce(logp, axis=0)
    return [
        float(np.mean(logp - _gauss_logpdf(z, m, c))) for m, c in zip(q_mean, q_cov, strict=True)
    ]


def _gmm_part(ex: TweedieConfig, res: harness.Context, key) -> dict:
    schedule = LinearSchedule()
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    curves = {}
    kl_ratio_max = 0.0
    for dim in ex.dims:
        gmm = make_mixture(dim)
        for t in ex.times:
            alpha, sigma = float(schedule.alpha(t)), float(schedule.sigma(t))
            noised = gmm.noised(alpha, sigma)
            x = np.asarray(
                noised.sample(jax.random.fold_in(key, dim * 100 + int(t * 1000)), ex.num_points)
            )
            moments = jax.jit(lambda x, g=noised, a=alpha, s=sigma: (
                tweedie_mean(g.score, x, a, s), tweedie_covariance(g.score, x, a, s)
            ))  # fmt: skip
            mean, cov = (np.asarray(v, np.float64) for v in moments(jnp.asarray(x, jnp.float32)))
            m_ref, c_ref = posterior_moments(*posterior_mixture(gmm, alpha, sigma, x))
            prefix = f"{dim}d.t{t:g}"
            rel = lambda a, b: np.abs(a - b).max() / np.abs(b).max()
            e_m = res.metric(f"{prefix}.mean_rel_error", rel(mean, m_ref))
            e_c = res.metric(f"{prefix}.cov_rel_error", rel(cov, c_ref))
            res.metric(f"{prefix}.sigma2_over_alpha2", sigma**2 / alpha**2)
            res.claim(f"{prefix}: first-order Tweedie mean rel. error", e_m, ex.max_rel_error)
            res.claim(
                f"{prefix}: second-order Tweedie covariance rel. error", e_c, ex.max_rel_error
            )
            # Gaussian approximations of the posterior: second order vs isotropic σ²/α² I
            n_kl = min(ex.num_kl_points, ex.num_points)
            pw, pm, pc = posterior_mixture(gmm, alpha, sigma, x[:n_kl])
            iso = sigma**2 / alpha**2 * np.eye(dim)
            args = [(pw[i], pm[i], pc, [mean[i]] * 2, [cov[i], iso]) for i in range(n_kl)]
            kls = np.array([kl_from_posterior(rng, *a, ex.num_kl_samples) for a in args])
            kl2 = res.metric(f"{prefix}.kl_second_order", kls[:, 0].mean())
            kl1 = res.metric(f"{prefix}.kl_first_order_isotropic", kls[:, 1].mean())
            kl_ratio_max = max(kl_ratio_max, kl2 / kl1)
        # Hutchinson's diagonal vs probes, at one noise level: groups of m base estimates
        alpha, sigma = (float(f(ex.hutchinson_time)) for f in (schedule.alpha, schedule.sigma))
        noised = gmm.noised(alpha, sigma)
        x = jnp.asarray(noised.sample(jax.random.fold_in(key, 7 + dim), ex.num_points), jnp.float32)

        @jax.jit
        def hutch(x, g=noised, a=alpha, s=sigma):
            keys = jax.random.split(jax.random.fold_in(key, 11 + dim), ex.hutchinson_repeats)
            est = jax.vmap(
                lambda k: tweedie_covariance_diag_hutchinson(
                    k, g.score, x, a, s, ex.hutchinson_probes
                )
            )(keys)
            return est, jnp.diagonal(tweedie_covariance(g.score, x, a, s), axis1=1, axis2=2)

        est, diag = (np.asarray(v, np.float64) for v in hutch(x))
        ks, errs = [], []
        m = 1
        while m <= ex.hutchinson_repeats:
            grouped = est[: (len(est) // m) * m].reshape(-1, m, *est.shape[1:]).mean(1)
            ks.append(m * ex.hutchinson_probes)
            errs.append(np.sqrt(np.mean((grouped - diag[None]) ** 2)) / np.sqrt(np.mean(diag**2)))
            res.metric(f"{dim}d.hutchinson_rel_rms.K{ks[-1]}", errs[-1])
            m *= 4
        slope = res.metric(f"{dim}d.hutchinson_slope", np.polyfit(np.log(ks), np.log(errs), 1)[0])
        res.claim(f"{dim}d: Hutchinson error slope vs probes > -0.6", slope, -0.6, ">")
        res.claim(f"{dim}d: Hutchinson error slope vs probes < -0.4", slope, -0.4, "<")
        curves[dim] = (ks, errs)
    res.claim(
        "second-order KL / isotropic first-order KL (max over dims, times)", kl_ratio_max, 1.0
    )
    return curves


_SCORE_MODEL_KEYS = "tau_min_factor tau_max hidden num_layers steps batch_size learning_rate"


def _score_model(ex: TweedieConfig) -> ScoreMLP:
    return ScoreMLP(ex.hidden, ex.num_layers, None, 64)


def _train_noisy_score(ex, y_train, tau_min, key, checkpoint_dir):
    """Noise-conditional DSM on the noisy images: E‖τ s(y + τu, τ) + u‖², log τ ~ U."""
    model = _score_model(ex)
    params = model.init_params(jax.random.fold_in(key, 0), y_train.shape[1])
    lo, hi = np.log(tau_min), np.log(ex.tau_max)

    def loss_fn(params, y, k):
        k1, k2 = jax.random.split(k)
        tau = jnp.exp(jax.random.uniform(k1, (y.shape[0],), minval=lo, maxval=hi))
        u = jax.random.normal(k2, y.shape)
        s = model.forward(params, y + tau[:, None] * u, tau)
        return jnp.mean(jnp.sum((tau[:, None] * s + u) ** 2, -1))

    t0 = time.perf_counter()
    state, history = tr.train(
        loss_fn,
        optax.adam(ex.learning_rate),
        params,
        tr.array_batch_fn(ex.batch_size),
        jax.random.fold_in(key, 1),
        ex.steps,
        data=y_train,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=max(ex.steps, 1),
        log_every=min(100, ex.steps),
        steps_per_call=min(100, ex.steps),
        progress=False,
        desc="noisy_score",
    )
    return state.params, {"train_seconds": time.perf_counter() - t0, "history": history}


def _gaussian_fit_score(y_train: np.ndarray):
    """The score of N(mean, cov) fitted to the noisy data (a linear denoiser)."""
    mu = y_train.mean(0)
    c = np.cov(y_train, rowvar=False) + 1e-4 * np.eye(y_train.shape[1])
    prec = jnp.asarray(np.linalg.inv(c), jnp.float32)
    mu = jnp.asarray(mu, jnp.float32)
    return lambda y: -(y - mu[None]) @ prec


def _noise2score_part(ex: TweedieConfig, res: harness.Context, seed: int, key) -> dict:
    split = load_digits_split()
    x_train = split.x_train.reshape(len(split.x_train), -1).astype(np.float64)
    x_test = split.x_test.reshape(len(split.x_test), -1).astype(np.float64)
    rng = np.random.default_rng(seed + 17)
    setups = {
        "gaussian": dict(
            clean_train=x_train,
            clean_test=x_test,
            noise=lambda c: c + ex.gaussian_sigma * rng.normal(size=c.shape),
            tau_min=ex.tau_min_factor * ex.gaussian_sigma,
            denoise=lambda s, y: noise2score_gaussian(s, y, ex.gaussian_sigma),
            peak=2.0,
        ),
        "poisson": dict(
            clean_train=(x_train + 1) / 2,
            clean_test=(x_test + 1) / 2,
            noise=lambda c: ex.poisson_zeta * rng.poisson(c / ex.poisson_zeta),
            tau_min=0.5 * ex.poisson_zeta,
            denoise=lambda s, y: noise2score_poisson(s, y, ex.poisson_zeta),
            peak=1.0,
        ),
    }
    examples = {}
    for name, su in setups.items():
        y_train = su["noise"](su["clean_train"]).astype(np.float32)
        y_test = su["noise"](su["clean_test"]).astype(np.float32)
        defining = {
            "name": f"tweedie-noisy_score-{name}",
            "version": CACHE_VERSION,
            "seed": seed,
            "noise": ex.gaussian_sigma if name == "gaussian" else ex.poisson_zeta,
            **{k: getattr(ex, k) for k in _SCORE_MODEL_KEYS.split()},
        }
        cached = tr.cached_train(
            defining,
            functools.partial(
                _train_noisy_score,
                ex,
                jnp.asarray(y_train),
                su["tau_min"],
                jax.random.fold_in(key, len(name)),
            ),
            directory=ex.cache_dir,
        )
        res.metric(f"noise2score.{name}.cache_hit", float(cached.hit))
        model = _score_model(ex)
        mlp_score = jax.jit(
            lambda y, p=cached.params, tau=su["tau_min"]: model.forward(
                p, y, jnp.full(y.shape[:1], tau)
            )
        )
        lo, hi = (-1.0, 1.0) if name == "gaussian" else (0.0, 1.0)
        clean = su["clean_test"]
        mse = lambda est: float(
            np.mean((np.clip(np.asarray(est, np.float64), lo, hi) - clean) ** 2)
        )
        mse_noisy = res.metric(f"noise2score.{name}.mse_noisy", np.mean((y_test - clean) ** 2))
        yt = jnp.asarray(y_test)
        den_mlp = su["denoise"](mlp_score, yt)
        mse_mlp = res.metric(f"noise2score.{name}.mse_mlp_score", mse(den_mlp))
        mse_lin = res.metric(
            f"noise2score.{name}.mse_gaussian_fit_score",
            mse(su["denoise"](_gaussian_fit_score(y_train), yt)),
        )
        for label, m in (
            ("noisy", mse_noisy),
            ("mlp_score", mse_mlp),
            ("gaussian_fit_score", mse_lin),
        ):
            res.metric(f"noise2score.{name}.psnr_{label}", 10 * np.log10(su["peak"] ** 2 / m))
        res.claim(f"Noise2Score ({name}): MSE denoised < MSE noisy", mse_mlp, mse_noisy)
        examples[name] = (
            clean[:6],
            np.asarray(y_test[:6]),
            np.clip(np.asarray(den_mlp[:6]), lo, hi),
        )
    return examples


@harness.replication("tweedie", TweedieConfig)
def run(ex: TweedieConfig, ctx: harness.Context) -> None:
    tr.quiet_checkpoint_logging()
    key = ctx.key
    t0 = time.perf_counter()
    curves = _gmm_part(ex, ctx, jax.random.fold_in(key, 0))
    ctx.metric("gmm_seconds", time.perf_counter() - t0)
    examples = {}
    if ex.noise2score:
        t0 = time.perf_counter()
        examples = _noise2score_part(ex, ctx, ctx.seed, jax.random.fold_in(key, 1))
        ctx.metric("noise2score_seconds", time.perf_counter() - t0)
    rows = 1 + 3 * len(examples)
    with ctx.figure("tweedie.png", rows, 6, figsize=(9, 2.2 * rows)) as (fig, axes):
        _draw(curves, examples, fig, axes)


def _draw(curves, examples, fig, axes) -> None:
    for a in axes[0]:
        a.remove()
    ax = fig.add_subplot(axes[0, 0].get_gridspec()[0, :])
    for dim, (ks, errs) in curves.items():
        ax.loglog(ks, errs, "o-", label=f"{dim}-d")
    ks = np.array(next(iter(curves.values()))[0], float)
    ax.loglog(ks, errs[0] * np.sqrt(ks[0] / ks), "k--", label="K^-1/2")
    ax.set_xlabel("probes K")
    ax.set_ylabel("rel. RMS error of diag Cov")
    ax.legend(fontsize=8)
    for a in axes[1:].ravel():
        a.set_axis_off()
    for i, (name, imgs) in enumerate(examples.items()):
        for j, title in enumerate(("clean", "noisy", "Noise2Score")):
            for c in range(imgs[j].shape[0]):
                a = axes[1 + 3 * i + j, c]
                a.imshow(imgs[j][c].reshape(8, 8), cmap="gray")
                if c == 0:
                    a.set_title(f"{name}: {title}", fontsize=8, loc="left")
