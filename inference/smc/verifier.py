"""Resampling against an imperfect verifier: the accuracy curve and its ceiling.

A generator solves a problem with probability p per sample; a verifier accepts a correct sample
with probability tpr and an incorrect one with probability fpr (its false-positive rate).
Drawing samples until one is accepted, with a budget of k samples, returns

    an accepted sample with probability 1 − (1 − q)^k,   q = p·tpr + (1 − p)·fpr,

which is correct with probability p·tpr / q whatever k is. So as k → ∞ the accuracy climbs to the
ceiling p·tpr / q < 1 when fpr > 0 — no budget gets past it. With a fallback (return the last
sample when none passes) the accuracy at budget k is

    acc(k) = (1 − (1 − q)^k) · p·tpr/q + (1 − q)^k · p(1 − tpr)/(1 − q);

abstaining instead scores the second term as 0. With utility +1 for a correct answer, −cost for a
wrong one and 0 for abstaining, the expected utility (1 − (1 − q)^k)(p·tpr − cost·(1 − p)·fpr)/q
is monotone in k: if false positives cost more than p·tpr/((1 − p)·fpr), every extra sample hurts.

References:
  Stroebl, Kapoor & Narayanan (2024), "Inference Scaling fLaws: The Limits of LLM Resampling with
  Imperfect Verifiers".
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Bool

from feynkit.core.types import Array, ArrayLike, Float, Key

__all__ = ["resample_until_accepted", "verifier_accuracy", "verifier_ceiling"]


def _check_rates(p, tpr, fpr):
    for name, v in (("p", p), ("tpr", tpr), ("fpr", fpr)):
        v = jnp.asarray(v)
        if not jnp.issubdtype(v.dtype, jnp.floating):
            raise ValueError(f"{name} must be a probability (float), got dtype {v.dtype}.")


def verifier_ceiling(p: ArrayLike, tpr: ArrayLike, fpr: ArrayLike) -> Array:
    """P(correct | accepted) = p·tpr / (p·tpr + (1 − p)·fpr): the accuracy limit of unbounded
    resampling (1 for a perfect verifier, fpr = 0, whenever p·tpr > 0)."""
    p, tpr, fpr = (jnp.asarray(v, jnp.result_type(float)) for v in (p, tpr, fpr))
    _check_rates(p, tpr, fpr)
    return p * tpr / (p * tpr + (1.0 - p) * fpr)


def verifier_accuracy(
    p: ArrayLike, tpr: ArrayLike, fpr: ArrayLike, budget: ArrayLike, abstain: bool = False
) -> Array:
    """Expected accuracy of resample-until-accepted with `budget` samples (closed form above).

    Args:
      p, tpr, fpr: per-problem rates (broadcast together with `budget`).
      budget: k ≥ 1 samples allowed.
      abstain: score "none accepted" as wrong (abstention) instead of returning the last sample.
    """
    p, tpr, fpr = (jnp.asarray(v, jnp.result_type(float)) for v in (p, tpr, fpr))
    _check_rates(p, tpr, fpr)
    k = jnp.asarray(budget, p.dtype)
    q = p * tpr + (1.0 - p) * fpr
    none = (1.0 - q) ** k
    accepted = (1.0 - none) * jnp.where(q > 0, p * tpr / jnp.where(q > 0, q, 1.0), 0.0)
    if abstain:
        return accepted
    fallback = jnp.where(q < 1, p * (1.0 - tpr) / jnp.where(q < 1, 1.0 - q, 1.0), 0.0)
    return accepted + none * fallback


def resample_until_accepted(
    key: Key,
    correct: Bool[ArrayLike, "problems pool"],
    accepted: Bool[ArrayLike, "problems pool"],
    budgets: Sequence[int],
    num_trials: int = 256,
    abstain: bool = False,
) -> Float[Array, " budgets"]:
    """Monte Carlo accuracy of resample-until-accepted from pools of scored candidates.

    For each problem and trial, candidates are drawn from the problem's pool (with
    replacement); the answer at budget k is the first accepted one among the first k draws, or
    the k-th draw when none is accepted (nothing, when `abstain`).

    Args:
      key: PRNG key.
      correct, accepted: per problem, whether each pooled candidate is correct and whether the
        verifier accepts it, shape (problems, pool).
      budgets: sample budgets k ≥ 1 to report (Python ints).
      num_trials: random orderings per problem.

    Returns:
      Accuracy per budget, averaged over problems and trials.
    """
    correct, accepted = jnp.asarray(correct, bool), jnp.asarray(accepted, bool)
    if correct.shape != accepted.shape or correct.ndim != 2:
        raise ValueError(
            "correct and accepted must both have shape (problems, pool); got "
            f"{correct.shape} and {accepted.shape}."
        )
    budgets = [int(k) for k in budgets]
    if not budgets or min(budgets) < 1:
        raise ValueError(f"budgets must be ≥ 1, got {budgets}.")
    k_max = max(budgets)
    n_problems, pool = correct.shape
    idx = jax.random.randint(key, (n_problems, num_trials, k_max), 0, pool)
    c = jnp.take_along_axis(correct[:, None, :], idx, axis=2)
    a = jnp.take_along_axis(accepted[:, None, :], idx, axis=2)
    draw = jnp.arange(k_max)
    # first accepted draw (k_max when none)
    first = jnp.min(jnp.where(a, draw, k_max), axis=2)

    def at_budget(k):
        hit = first < k
        c_first = jnp.take_along_axis(c, jnp.minimum(first, k_max - 1)[..., None], axis=2)[..., 0]
        fallback = jnp.zeros_like(hit) if abstain else c[..., k - 1]
        return jnp.mean(jnp.where(hit, c_first, fallback))

    return jnp.stack([at_budget(k) for k in budgets])
