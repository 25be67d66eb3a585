"""Resampling schemes for particle methods: exact in float32 at any n, O(n) for the combs.

Every scheme has the signature `resample_fn(key, log_weights, num_samples) -> ancestors`, where
`log_weights` has shape (n,) (unnormalised; −inf allowed) and `ancestors` is an int32 vector
of shape (num_samples,) with entries in [0, n) (sorted for systematic and stratified). The
per-scheme functions take **log**-weights (the parameter's name says so);
`resample(key, m, weights=...)` or `resample(key, m, log_weights=...)` is the entry point that
makes the caller say which. All four
are unbiased: E[#offspring of i] = m W_i. Multinomial ≥ stratified ≥ systematic in variance (in
practice); residual ≤ multinomial.

**Exactness in float32.** The textbook comb (k + u)/m loses u for k ≥ 2²⁴ and a float32
cumulative sum misplaces a few percent of the ancestors at n = 10⁶. Here nothing is ever formed
at the scale of m in floating point:

- scaled weights s_i = m w_i / Σ w are split into an integer part and a remainder in [0, 1);
- their prefix sums S_i = Σ_{j≤i} s_j are kept as (I_i int32, F_i ∈ [0, 1)): the integer parts
  are summed exactly in integers, and so are the remainders, in fixed point (units of 2⁻²⁵,
  blocks of 64 so no partial sum overflows 32 bits, block totals carried recursively). The only
  error left is rounding each remainder to 2⁻²⁵ (none for float32 s ≥ 1/2), a random walk of
  ≈ 3e-5 at n = 10⁷, against the ≈ 1e-3 that float32 weights themselves carry there (each is
  rounded to 2⁻²⁴ relative); a float cumulative sum instead errs at the scale of its partial
  sums at every step;
- the number of comb points below S_i is then an integer formula — systematic:
  #{k: k + u < S_i} = I_i + ⌈F_i − u⌉; stratified: I_i + [u_{I_i} < F_i] — with no comb formed.

**O(n), no binary search (systematic, stratified).** Offspring counts are differences of those
"points below" counts (made monotone and flat across zero weights with a `cummax`), and the
ancestors follow from the counts by one scatter-add and one int32 cumulative sum. Multinomial
and the random part of residual resampling search the same exact (I, F) CDF with a fixed-length
vectorised bisection (O(m log n)); no scheme contains a `lax.cond` (a conditional nested inside
the SMC loop's adaptive-resampling `lax.cond` was seen to hang XLA:CPU; issue 16).

**Degenerate weights.**

- +inf log-weights: the particles with +inf share all the mass (uniform among them).
- any NaN, or all −inf (no particle with positive weight): eagerly a `ValueError`. Under `jit`
  (where values are unknown) every returned ancestor equals n — out of range, so
  `resample_particles` (`jnp.take`, mode "fill") fills float leaves with NaN instead of
  silently copying particle 0 — and `log_weights_ok(log_weights)` is the flag a loop acts on
  (`adaptive_resample` then keeps the particles; `smc.base` reports it in `SMCInfo.weights_ok`).
- `num_samples` must be a positive Python int and the weights a vector: `ValueError` otherwise
  (static, so also under `jit`).
- The log-weights entry points warn (`ProbabilityVectorWarning`, silence it with
  `warnings.filterwarnings("ignore", category=ProbabilityVectorWarning)`) when handed a concrete
  vector that looks like probabilities (n ≥ 2, all in [0, 1], sum 1); the weights entry point
  rejects negative and non-finite values (eagerly; under `jit` they count as invalid weights).

Which checks run under `jit`: shapes, `num_samples`; the value checks (NaN, all −inf, negative
weights, the probability-vector warning) run eagerly only, and under `jit` give the sentinel
ancestors and `log_weights_ok` described above.

One module serves every particle method in feynkit (SMC, FK correctors, steering, particle Gibbs).

References:
  Douc, Cappé & Moulines (2005), "Comparison of resampling schemes for particle filtering";
  Chopin & Papaspiliopoulos (2020), "An Introduction to Sequential Monte Carlo", §9.6 (O(n)
  resampling from sorted uniforms).
"""

