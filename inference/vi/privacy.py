"""Bayesian estimation of the differential-privacy budget ε from membership-inference attacks.

Hypothesis-testing view of DP (Kairouz, Oh & Viswanath 2015): a mechanism is (ε, δ)-DP iff every
test distinguishing neighbouring datasets has false positive and false negative rates with
FPR + e^ε FNR ≥ 1 − δ and FNR + e^ε FPR ≥ 1 − δ. An attack with rates (FPR, FNR) therefore
certifies

    ε ≥ ε(FPR, FNR) = max( log((1 − δ − FPR)/FNR), log((1 − δ − FNR)/FPR), 0 ),

a function decreasing in both rates. From an attack's counts (FP false positives among n₋
non-members, FN false negatives among n₊ members):

* Bayesian (Zanella-Béguelin et al. 2023): independent Beta posteriors FPR ~ Beta(a + FP,
  b + n₋ − FP), FNR ~ Beta(a + FN, b + n₊ − FN); the posterior of ε is the push-forward of their
  joint posterior through ε(·,·), here by Monte Carlo; a credible interval is read off its
  quantiles (`epsilon_posterior`, `credible_interval`).
* Clopper–Pearson (Jagielski et al. 2020; Nasr et al. 2021): exact binomial intervals for FPR and
  FNR at level 1 − α/2 each (a union bound), mapped through the monotone ε(·,·) at their corners
  (`clopper_pearson_interval`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from feynkit.core.types import Array, ArrayLike, Key

__all__ = [
    "clopper_pearson_interval",
    "credible_interval",
    "epsilon_from_rates",
    "epsilon_posterior",
    "rates_for_epsilon",
]


def _check_delta(delta: float) -> None:
    if not (0.0 <= float(delta) < 1.0):
        raise ValueError(f"delta must lie in [0, 1), got {delta!r}.")


def _check_counts(errors: ArrayLike, trials: int, name: str) -> np.ndarray:
    e = np.asarray(errors)
    if not isinstance(trials, int | np.integer) or trials < 1:
        raise ValueError(f"the number of trials for {name} must be an int >= 1, got {trials!r}.")
    if e.size and (np.any(e < 0) or np.any(e > trials) or np.any(e != np.round(e))):
        raise ValueError(f"{name} must be integer counts in [0, {trials}], got {errors!r}.")
    return e


def _check_level(level: float) -> None:
    if not (0.0 < float(level) < 1.0):
        raise ValueError(f"level must lie in (0, 1) (e.g. 0.95), got {level!r}.")


def epsilon_from_rates(fpr: ArrayLike, fnr: ArrayLike, delta: float = 0.0) -> Array:
    """ε(FPR, FNR) = max(log((1−δ−FPR)/FNR), log((1−δ−FNR)/FPR), 0) (elementwise)."""
    _check_delta(delta)
    fpr, fnr = jnp.asarray(fpr), jnp.asarray(fnr)
    tiny = jnp.finfo(jnp.result_type(fpr, fnr, jnp.float32)).tiny
    a = jnp.log(jnp.maximum(1.0 - delta - fpr, tiny)) - jnp.log(jnp.maximum(fnr, tiny))
    b = jnp.log(jnp.maximum(1.0 - delta - fnr, tiny)) - jnp.log(jnp.maximum(fpr, tiny))
    return jnp.maximum(jnp.maximum(a, b), 0.0)


def rates_for_epsilon(epsilon: float, fpr: float, delta: float = 0.0) -> tuple[float, float]:
    """(FPR, FNR) of the optimal attack on the (ε, δ) trade-off curve at false positive rate
    `fpr`: FNR = max(1 − δ − e^ε FPR, e^{−ε}(1 − δ − FPR)), so that ε(FPR, FNR) = ε."""
    _check_delta(delta)
    fnr = max(1.0 - delta - np.exp(epsilon) * fpr, np.exp(-epsilon) * (1.0 - delta - fpr))
    return float(fpr), float(fnr)


def epsilon_posterior(
    key: Key,
    fp: ArrayLike,
    n_negative: int,
    fn: ArrayLike,
    n_positive: int,
    delta: float = 0.0,
    num_samples: int = 10_000,
    prior: tuple[float, float] = (1.0, 1.0),
) -> Array:
    """Samples of the posterior of ε given FP of `n_negative` and FN of `n_positive` errors.

    `fp` and `fn` may be arrays of the same shape (one attack each); the samples have shape
    (num_samples, *fp.shape). `prior` = (a, b) is the Beta prior of both rates.

    References:
      Zanella-Béguelin, Wutschitz, Tople, Salem, Rühle, Paverd, Naseri, Köpf & Jones (2023),
      "Bayesian Estimation of Differential Privacy".
    """
    fp = _check_counts(fp, n_negative, "fp")
    fn = _check_counts(fn, n_positive, "fn")
    if fp.shape != fn.shape:
        raise ValueError(f"fp and fn must have one shape, got {fp.shape} and {fn.shape}.")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}.")
    a, b = map(float, prior)
    if not (a > 0 and b > 0):
        raise ValueError(f"prior must be two positive Beta parameters, got {prior!r}.")
    k1, k2 = jax.random.split(key)
    shape = (num_samples, *fp.shape)
    fp, fn = jnp.asarray(fp, jnp.float32), jnp.asarray(fn, jnp.float32)
    fpr = jax.random.beta(k1, a + fp, b + n_negative - fp, shape)
    fnr = jax.random.beta(k2, a + fn, b + n_positive - fn, shape)
    return epsilon_from_rates(fpr, fnr, delta)


def credible_interval(samples: ArrayLike, level: float = 0.95) -> tuple[Array, Array]:
    """The equal-tailed `level` credible interval of posterior samples (axis 0)."""
    _check_level(level)
    lo, hi = jnp.quantile(jnp.asarray(samples), jnp.array([(1 - level) / 2, (1 + level) / 2]), 0)
    return lo, hi


def clopper_pearson_interval(
    fp: ArrayLike,
    n_negative: int,
    fn: ArrayLike,
    n_positive: int,
    delta: float = 0.0,
    level: float = 0.95,
) -> tuple[np.ndarray, np.ndarray]:
    """The ε interval from Clopper–Pearson intervals of FPR and FNR, each at level 1 − α/2
    (α = 1 − level), mapped through the decreasing ε(·,·): [ε(hi, hi), ε(lo, lo)]."""
    _check_level(level)
    fp = _check_counts(fp, n_negative, "fp").astype(float)
    fn = _check_counts(fn, n_positive, "fn").astype(float)
    a = (1 - level) / 2  # per rate: two-sided 1 − a

    def cp(k, n):
        lo = np.where(k > 0, stats.beta.ppf(a / 2, np.maximum(k, 1e-12), n - k + 1), 0.0)
        hi = np.where(k < n, stats.beta.ppf(1 - a / 2, k + 1, np.maximum(n - k, 1e-12)), 1.0)
        return lo, hi

    fpr_lo, fpr_hi = cp(fp, n_negative)
    fnr_lo, fnr_hi = cp(fn, n_positive)
    lo = np.asarray(epsilon_from_rates(fpr_hi, fnr_hi, delta))
    hi = np.asarray(epsilon_from_rates(fpr_lo, fnr_lo, delta))
    return lo, hi
