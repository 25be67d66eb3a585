"""Exact samplers for targets derived from Gaussian mixtures (ground truth for FKC tests).

* tempered p^β, β ≥ 1: propose from p, accept with (p(x)/M)^(β−1), M ≥ sup p;
* guided p_c^w p^(1−w), w ≥ 1, where p = m p_c + (1 − m) p_rest: propose from p_c, accept
  with (m p_c(x) / p(x))^(w−1) ≤ 1;
* products of mixtures are mixtures (`GaussianMixture.product`): sample them directly.

Rejection sampling is exact, and it runs eagerly (a host loop over proposal batches): these are
evaluation tools, not `jit` targets.
"""

import jax
import jax.numpy as jnp
import numpy as np

from feynkit.core.types import Array, Key
from feynkit.models.targets import GaussianMixture

__all__ = ["rejection_sample", "sample_guided", "sample_tempered"]


def rejection_sample(
    key: Key,
    propose,
    log_accept,
    n: int,
    batch: int = 65536,
    max_batches: int = 1000,
) -> Array:
    """Draw n samples: x ~ propose(key, batch), kept with probability exp(log_accept(x)) ≤ 1."""
    propose = jax.jit(propose, static_argnums=1)
    log_accept = jax.jit(log_accept)
    out, total = [], 0
    for i in range(max_batches):
        k_prop, k_acc = jax.random.split(jax.random.fold_in(key, i))
        x = propose(k_prop, batch)
        la = np.asarray(log_accept(x))
        if (la > 1e-4).any():  # beyond float32 round-off
            raise ValueError(
                f"acceptance log-probability {la.max():.3g} > 0: the envelope bound is too small."
            )
        u = np.asarray(jax.random.uniform(k_acc, (batch,)))
        keep = u < np.exp(np.minimum(la, 0.0))  # u = 0 is kept, with no log(0) warning
        out.append(np.asarray(x)[keep])
        total += int(keep.sum())
        if total >= n:
            return jnp.asarray(np.concatenate(out)[:n])
    raise RuntimeError(
        f"rejection sampler accepted {total} of {batch * max_batches} proposals; wanted {n}."
    )


def sample_tempered(key: Key, p: GaussianMixture, beta: float, n: int) -> Array:
    """n exact draws from p^β / ∫ p^β for β ≥ 1."""
    if beta < 1:
        raise ValueError(f"sample_tempered needs beta >= 1 (got {beta}); p^beta/p is unbounded.")
    # sup p is attained at a mode; mean-shift from every component mean finds them all for
    # mixtures whose modes sit near component means (the envelope check guards the rest).
    log_m = float(jnp.max(p.log_prob(p.modes()))) + 1e-4
    return rejection_sample(key, p.sample, lambda x: (beta - 1.0) * (p.log_prob(x) - log_m), n)


def sample_guided(
    key: Key, cond: GaussianMixture, uncond: GaussianMixture, w: float, cond_mass: float, n: int
) -> Array:
    """n exact draws from cond^w uncond^(1−w) (normalised), w ≥ 1.

    Requires uncond = cond_mass · cond + (1 − cond_mass) · other, so that
    cond_mass · cond / uncond = p(c | x) ≤ 1.
    """
    if w < 1:
        raise ValueError(f"sample_guided needs w >= 1, got {w}.")
    if not 0 < cond_mass <= 1:
        raise ValueError(f"cond_mass must be in (0, 1], got {cond_mass}.")
    log_m = np.log(cond_mass)
    return rejection_sample(
        key,
        cond.sample,
        lambda x: (w - 1.0) * (log_m + cond.log_prob(x) - uncond.log_prob(x)),
        n,
    )