import math
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from feynkit.core.types import Array, ArrayLike, Float, Int, Key, PyTree
from feynkit.core.weights import ess

__all__ = [
    "RESAMPLERS",
    "ProbabilityVectorWarning",
    "adaptive_resample",
    "get_resampler",
    "log_weights_ok",
    "multinomial_resample",
    "offspring_counts",
    "resample",
    "resample_particles",
    "residual_resample",
    "stratified_resample",
    "systematic_resample",
]

# The prefix sums run in fixed point: remainders in units of 2^−_Q, summed in uint32 within
# blocks of _BLOCK, so a block's partial sums stay below _BLOCK · 2^_Q = 2^31.
_Q = 25
_BLOCK = 64
_ONE = 1 << _Q


class ProbabilityVectorWarning(UserWarning):
    """A log-weights entry point was handed what looks like a probability vector."""


# --------------------------------------------------------------------------- validation


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_num_samples(num_samples) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int | np.integer):
        raise ValueError(
            f"num_samples must be a positive Python int (static under jit), got {num_samples!r}."
        )
    if num_samples <= 0:
        raise ValueError(f"num_samples must be ≥ 1, got {num_samples}.")
    return int(num_samples)


def _check_vector(x, name: str) -> Array:
    x = jnp.asarray(x)
    if x.ndim != 1 or x.shape[0] == 0:
        raise ValueError(
            f"{name} must be a non-empty vector of shape (n,), got shape {x.shape}; resample "
            "each row separately (e.g. with jax.vmap) for a batch."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def _check_log_weights_values(lw: Array, warn: bool) -> None:
    if not _is_concrete(lw):
        return
    v = np.asarray(lw)
    if np.isnan(v).any():
        raise ValueError(
            f"log_weights contains NaN ({int(np.isnan(v).sum())} of {v.size}); a potential or "
            "score returned NaN: check the model and the step size."
        )
    if not (v > -np.inf).any():
        raise ValueError(
            f"all {v.size} log_weights are -inf: every particle has zero weight, so there is "
            "nothing to resample; check the potential/target log-density."
        )
    if warn and v.size >= 2 and v.min() >= 0.0 and v.max() <= 1.0:
        if abs(float(np.sum(v, dtype=np.float64)) - 1.0) < 1e-3:
            warnings.warn(
                "log_weights look like a probability vector (all in [0, 1], summing to 1); "
                "resampling them as log-weights is near-uniform. Pass weights=... to "
                "feynkit.core.resample, or jnp.log(weights); silence with warnings.filterwarnings"
                "('ignore', category=ProbabilityVectorWarning).",
                ProbabilityVectorWarning,
                stacklevel=3,
            )


def _check_weights_values(w: Array) -> None:
    if not _is_concrete(w):
        return
    v = np.asarray(w)
    if not np.isfinite(v).all():
        raise ValueError(
            f"weights must be finite, got {int((~np.isfinite(v)).sum())} non-finite of {v.size}; "
            "pass log_weights=... for weights given in log space."
        )
    if (v < 0).any():
        raise ValueError(
            f"weights must be ≥ 0, got {int((v < 0).sum())} negative of {v.size} (min "
            f"{v.min():.3g}); pass log_weights=... if these are log-weights."
        )
    if not (v > 0).any():
        raise ValueError(f"weights are all zero ({v.size} particles): nothing to resample.")


def log_weights_ok(log_weights: Float[ArrayLike, " n"]) -> Array:
    """Whether `log_weights` can be resampled: no NaN and some entry > −inf (traceable)."""
    lw = jnp.asarray(log_weights)
    return jnp.logical_and(~jnp.any(jnp.isnan(lw)), jnp.any(lw > -jnp.inf))


# --------------------------------------------------------------------------- exact CDF


def _relative_weights(lw: Array) -> Array:
    """w ∝ exp(lw), max w = 1; with any +inf, w = 1 on the +inf entries and 0 elsewhere."""
    posinf = lw == jnp.inf
    top = jnp.max(jnp.where(posinf, -jnp.inf, lw))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    finite_w = jnp.exp(jnp.where(jnp.isnan(lw), -jnp.inf, lw) - top)
    return jnp.where(jnp.any(posinf), posinf.astype(lw.dtype), finite_w)


def _scaled(lw: Array, num_samples: int) -> Array:
    w = _relative_weights(lw)
    # (m w_i) / Σ w: exact for equal weights (m · exp(−log n) can round below one).
    return num_samples * w / jnp.sum(w)


def _split(x: Array) -> tuple[Array, Array]:
    fl = jnp.floor(x)
    return fl.astype(jnp.int32), x - fl  # the subtraction is exact


def _fixed_prefix(a: Array, f: Array) -> tuple[Array, Array]:
    """Exact inclusive prefix sums of a_i + f_i 2^−Q (a, f uint32, f < 2^Q) as (I, F < 2^Q).

    Blocks of `_BLOCK` keep every partial sum of the fractions below 2^32; the block totals'
    carries and fractions are summed by the same routine one level up.
    """
    n = a.shape[0]
    mask = jnp.uint32(_ONE - 1)
    if n <= _BLOCK:
        cf = jnp.cumsum(f)
        return jnp.cumsum(a) + (cf >> _Q), cf & mask
    nb = -(-n // _BLOCK)
    inner = jnp.cumsum(jnp.pad(f, (0, nb * _BLOCK - n)).reshape(nb, _BLOCK), axis=1)
    tot = inner[:, -1]
    bi, bf = _fixed_prefix(tot >> _Q, tot & mask)
    zero = jnp.zeros((1,), jnp.uint32)
    bi, bf = jnp.concatenate([zero, bi[:-1]]), jnp.concatenate([zero, bf[:-1]])  # exclusive
    x = (inner + bf[:, None]).reshape(-1)[:n]  # < 2^31 + 2^Q: no overflow
    carry = jnp.repeat(bi, _BLOCK, total_repeat_length=nb * _BLOCK)[:n]
    return jnp.cumsum(a) + carry + (x >> _Q), x & mask


def _exact_cumsum(s: Array) -> tuple[Array, Array]:
    """Inclusive prefix sums of s ≥ 0 as (I int32, F ∈ [0, 1)) with S_i ≈ I_i + F_i.

    Integer parts and the remainders, rounded to multiples of 2^−Q, are summed in unsigned
    integer arithmetic, so the only error is that rounding: ≤ 2^−(Q+1) per element, and none
    for the float32 elements s ≥ 1/2 (whose remainders are multiples of 2^−24 already). A
    float cumulative sum instead adds an error at the scale of its partial sums at every step.
    """
    a, b = _split(s)
    f = jnp.round(b * _ONE).astype(jnp.uint32)  # b·2^Q is exact (a power of two)
    ints, frac = _fixed_prefix(a.astype(jnp.uint32), f)
    return ints.astype(jnp.int32), frac.astype(s.dtype) * (1.0 / _ONE)


def _scaled_cdf(lw: Array, num_samples: int) -> tuple[Array, Array, Array]:
    """s_i ≈ m W_i and the prefix sums S_i = m Σ_{j≤i} W_j as (I int32, F ∈ [0, 1)).

    A float32 Σ w is off by ~1e-7 relative, which would shift S near m by ~1 at m = 10⁷; so the
    prefix sums of the approximately scaled s are formed exactly, their total T (≈ m) read off
    as (I, F), and S_i = S⁰_i − S⁰_i (T − m)/T corrected with a term of size ≲ 1.
    """
    s = _scaled(lw, num_samples)
    ints, frac = _exact_cumsum(s)
    excess = (ints[-1] - num_samples).astype(s.dtype) + frac[-1]  # T − m, exact
    total = num_samples + excess
    hi, frac = _split(frac - (ints.astype(s.dtype) + frac) * (excess / total))
    return s, ints + hi, frac


def _points_below(s: Array, ints: Array, frac: Array, below: Array, num_samples: int) -> Array:
    """Monotone, zero-weight-flat count of comb points below each S_i, ending at m."""
    n = s.shape[0]
    idx = jnp.arange(n, dtype=jnp.int32)
    positive = s > 0
    below = jnp.clip(below, 0, num_samples)
    # Rounding in the remainders can make S dip by ~1e-6 or move across a zero weight; the
    # cummax restores monotonicity and flatness, and the last positive particle closes at m.
    below = lax.cummax(jnp.where(positive, below, 0))
    last = jnp.max(jnp.where(positive, idx, -1))
    return jnp.where(idx >= last, num_samples, below)


def _ancestors_from_below(below: Array, num_samples: int) -> Array:
    """ancestor_k = #{i : below_i ≤ k}: one scatter-add and one int32 cumsum."""
    hist = jnp.zeros((num_samples + 1,), jnp.int32).at[below].add(1)
    return jnp.cumsum(hist)[:num_samples]


def _comb_below(key: Key, lw: Array, num_samples: int, stratified: bool) -> Array:
    s, ints, frac = _scaled_cdf(lw, num_samples)
    if stratified:
        u = jax.random.uniform(key, (num_samples,), s.dtype)
        hit = u[jnp.clip(ints, 0, num_samples - 1)] < frac  # k = I_i: is k + u_k < I_i + F_i?
        below = ints + hit.astype(jnp.int32)
    else:
        u = jax.random.uniform(key, (), s.dtype)
        below = ints + jnp.ceil(frac - u).astype(jnp.int32)  # #{k : k + u < I + F}
    return _points_below(s, ints, frac, below, num_samples)


_comb_below_jit = jax.jit(_comb_below, static_argnums=(2, 3))


def _finish(lw: Array, ancestors: Array) -> Array:
    n = lw.shape[0]
    return jnp.where(log_weights_ok(lw), ancestors, n).astype(jnp.int32)


def _systematic(key, lw, num_samples):
    return _finish(lw, _ancestors_from_below(_comb_below(key, lw, num_samples, False), num_samples))


def _stratified(key, lw, num_samples):
    return _finish(lw, _ancestors_from_below(_comb_below(key, lw, num_samples, True), num_samples))


def _search(ints: Array, frac: Array, j: Array, v: Array) -> Array:
    """#{i : (I_i, F_i) ≤ (j, v)} lexicographically, by a fixed-length vectorised bisection."""
    n = ints.shape[0]

    def body(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) // 2
        im = ints[jnp.minimum(mid, n - 1)]
        le = (im < j) | ((im == j) & (frac[jnp.minimum(mid, n - 1)] <= v))
        le = le & (lo < hi)
        return jnp.where(le, mid + 1, lo), jnp.where(le | (lo >= hi), hi, mid)

    lo = jnp.zeros(j.shape, jnp.int32)
    hi = jnp.full(j.shape, n, jnp.int32)
    lo, _ = lax.fori_loop(0, math.ceil(math.log2(n + 1)) + 1, body, (lo, hi))
    return lo


def _multinomial(key, lw, num_samples):
    s, ints, frac = _scaled_cdf(lw, num_samples)
    n = s.shape[0]
    k_j, k_v = jax.random.split(key)
    # A uniform on [0, m) at full resolution: integer part j, remainder v.
    j = jax.random.randint(k_j, (num_samples,), 0, num_samples, jnp.int32)
    v = jax.random.uniform(k_v, (num_samples,), s.dtype)
    idx = jnp.minimum(_search(ints, frac, j, v), n - 1)
    # A draw on a rounding-level edge can land on a zero-weight particle: move it to the
    # nearest earlier positive one (the first particle with positive weight if none earlier).
    positive = s > 0
    arange = jnp.arange(n, dtype=jnp.int32)
    first = jnp.argmax(positive).astype(jnp.int32)
    last_positive = lax.cummax(jnp.where(positive, arange, first))
    return _finish(lw, last_positive[idx])


def _residual(key, lw, num_samples):
    n = lw.shape[0]
    s = _scaled(lw, num_samples)
    copies = jnp.floor(s).astype(jnp.int32)
    num_det = jnp.sum(copies)
    det = jnp.repeat(jnp.arange(n, dtype=jnp.int32), copies, total_repeat_length=num_samples)
    residual = s - copies
    # When every residual is zero no random draw is used; the tiny floor keeps the CDF finite.
    log_residual = jnp.log(jnp.maximum(residual, 0.0) + jnp.finfo(residual.dtype).tiny)
    log_residual = jnp.where(_relative_weights(lw) > 0, log_residual, -jnp.inf)
    rnd = _multinomial(key, log_residual, num_samples)
    return _finish(lw, jnp.where(jnp.arange(num_samples) < num_det, det, rnd))


# Jitted (num_samples static) so that eager calls run one compiled program, not op by op;
# inside a caller's jit they are inlined.
_multinomial = jax.jit(_multinomial, static_argnums=2)
_stratified = jax.jit(_stratified, static_argnums=2)
_systematic = jax.jit(_systematic, static_argnums=2)
_residual = jax.jit(_residual, static_argnums=2)
_IMPLS = {
    "multinomial": _multinomial,
    "stratified": _stratified,
    "systematic": _systematic,
    "residual": _residual,
}


# --------------------------------------------------------------------------- public API


def _log_weights_entry(impl, key, log_weights, num_samples):
    num_samples = _check_num_samples(num_samples)
    lw = _check_vector(log_weights, "log_weights")
    _check_log_weights_values(lw, warn=True)
    return impl(key, lw, num_samples)


def multinomial_resample(
    key: Key, log_weights: Float[ArrayLike, " n"], num_samples: int
) -> Int[Array, " m"]:
    """Multinomial resampling from log-weights: `num_samples` i.i.d. draws from Categorical(W).

    Each draw is a full-resolution uniform on [0, m) (integer part and remainder drawn
    separately) searched in the exact (I, F) CDF; O(m log n).
    """
    return _log_weights_entry(_multinomial, key, log_weights, num_samples)


def stratified_resample(
    key: Key, log_weights: Float[ArrayLike, " n"], num_samples: int
) -> Int[Array, " m"]:
    """Stratified resampling from log-weights: one uniform in each stratum [k, k+1) of [0, m).

    O(n + m) by counting (no binary search)."""
    return _log_weights_entry(_stratified, key, log_weights, num_samples)


def systematic_resample(
    key: Key, log_weights: Float[ArrayLike, " n"], num_samples: int
) -> Int[Array, " m"]:
    """Systematic resampling from log-weights: the comb k + U, k = 0..m−1, on [0, m).

    O(n + m) by counting (no binary search); particle i gets ⌊m W_i⌋ or ⌈m W_i⌉ offspring."""
    return _log_weights_entry(_systematic, key, log_weights, num_samples)


def residual_resample(
    key: Key, log_weights: Float[ArrayLike, " n"], num_samples: int
) -> Int[Array, " m"]:
    """Residual resampling from log-weights: ⌊m W_i⌋ copies, the rest multinomial on residuals.

    Output order: the deterministic copies (grouped by parent) first, then the random draws.
    """
    return _log_weights_entry(_residual, key, log_weights, num_samples)


RESAMPLERS: dict[str, Callable[..., Array]] = {
    "multinomial": multinomial_resample,
    "stratified": stratified_resample,
    "systematic": systematic_resample,
    "residual": residual_resample,
}


def get_resampler(name: str) -> Callable[..., Array]:
    """The log-weights resampling function called `name` (one of `RESAMPLERS`)."""
    try:
        return RESAMPLERS[name]
    except KeyError:
        raise ValueError(
            f"unknown resampler {name!r}; choose one of {sorted(RESAMPLERS)}."
        ) from None


def _explicit_log_weights(weights, log_weights) -> Array:
    if (weights is None) == (log_weights is None):
        raise ValueError(
            "pass exactly one of weights=... (non-negative, any scale) or log_weights=... "
            "(unnormalised log-weights)."
        )
    if log_weights is not None:
        lw = _check_vector(log_weights, "log_weights")
        _check_log_weights_values(lw, warn=True)
        return lw
    w = _check_vector(weights, "weights")
    _check_weights_values(w)
    bad = jnp.any(~jnp.isfinite(w) | (w < 0))
    lw = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)
    return jnp.where(bad, jnp.nan, lw)  # invalid weights → the documented invalid path


def resample(
    key: Key,
    num_samples: int,
    *,
    weights: Float[ArrayLike, " n"] | None = None,
    log_weights: Float[ArrayLike, " n"] | None = None,
    method: str = "systematic",
) -> Int[Array, " m"]:
    """Ancestors from exactly one of `weights=` (≥ 0, finite, any scale) or `log_weights=`.

    `method` names a scheme of `RESAMPLERS`. Under `jit`, invalid weights give the out-of-range
    ancestors n (see the module docstring)."""
    num_samples = _check_num_samples(num_samples)
    get_resampler(method)
    lw = _explicit_log_weights(weights, log_weights)
    return _IMPLS[method](key, lw, num_samples)


def offspring_counts(
    key: Key,
    num_samples: int,
    *,
    weights: Float[ArrayLike, " n"] | None = None,
    log_weights: Float[ArrayLike, " n"] | None = None,
    method: str = "systematic",
) -> Int[Array, " n"]:
    """Offspring counts per particle, shape (n,), summing to `num_samples`, O(n + m).

    For "systematic" and "stratified" the counts are differences of the exact points-below
    counts (the same numbers `resample` turns into ancestors with the same key); for the other
    schemes they are the histogram of the ancestors."""
    num_samples = _check_num_samples(num_samples)
    get_resampler(method)
    lw = _explicit_log_weights(weights, log_weights)
    if method in ("systematic", "stratified"):
        below = _comb_below_jit(key, lw, num_samples, method == "stratified")
        counts = jnp.diff(below, prepend=0)
    else:
        anc = _IMPLS[method](key, lw, num_samples)
        counts = jnp.zeros(lw.shape, jnp.int32).at[anc].add(1, mode="drop")
    return jnp.where(log_weights_ok(lw), counts, 0)


def resample_particles(particles: PyTree, ancestors: Int[ArrayLike, " m"]) -> PyTree:
    """Select `particles[ancestors]` along the leading axis of every leaf of a pytree.

    Out-of-range ancestors (the invalid-weights sentinel n) fill float leaves with NaN."""
    ancestors = jnp.asarray(ancestors)
    return jax.tree.map(lambda leaf: jnp.take(leaf, ancestors, axis=0), particles)


def adaptive_resample(
    key: Key,
    particles: PyTree,
    log_weights: Float[ArrayLike, " n"],
    resample_fn: Callable[..., Array] = systematic_resample,
    ess_threshold: float = 0.5,
) -> tuple[PyTree, Array, Array, Array]:
    """Resample when ESS < `ess_threshold` · n, inside `jit` (branch-free, no host round-trip).

    Args:
      key: PRNG key.
      particles: pytree whose leaves have leading dimension n.
      log_weights: unnormalised log-weights, shape (n,).
      resample_fn: a resampling scheme with the shared signature.
      ess_threshold: fraction of n below which to resample; 0 never resamples, 1 always
        resamples at every step (even for uniform weights, whose float ESS can round below n).

    Returns:
      `(particles, log_weights, ancestors, resampled)`: after resampling the log-weights are all
      equal to the log of the mean weight (so log-normaliser bookkeeping is unchanged);
      otherwise they are returned unchanged and `ancestors` is the identity. Any +inf
      log-weight forces a resampling among the +inf particles (the log mean weight is then
      +inf). Invalid weights (NaN, all −inf) raise eagerly; under `jit` they are kept
      unchanged with no resampling — check `log_weights_ok` (`smc.base` reports it).
    """
    log_weights = _check_vector(log_weights, "log_weights")
    _check_log_weights_values(log_weights, warn=False)
    n = log_weights.shape[0]
    posinf = jnp.any(log_weights == jnp.inf)
    do_resample = log_weights_ok(log_weights) & (posinf | (ess(log_weights) < ess_threshold * n))

    # Branch-free: the resampler always runs (O(n)) and a select picks its ancestors or the
    # identity. A `lax.cond` here, inside the SMC loop's scan, was seen to deadlock XLA:CPU's
    # thread pool in fresh processes (issue 16; tests/inference/smc/test_hang.py).
    identity = jnp.arange(n, dtype=jnp.int32)
    ancestors = jnp.where(do_resample, resample_fn(key, log_weights, n), identity)
    mean = jax.scipy.special.logsumexp(log_weights) - jnp.log(n)
    new_log_weights = jnp.where(do_resample, jnp.full_like(log_weights, mean), log_weights)
    return resample_particles(particles, ancestors), new_log_weights, ancestors, do_resample
