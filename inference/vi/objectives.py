"""Variational objectives, chosen apart from their gradient estimators.

Every objective is a pure function

    objective(key, log_joint, family, params, data, *, num_samples, estimator, ...) -> scalar

whose *value* is the Monte Carlo estimate of the bound and whose *gradient* (``jax.grad`` with
respect to `params`, or to model parameters closed over by `log_joint`) is the chosen
estimator. Both come from one scalar, ``value + S − stop_gradient(S)``, with S the estimator's
surrogate, so the objectives compose with `jit`, `vmap`, `grad` and Optax like any loss.

With z_k ~ q_φ (k = 1..K) and log-weights ℓ_k = log p(x, z_k) − log q_φ(z_k):

    ELBO      mean_k ℓ_k
    IWAE(K)   log (1/K) Σ_k exp ℓ_k                                   (Burda et al. 2016)
    Rényi-α   1/(1−α) · log (1/K) Σ_k exp((1−α) ℓ_k),  α ≥ 0          (Li & Turner 2016)
              (α = 0 is IWAE, α → 1 the ELBO)
    VIMCO     the IWAE bound with the leave-one-out score estimator    (Mnih & Rezende 2016)
    RWS       the IWAE bound as value; wake-θ ascends Σ w̃_k log p(x, z_k), wake-φ ascends
              Σ w̃_k log q_φ(z_k), with z_k and w̃ = softmax(ℓ) held fixed   (Bornschein &
              Bengio 2015)

Estimators (`estimator=`):

    "reparam"  pathwise: z = loc + L ε, differentiate everything.
    "score"    REINFORCE: ∇ = E[(f(ℓ) − b) Σ_k ∇ log q(z_k)] + E[∇f(ℓ) with z fixed], with a
               scalar baseline b (`baseline=`, e.g. a running average).
    "vimco"    score function with one leave-one-out baseline per sample: sample k's learning
               signal is f(ℓ) − f(ℓ with ℓ_k replaced by the mean of the others) (needs K ≥ 2;
               for the ELBO this is the leave-one-out mean baseline).
    "stl"      sticking the landing (Roeder et al. 2017): reparameterised, with log q evaluated at
               stop_gradient(φ), so the zero-mean score term is dropped. ELBO only (for the
               multi-sample bounds STL is biased; use "dreg").
    "dreg"     doubly reparameterised (Tucker et al. 2019): the φ-gradient
               Σ_k [α w̃_k + (1 − α) w̃_k²] ∂ℓ_k/∂z_k ∂z_k/∂φ with w̃ = softmax((1 − α) ℓ) and
               log q at stop_gradient(φ) — w̃² for IWAE (α = 0), STL for the ELBO (α = 1). The
               gradient of model parameters in `log_joint` stays the ordinary Σ w̃_k ∇θ log p.

The Rényi DReG weights follow from the score identity E[g(z) ∂_φ log q(z)] = E[∂_z g ∂_φ z]
applied to g = w̃_k, as for IWAE.

Local latent variables (``local=True``): `params` carries one variational factor per data point
(a leading axis of size N, as does every leaf of `data`) and ``log_joint(z_i, x_i)`` is the
log-joint of one point. The bound is then Σ_i bound_i, the per-point bound computed from that
point's K samples (a `vmap` over data) — the sum over points sits *outside* each log-mean-exp.
Summing the log-weights over points first and taking one log-mean-exp of the sum (what Pyro's
Rényi ELBO does under plates, pyro issue #3104) is a different, looser bound for K > 1.

Bad input raises ValueError naming the argument: num_samples < 1, α < 0 or not finite,
an unknown estimator, parameters whose tree does not match the family, non-finite log-joint
values (also under `jit`, through `core.validation.fail_if`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from feynkit.core.types import Array, Key, PyTree
from feynkit.core.validation import fail_if

__all__ = [
    "ESTIMATORS",
    "LogJoint",
    "bound_value",
    "elbo",
    "iwae",
    "local_joint_order_bound",
    "make_objective",
    "renyi",
    "rws",
    "vimco",
]

LogJoint = Callable[[Array, Any], Array]
ESTIMATORS = ("reparam", "score", "vimco", "stl", "dreg")

sg = jax.lax.stop_gradient


def _log_mean_exp(x: Array) -> Array:
    return jax.nn.logsumexp(x, axis=-1) - math.log(x.shape[-1])


def bound_value(log_weights: Array, alpha: float) -> Array:
    """The Rényi-α bound 1/(1−α) log mean_k exp((1−α) ℓ_k) over the last axis (α = 1: the
    mean, the ELBO; α = 0: IWAE)."""
    if alpha == 1.0:
        return jnp.mean(log_weights, axis=-1)
    return _log_mean_exp((1.0 - alpha) * log_weights) / (1.0 - alpha)


def _leave_one_out(log_weights: Array, alpha: float) -> Array:
    """f(ℓ with ℓ_k replaced by the mean of the others), for every k (shape (K,))."""
    k = log_weights.shape[-1]
    others = (jnp.sum(log_weights) - log_weights) / (k - 1)
    eye = jnp.eye(k, dtype=bool)
    replaced = jnp.where(eye, others[:, None], jnp.broadcast_to(log_weights, (k, k)))
    return jax.vmap(lambda row: bound_value(row, alpha))(replaced)


def _check_static(num_samples: Any, alpha: Any, estimator: str, name: str) -> None:
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(
            f"num_samples must be an int >= 1 (K samples from q), got {num_samples!r}."
        )
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(
            f"alpha must be a finite number >= 0 (0: IWAE, 1: ELBO), got {alpha!r}; negative α "
            "gives an upper bound these estimators do not target."
        )
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}.")
    if estimator == "stl" and alpha != 1.0:
        raise ValueError(
            f"estimator='stl' is unbiased only for the ELBO; for {name} use estimator='dreg' "
            "(its doubly-reparameterised form)."
        )
    if estimator == "vimco" and num_samples < 2:
        raise ValueError("estimator='vimco' needs num_samples >= 2 (a leave-one-out baseline).")


def _check_tree(family: Any, params: PyTree, data: Any, local: bool) -> None:
    batch = family.check(params, "params")
    if not local:
        if batch != ():
            raise ValueError(
                f"params have batch shape {batch} but local=False: pass local=True for one "
                "variational factor per data point, or parameters of shape (dim,)."
            )
        return
    if len(batch) != 1:
        raise ValueError(
            f"local=True needs params with one leading data axis (N, dim), got batch {batch}."
        )
    for leaf in jax.tree.leaves(data):
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != batch[0]:
            raise ValueError(
                f"local=True: every data leaf needs leading axis N={batch[0]} (one per "
                f"variational factor in params), got shape {jnp.shape(leaf)}."
            )


def _one_group(key, log_joint, family, params, data, num_samples, alpha, estimator, baseline):
    """(value, surrogate) of the bound for one set of latents (K samples)."""
    z = family.sample(key, params, num_samples)  # (K, dim), reparameterised
    z_fixed = sg(z)
    lj = jax.vmap(log_joint, in_axes=(0, None))
    lp = lj(z, data)
    if lp.shape != (num_samples,):
        raise ValueError(f"log_joint must return a scalar per sample, got shape {lp.shape[1:]}.")
    lq = family.log_prob(params, z)
    value = bound_value(sg(lp - lq), alpha)
    bad = ~jnp.all(jnp.isfinite(sg(lp)))

    if estimator == "reparam":
        return value, bound_value(lp - lq, alpha), bad

    if estimator in ("score", "vimco"):
        lp_fixed = lj(z_fixed, data)
        lq_fixed = family.log_prob(params, z_fixed)
        lw = lp_fixed - lq_fixed
        f = bound_value(sg(lw), alpha)
        if estimator == "score":
            signal = jnp.full((num_samples,), f - baseline)
        else:
            signal = f - _leave_one_out(sg(lw), alpha)
        return value, bound_value(lw, alpha) + jnp.sum(sg(signal) * lq_fixed), bad

    lw_stl = lp - family.log_prob(sg(params), z)
    if estimator == "stl":
        return value, jnp.mean(lw_stl), bad
    # dreg
    w = jax.nn.softmax((1.0 - alpha) * sg(lw_stl))
    c = alpha * w + (1.0 - alpha) * w**2
    lp_fixed = lj(z_fixed, data)  # carries the ordinary Σ w̃ ∇θ log p for model parameters
    return value, jnp.sum(sg(c) * lw_stl) + jnp.sum(sg(w - c) * lp_fixed), bad


def _rws_group(key, log_joint, family, params, data, num_samples, wake):
    z = sg(family.sample(key, params, num_samples))
    lp = jax.vmap(log_joint, in_axes=(0, None))(z, data)
    if lp.shape != (num_samples,):
        raise ValueError(f"log_joint must return a scalar per sample, got shape {lp.shape[1:]}.")
    lq = family.log_prob(params, z)
    lw = sg(lp - lq)
    w = jax.nn.softmax(lw)
    surrogate = 0.0
    if wake in ("theta", "both"):
        surrogate = surrogate + jnp.sum(w * lp)
    if wake in ("phi", "both"):
        surrogate = surrogate + jnp.sum(w * lq)
    return _log_mean_exp(lw), surrogate, ~jnp.all(jnp.isfinite(lp))


_NONFINITE = (
    "log_joint(z, data) returned NaN or Inf for a sample of q; return finite log-densities on "
    "q's support (or pass validate=False to skip this check)"
)


def _combine(group_fn, key, params, data, local, validate):
    if local:
        n = jax.tree.leaves(params)[0].shape[0]
        keys = jax.random.split(key, n)
        values, surrogates, bad = jax.vmap(group_fn)(keys, params, data)
        value, surrogate, bad = jnp.sum(values), jnp.sum(surrogates), jnp.any(bad)
    else:
        value, surrogate, bad = group_fn(key, params, data)
    if validate:  # one host check per call (also under jit; see `core.validation.fail_if`)
        fail_if(bad, _NONFINITE)
    return value + surrogate - sg(surrogate)


def renyi(
    key: Key,
    log_joint: LogJoint,
    family: Any,
    params: PyTree,
    data: Any = None,
    *,
    alpha: float,
    num_samples: int = 1,
    estimator: str = "reparam",
    baseline: float | Array = 0.0,
    local: bool = False,
    validate: bool = True,
) -> Array:
    """The Rényi-α bound 1/(1−α) log (1/K) Σ_k (p(x, z_k)/q(z_k))^{1−α} (α ≥ 0; α = 1 is the
    ELBO, α = 0 IWAE) with the gradient of `estimator` (see the module docstring).

    Args:
      key: PRNG key for the K samples (split per data point when `local`).
      log_joint: ``log_joint(z, data) -> scalar`` (z of shape (dim,)); model parameters may be
        closed over and are differentiated like `params`.
      family: a variational family (`MeanFieldGaussian`, `FullRankGaussian`).
      params: its parameters, shape (dim,) per leaf, or (N, dim) with ``local=True``.
      data: passed to `log_joint` (with ``local=True``: a pytree with leading axis N).
      alpha, num_samples, estimator, baseline: the bound, K, the estimator, the score baseline.
      local: one latent per data point; the bound is the sum of per-point bounds.
      validate: check the log-joint values are finite (a ValueError, also under `jit`). The
        check is one host callback per call, which `vmap` unrolls per batch element: pass
        False inside large vmaps (e.g. thousands of gradient draws).

    Returns:
      A scalar: the bound estimate, whose gradient is the estimator's.

    References:
      Li & Turner (2016), "Rényi Divergence Variational Inference"; Tucker, Lawson, Gu &
      Maddison (2019), "Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives".
    """
    alpha = (
        float(alpha) if isinstance(alpha, int | float) and not isinstance(alpha, bool) else alpha
    )
    name = "the ELBO" if alpha == 1.0 else ("IWAE" if alpha == 0.0 else f"Rényi-α (α={alpha})")
    _check_static(num_samples, alpha, estimator, name)
    _check_tree(family, params, data, local)

    def group(k, p, x):
        return _one_group(k, log_joint, family, p, x, num_samples, alpha, estimator, baseline)

    return _combine(group, key, params, data, local, validate)


def elbo(
    key,
    log_joint,
    family,
    params,
    data=None,
    *,
    num_samples=1,
    estimator="reparam",
    baseline=0.0,
    local=False,
    validate=True,
) -> Array:
    """The ELBO mean_k [log p(x, z_k) − log q(z_k)] averaged over K samples (see `renyi`).

    References: Kingma & Welling (2014); Ranganath, Gerrish & Blei (2014), "Black Box
    Variational Inference"; Roeder, Wu & Duvenaud (2017), "Sticking the Landing".
    """
    return renyi(
        key,
        log_joint,
        family,
        params,
        data,
        alpha=1.0,
        num_samples=num_samples,
        estimator=estimator,
        baseline=baseline,
        local=local,
        validate=validate,
    )


def iwae(
    key,
    log_joint,
    family,
    params,
    data=None,
    *,
    num_samples,
    estimator="reparam",
    baseline=0.0,
    local=False,
    validate=True,
) -> Array:
    """The importance-weighted bound log (1/K) Σ_k p(x, z_k)/q(z_k) (see `renyi`).

    References: Burda, Grosse & Salakhutdinov (2016), "Importance Weighted Autoencoders".
    """
    return renyi(
        key,
        log_joint,
        family,
        params,
        data,
        alpha=0.0,
        num_samples=num_samples,
        estimator=estimator,
        baseline=baseline,
        local=local,
        validate=validate,
    )


def vimco(
    key, log_joint, family, params, data=None, *, num_samples, local=False, validate=True
) -> Array:
    """VIMCO: the IWAE bound with per-sample leave-one-out baselines (K ≥ 2).

    References: Mnih & Rezende (2016), "Variational Inference for Monte Carlo Objectives".
    """
    return renyi(
        key,
        log_joint,
        family,
        params,
        data,
        alpha=0.0,
        num_samples=num_samples,
        estimator="vimco",
        local=local,
        validate=validate,
    )


def rws(
    key,
    log_joint,
    family,
    params,
    data=None,
    *,
    num_samples,
    wake="both",
    local=False,
    validate=True,
) -> Array:
    """Reweighted wake-sleep: value the IWAE bound; gradient Σ_k w̃_k ∇ log p(x, z_k) for model
    parameters in `log_joint` (wake-θ) and Σ_k w̃_k ∇φ log q_φ(z_k) for `params` (wake-φ), with
    z_k ~ q and the self-normalised weights w̃ held fixed. ``wake`` selects "theta", "phi" or
    "both".

    References: Bornschein & Bengio (2015), "Reweighted Wake-Sleep"; Le et al. (2019),
    "Revisiting Reweighted Wake-Sleep for Models with Stochastic Control Flow".
    """
    _check_static(num_samples, 0.0, "reparam", "RWS")
    if wake not in ("theta", "phi", "both"):
        raise ValueError(f"wake must be 'theta', 'phi' or 'both', got {wake!r}.")
    _check_tree(family, params, data, local)

    def group(k, p, x):
        return _rws_group(k, log_joint, family, p, x, num_samples, wake)

    return _combine(group, key, params, data, local, validate)


def local_joint_order_bound(
    key, log_joint, family, params, data, *, num_samples, alpha=0.0
) -> Array:
    """The bound in the *wrong* order for local latents, for comparison only: one Rényi
    log-mean-exp over K samples of the whole joint, (1/(1−α)) log mean_k exp((1−α) Σ_i ℓ_ik),
    instead of Σ_i of per-point bounds (pyro issue #3104). Same samples as ``renyi(...,
    local=True)`` for the same key."""
    _check_static(num_samples, float(alpha), "reparam", "Rényi")
    _check_tree(family, params, data, True)
    n = jax.tree.leaves(params)[0].shape[0]

    def point(k, p, x):
        z = family.sample(k, p, num_samples)
        return jax.vmap(log_joint, in_axes=(0, None))(z, x) - family.log_prob(p, z)

    lw = jax.vmap(point)(jax.random.split(key, n), params, data)  # (N, K)
    return bound_value(jnp.sum(lw, axis=0), float(alpha))


_OBJECTIVES = {"elbo": elbo, "iwae": iwae, "renyi": renyi, "vimco": vimco, "rws": rws}


def make_objective(name: str, **options: Any) -> Callable[..., Array]:
    """``objective(key, log_joint, family, params, data)`` for `name` in elbo, iwae, renyi,
    vimco, rws with its options (num_samples, estimator, alpha, local, ...) bound, e.g.
    ``make_objective("iwae", num_samples=64, estimator="dreg")``."""
    if name not in _OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(_OBJECTIVES)}, got {name!r}.")
    fn = _OBJECTIVES[name]

    def objective(key, log_joint, family, params, data=None):
        return fn(key, log_joint, family, params, data, **options)

    objective.__name__ = f"{name}_objective"
    return objective
