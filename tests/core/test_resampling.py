"""Tests for feynkit.core.resampling: exactness, unbiasedness, variance and transformations."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.core import (
    RESAMPLERS,
    adaptive_resample,
    get_resampler,
    multinomial_resample,
    offspring_counts,
    resample,
    resample_particles,
    residual_resample,
    stratified_resample,
    systematic_resample,
)
from feynkit.core.resampling import _scaled  # the scaled float32 weights the resampler sees

NAMES = ["multinomial", "stratified", "systematic", "residual"]
LOW_VARIANCE = ["stratified", "systematic", "residual"]
NUM_KEYS = 2000
Z = 5.0  # two-sided normal quantile for the mean-offspring test (p ~ 6e-7 per index)


def _log_weights(seed, n):
    rng = np.random.default_rng(seed)
    return (1.5 * rng.standard_normal(n)).astype(np.float32)


def _probs64(lw):
    lw = np.asarray(lw, np.float64)
    w = np.exp(lw - np.max(lw))
    return w / w.sum()


def _counts(ancestors, n):
    ancestors = np.asarray(ancestors)
    return (ancestors[..., None] == np.arange(n)).sum(axis=-2)


@functools.cache
def _jitted(name):
    return jax.jit(get_resampler(name), static_argnums=2)


@functools.cache
def _batched_fn(name, m):
    fn = get_resampler(name)
    # lax.map over the keys draws exactly what vmap would (test_jit_vmap_over_keys_matches_loop
    # checks vmap); on XLA:CPU it compiles in a fraction of the time of a (2000, m) vmap.
    return jax.jit(lambda keys, lw: jax.lax.map(lambda k: fn(k, lw, m), keys))


def _batched(name, lw, m):
    """Ancestors for NUM_KEYS independent keys, shape (NUM_KEYS, m)."""
    keys = jax.random.split(jax.random.key(0), NUM_KEYS)
    return _batched_fn(name, m)(keys, jnp.asarray(lw))


def test_registry_and_get_resampler():
    assert sorted(RESAMPLERS) == sorted(NAMES)
    assert get_resampler("multinomial") is multinomial_resample
    assert get_resampler("stratified") is stratified_resample
    assert get_resampler("systematic") is systematic_resample
    assert get_resampler("residual") is residual_resample
    with pytest.raises(ValueError, match=r"unknown resampler 'sytematic'.*'systematic'"):
        get_resampler("sytematic")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("m", [9, 19, 4])
def test_output_shape_dtype_range(name, m):
    # n = 9 and m in (9, 19) share their compilations with the tests below.
    lw = _log_weights(0, 9)
    anc = _jitted(name)(jax.random.key(1), lw, m)
    assert anc.shape == (m,)
    assert anc.dtype == jnp.int32
    assert int(anc.min()) >= 0 and int(anc.max()) < 9


@pytest.mark.parametrize("m", [10, 7])
def test_unbiased_offspring_counts(m):
    """E[#offspring of i] = m W_i: batch mean over 2000 keys within Z binomial s.e."""
    n = 10
    lw = _log_weights(1, n)
    probs = _probs64(lw)
    expected = m * probs
    # The multinomial variance m W (1 - W) bounds every scheme's, so this s.e. is conservative.
    se = np.sqrt(m * probs * (1 - probs) / NUM_KEYS)
    for name in NAMES:
        counts = _counts(_batched(name, lw, m), n)
        assert np.all(counts.sum(axis=1) == m)
        np.testing.assert_array_less(np.abs(counts.mean(axis=0) - expected), Z * se + 1e-9)


def test_low_variance_schemes_beat_multinomial():
    n, m = 10, 10
    lw = _log_weights(2, n)
    probs = _probs64(lw)
    multinomial_var = np.sum(m * probs * (1 - probs))  # total variance of the counts
    # chi-square-ish check that the multinomial matches its own theory (within 10%).
    var = {name: _counts(_batched(name, lw, m), n).var(axis=0).sum() for name in NAMES}
    np.testing.assert_allclose(var["multinomial"], multinomial_var, rtol=0.1)
    for name in LOW_VARIANCE:
        assert var[name] <= 0.75 * multinomial_var, (name, var[name], multinomial_var)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("n", "indices", "ms"), [(9, (0, 4, 8), (9, 19)), (1, (0,), (1,))])
def test_single_finite_weight_selects_only_it(name, n, indices, ms):
    fn = _jitted(name)
    for index in indices:
        lw = np.full((n,), -np.inf, np.float32)
        lw[index] = -3.0
        for m in ms:
            np.testing.assert_array_equal(fn(jax.random.key(3), lw, m), np.full(m, index))


@pytest.mark.parametrize("name", NAMES)
def test_never_selects_zero_weight_particles(name):
    """Regression: with float32 cumsum rounding, -inf particles used to be drawn at large n."""
    n = 100_000
    rng = np.random.default_rng(4)
    lw = rng.standard_normal(n).astype(np.float32)
    lw[rng.random(n) < 0.5] = -np.inf
    lw[-1000:] = -np.inf  # a trailing block of zero weights as well
    zero = ~np.isfinite(lw)
    fn = _jitted(name)
    for seed in range(3):
        anc = np.asarray(fn(jax.random.key(seed), jnp.asarray(lw), n))
        assert not zero[anc].any(), f"{zero[anc].sum()} zero-weight particles selected"


@pytest.mark.parametrize("name", LOW_VARIANCE)
@pytest.mark.parametrize("n", [1, 7, 100_000])
def test_uniform_weights_give_each_index_exactly_once(name, n):
    fn = _jitted(name)
    lw = jnp.full((n,), 0.3)
    for seed in range(3):
        anc = np.asarray(fn(jax.random.key(seed), lw, n))
        np.testing.assert_array_equal(np.sort(anc), np.arange(n))
    if n == 7:
        anc = np.asarray(fn(jax.random.key(7), lw, 2 * n))
        np.testing.assert_array_equal(np.sort(anc), np.repeat(np.arange(n), 2))


def test_residual_deterministic_part_is_floor_m_w():
    n, m = 12, 97
    lw = _log_weights(5, n)
    scaled = m * _probs64(lw)
    # Keep clear of integer boundaries so float32 rounding cannot move a floor.
    assert np.min(np.abs(scaled - np.round(scaled))) > 1e-3
    floors = np.floor(scaled).astype(int)
    num_det = floors.sum()
    assert 0 < num_det < m
    det_ref = np.repeat(np.arange(n), floors)
    for seed in range(5):
        anc = np.asarray(_jitted("residual")(jax.random.key(seed), lw, m))
        np.testing.assert_array_equal(anc[:num_det], det_ref)
        assert np.all(_counts(anc, n) >= floors)
        # The random part draws only particles with a positive residual.
        residual = scaled - floors
        assert np.all(residual[anc[num_det:]] > 0)


def test_resample_particles_on_pytree():
    n = 6
    rng = np.random.default_rng(6)
    particles = {
        "x": rng.standard_normal((n, 3)).astype(np.float32),
        "y": np.arange(n, dtype=np.int32),
        "z": {"a": rng.standard_normal((n, 2, 2)).astype(np.float16)},
    }
    anc = np.asarray([5, 5, 0, 2, 1, 1, 3, 4, 0], np.int32)  # m = 9 != n
    out = resample_particles(jax.tree.map(jnp.asarray, particles), anc)
    assert jax.tree.structure(out) == jax.tree.structure(particles)
    for got, leaf in zip(jax.tree.leaves(out), jax.tree.leaves(particles), strict=True):
        assert got.dtype == leaf.dtype
        np.testing.assert_array_equal(got, leaf[anc])


def _state(n, seed=7):
    rng = np.random.default_rng(seed)
    return {
        "x": jnp.asarray(rng.standard_normal((n, 2)), jnp.float32),
        "h": jnp.asarray(rng.standard_normal((n,)), jnp.bfloat16),
        "id": jnp.arange(n, dtype=jnp.int32),
    }


@functools.cache
def _jitted_adaptive():
    # The threshold is traced: one compilation serves every threshold.
    return jax.jit(lambda k, p, lw, thr: adaptive_resample(k, p, lw, systematic_resample, thr))


def _ess64(lw):
    p = _probs64(lw)
    return 1.0 / np.sum(p**2)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.9])
def test_adaptive_resample_iff_ess_below_threshold(threshold):
    n = 64
    particles = _state(n)
    key = jax.random.key(8)
    adaptive = _jitted_adaptive()
    for scale in [0.1, 0.6, 1.0, 2.0, 4.0]:
        lw = (scale * np.random.default_rng(9).standard_normal(n)).astype(np.float32)
        ess_frac = _ess64(lw) / n
        if abs(ess_frac - threshold) < 1e-3:
            continue
        out, new_lw, anc, resampled = adaptive(key, particles, lw, threshold)
        assert bool(resampled) == (ess_frac < threshold), (scale, ess_frac)
        if ess_frac < threshold:
            mean = np.log(np.mean(np.exp(lw.astype(np.float64))))
            np.testing.assert_allclose(new_lw, np.full(n, mean), rtol=1e-6, atol=1e-6)
            # Systematic resampling gives particle i floor(n W_i) or ceil(n W_i) offspring.
            counts, scaled = _counts(anc, n), n * _probs64(lw)
            assert np.all((counts >= np.floor(scaled)) & (counts <= np.ceil(scaled)))
        else:
            np.testing.assert_array_equal(new_lw, lw)
            np.testing.assert_array_equal(anc, np.arange(n))
        assert anc.dtype == jnp.int32
        for got, leaf in zip(jax.tree.leaves(out), jax.tree.leaves(particles), strict=True):
            assert got.dtype == leaf.dtype
            np.testing.assert_array_equal(got, np.asarray(leaf)[np.asarray(anc)])


def test_adaptive_resample_threshold_extremes():
    n = 64
    particles = _state(n)
    lw = jnp.asarray(_log_weights(10, n))
    adaptive = _jitted_adaptive()
    _, new_lw, _, resampled = adaptive(jax.random.key(0), particles, lw, 0.0)
    assert not bool(resampled)
    np.testing.assert_array_equal(new_lw, lw)
    _, _, _, resampled = adaptive(jax.random.key(0), particles, lw, 1.0)
    assert bool(resampled)


@pytest.mark.parametrize("name", NAMES)
def test_adaptive_resample_in_jit_and_scan_keeps_structure(name):
    n, steps, threshold = 32, 8, 0.5
    fn = get_resampler(name)
    init = _state(n)
    incs = (0.8 * np.random.default_rng(11).standard_normal((steps, n))).astype(np.float32)
    keys = jax.random.split(jax.random.key(12), steps)

    def body(carry, xs):
        particles, lw = carry
        key, inc = xs
        particles, lw, anc, resampled = adaptive_resample(key, particles, lw + inc, fn, threshold)
        return (particles, lw), (anc, resampled)

    carry0 = (init, jnp.zeros(n, jnp.float32))
    scan = jax.jit(lambda c, xs: jax.lax.scan(body, c, xs))
    (final, final_lw), (ancs, flags) = scan(carry0, (keys, jnp.asarray(incs)))

    # Independent reference for the decisions: the weights do not depend on the particles, and
    # after resampling they are uniform (the log mean weight).
    lw_ref, flags_ref = np.zeros(n), []
    for inc in incs.astype(np.float64):
        lw_ref = lw_ref + inc
        flags_ref.append(_ess64(lw_ref) < threshold * n)
        if flags_ref[-1]:
            lw_ref = np.full(n, np.log(np.mean(np.exp(lw_ref))))
    np.testing.assert_array_equal(flags, flags_ref)
    assert any(flags_ref) and not all(flags_ref)  # both branches of the cond were taken
    np.testing.assert_allclose(final_lw, lw_ref, rtol=1e-5, atol=1e-5)

    assert jax.tree.structure(final) == jax.tree.structure(init)
    for got, leaf in zip(jax.tree.leaves(final), jax.tree.leaves(init), strict=True):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
    assert final_lw.dtype == jnp.float32
    # "id" tracks the genealogy: composing the ancestor vectors reproduces it, and the
    # ancestors are the identity at the steps that did not resample.
    lineage = np.arange(n)
    for anc, flag in zip(np.asarray(ancs), flags_ref, strict=True):
        if not flag:
            np.testing.assert_array_equal(anc, np.arange(n))
        lineage = lineage[anc]
    np.testing.assert_array_equal(final["id"], lineage)
    for leaf in ("x", "h"):
        np.testing.assert_array_equal(final[leaf], np.asarray(init[leaf])[lineage])


@pytest.mark.parametrize("name", NAMES)
def test_jit_vmap_over_keys_matches_loop(name):
    fn = get_resampler(name)
    lw = jnp.asarray(_log_weights(13, 9))
    keys = jax.random.split(jax.random.key(14), 5)
    batched = jax.jit(jax.vmap(fn, in_axes=(0, None, None)), static_argnums=2)(keys, lw, 9)
    for i in range(5):
        np.testing.assert_array_equal(batched[i], _jitted(name)(keys[i], lw, 9))


def test_vmap_over_weights():
    batch = jnp.asarray(np.stack([_log_weights(s, 9) for s in range(3)]))
    key = jax.random.key(15)
    out = jax.jit(jax.vmap(systematic_resample, in_axes=(None, 0, None)), static_argnums=2)(
        key, batch, 9
    )
    for i in range(3):
        np.testing.assert_array_equal(out[i], _jitted("systematic")(key, batch[i], 9))


def test_compiles_once():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def resample(key, lw):
        return systematic_resample(key, lw, 64)

    lw = jnp.asarray(_log_weights(16, 64))
    a = resample(jax.random.key(0), lw)
    b = resample(jax.random.key(1), lw + 1.0)
    assert a.shape == b.shape == (64,)
    # The guard itself works: a new shape retraces and trips it.
    with pytest.raises(AssertionError):
        resample(jax.random.key(2), jnp.zeros(65))


# --------------------------------------------------------------- float32 exactness at scale


def _reference_counts(s, u, stratified):
    """float64 offspring counts on the same uniforms from scaled weights s (Σ s = m).

    Also the distance from each CDF boundary S_i to its nearest comb point k + u(_k).
    """
    m = len(s)
    cdf = np.cumsum(np.asarray(s, np.float64))
    cdf *= m / cdf[-1]
    if stratified:
        fl = np.floor(cdf).astype(np.int64)
        below = fl + (u[np.clip(fl, 0, m - 1)] < cdf - fl)
        near_k = np.clip(np.stack([fl - 1, fl, fl + 1]), 0, m - 1)
        dist = np.abs(near_k + u[near_k] - cdf).min(axis=0)
    else:
        below = np.ceil(cdf - u)
        dist = np.abs((cdf - u) - np.round(cdf - u))
    below = np.clip(below, 0, m).astype(np.int64)
    below[-1] = m
    return np.diff(np.maximum.accumulate(below), prepend=0), dist


def _textbook_float32_counts(key, lw, stratified):
    """The usual float32 construction: comb (k + u)/m, float32 cumsum, binary search."""
    m = lw.shape[0]
    w = jnp.exp(lw - jnp.max(lw))
    cdf = jnp.cumsum(w / jnp.sum(w))
    u = jax.random.uniform(key, (m,) if stratified else (), jnp.float32)
    comb = (jnp.arange(m, dtype=jnp.float32) + u) / m
    anc = jnp.minimum(jnp.searchsorted(cdf, comb), m - 1)
    return np.bincount(np.asarray(anc), minlength=m)


def _check_exact_counts(n, method, machinery_edge):
    """Offspring counts at n in float32 against float64 on the same uniforms, in two ways.

    1. The machinery (comb, prefix sums, normalisation) on the method's own float32 scaled
       weights s: the fixed-point prefix sums round each remainder to 2^−25, a random walk of
       std ≈ sqrt(n)·2^−26/√3 (8.6e-6 at 1e6, 2.7e-5 at 1e7), so a count may differ only where
       a comb point lies within `machinery_edge` (≈ 4σ) of a boundary.
    2. End to end from the float32 log-weights: any float32 weight is rounded to 2^−24
       relative, which moves the exact CDF at i by a random walk of size
       b_i = sqrt(Σ_{j≤i} s_j²)·2^−24 (1.3e-3 at the end for these heavy log-normal weights at
       1e7) — a limit of float32 weights, not of the resampler. Counts may differ only where a
       comb point lies within 3 b_i of a boundary; the textbook float32 resampler, on the same
       weights and uniforms, misplaces over 30 times as many.
    """
    rng = np.random.default_rng(21)
    lw = (2.0 * rng.standard_normal(n)).astype(np.float32)
    lw[rng.random(n) < 0.1] = -np.inf
    key = jax.random.key(22)
    counts = jax.jit(lambda k, w: offspring_counts(k, n, log_weights=w, method=method))(key, lw)
    counts = np.asarray(counts)
    assert counts.sum() == n and np.all(counts[~np.isfinite(lw)] == 0)
    stratified = method == "stratified"
    u = np.asarray(jax.random.uniform(key, (n,) if stratified else (), jnp.float32), np.float64)

    def off_counts(ref, dist, edge):
        diff = counts - ref
        off = np.nonzero(diff)[0]
        assert np.abs(diff).max() <= 1
        # count i changes when boundary i or i − 1 moved across a comb point
        near = dist < edge
        near_either = near | np.concatenate([[False], near[:-1]])
        assert near_either[off].all(), f"{(~near_either[off]).sum()} counts differ away from edges"
        assert len(off) <= 2 * near.sum() + 2
        return len(off), int(near.sum())

    s32 = np.asarray(jax.jit(_scaled, static_argnums=1)(jnp.asarray(lw), n), np.float64)
    machinery = off_counts(*_reference_counts(s32, u, stratified), machinery_edge)

    w = np.exp(lw.astype(np.float64) - lw.max())
    s64 = n * w / w.sum()
    bound = np.sqrt(np.cumsum(s64**2)) * 2.0**-24
    end_to_end = off_counts(*_reference_counts(s64, u, stratified), 3 * bound)
    ref64, _ = _reference_counts(s64, u, stratified)
    textbook = int((_textbook_float32_counts(key, jnp.asarray(lw), stratified) != ref64).sum())
    assert 30 * end_to_end[0] < textbook, (end_to_end, textbook)
    return machinery, end_to_end, textbook


@pytest.mark.parametrize("method", ["systematic", "stratified"])
def test_float32_counts_match_float64_at_1e6(method):
    _check_exact_counts(1_000_000, method, machinery_edge=4e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["systematic", "stratified"])
def test_float32_counts_match_float64_at_1e7(method):
    (m_off, m_near), (e_off, e_near), textbook = _check_exact_counts(
        10_000_000, method, machinery_edge=1e-4
    )
    print(
        f"{method} n=1e7: machinery {m_off} counts differ by 1 ({m_near} comb points within 1e-4 "
        f"of an edge); end to end {e_off} ({e_near} within 3 rounding bounds); textbook float32 "
        f"{textbook}"
    )


def test_systematic_ancestors_are_the_counts():
    n = 5000
    lw = jnp.asarray(_log_weights(23, n))
    key = jax.random.key(24)
    for method in ("systematic", "stratified"):
        anc = np.asarray(resample(key, n, log_weights=lw, method=method))
        counts = np.asarray(offspring_counts(key, n, log_weights=lw, method=method))
        np.testing.assert_array_equal(anc, np.repeat(np.arange(n), counts))


@pytest.mark.slow
def test_comb_keeps_its_offset_beyond_2_to_24():
    # With (k + u)/m in float32 the offset is rounded away for k ≥ 2^24. Weights 3:1 alternate,
    # so particle 2j holds [2j, 2j + 1.5) of the m = n points: it gets 2 offspring when u < 0.5
    # and 1 otherwise, for every j — also beyond 2^24.
    n = 20_000_000
    lw = jnp.zeros((n,), jnp.float32).at[::2].set(jnp.log(3.0))
    # lw is an argument, not a closed-over constant (XLA would constant-fold the 2e7-element
    # prefix sums at compile time for minutes)
    fn = jax.jit(lambda k, w: offspring_counts(k, n, log_weights=w))
    for seed in range(4):
        key = jax.random.key(seed)
        u = float(jax.random.uniform(key, (), jnp.float32))
        c = np.asarray(fn(key, lw)).reshape(-1, 2)
        first = 2 if u < 0.5 else 1
        assert (c[:, 0] == first).all() and (c[:, 1] == 2 - first).all(), (u, seed)


# --------------------------------------------------------------- explicit inputs, degenerate


def test_resample_needs_exactly_one_of_weights_and_log_weights():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="exactly one of weights"):
        resample(key, 4)
    with pytest.raises(ValueError, match="exactly one of weights"):
        resample(key, 4, weights=jnp.ones(3), log_weights=jnp.zeros(3))
    w = jnp.asarray([0.2, 0.0, 0.8])
    lw = jnp.log(w)
    for method in NAMES:
        a = resample(key, 50, weights=w, method=method)
        b = resample(key, 50, log_weights=lw, method=method)
        np.testing.assert_array_equal(a, b)
        assert not (np.asarray(a) == 1).any()
    # any scale of weights
    np.testing.assert_array_equal(resample(key, 50, weights=7 * w), resample(key, 50, weights=w))


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([0.5, -0.1, 0.6], "weights must be ≥ 0"),
        ([0.5, np.nan, 0.5], "weights must be finite"),
        ([1.0, np.inf], "weights must be finite"),
        ([0.0, 0.0], "weights are all zero"),
    ],
)
def test_weights_entry_rejects_bad_values(weights, match):
    with pytest.raises(ValueError, match=match):
        resample(jax.random.key(0), 4, weights=jnp.asarray(weights))


def test_log_weights_entry_warns_on_probability_vector():
    from feynkit.core import ProbabilityVectorWarning

    probs = jnp.asarray([0.1, 0.2, 0.7])
    for fn in RESAMPLERS.values():
        with pytest.warns(ProbabilityVectorWarning, match="look like a probability vector"):
            fn(jax.random.key(0), probs, 3)
    with pytest.warns(ProbabilityVectorWarning):
        resample(jax.random.key(0), 3, log_weights=probs)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProbabilityVectorWarning)
        anc = systematic_resample(jax.random.key(0), probs, 3)  # silenced: no error under -W error
    assert anc.shape == (3,) and bool(jnp.all((anc >= 0) & (anc < 3)))
    systematic_resample(jax.random.key(0), jnp.log(probs), 3)  # genuine log-weights: no warning
    systematic_resample(jax.random.key(0), jnp.zeros(3), 3)


@pytest.mark.parametrize("name", NAMES)
def test_posinf_log_weights_resample_among_them(name):
    fn = get_resampler(name)
    lw = jnp.asarray([0.0, jnp.inf, 1.0, jnp.inf, -jnp.inf])
    anc = np.asarray(fn(jax.random.key(1), lw, 400))
    assert set(np.unique(anc)) == {1, 3}
    assert abs((anc == 1).mean() - 0.5) < 0.1
    anc_jit = np.asarray(_jitted(name)(jax.random.key(1), lw, 400))
    np.testing.assert_array_equal(anc_jit, anc)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("lw", "match"),
    [([0.0, np.nan, 1.0], "contains NaN"), ([-np.inf, -np.inf, -np.inf], "all 3 log_weights")],
)
def test_invalid_log_weights_raise_eagerly_and_flag_under_jit(name, lw, match):
    from feynkit.core import log_weights_ok

    lw = jnp.asarray(lw, jnp.float32)
    with pytest.raises(ValueError, match=match):
        get_resampler(name)(jax.random.key(0), lw, 4)
    # under jit: never silently particle 0 — the out-of-range sentinel n, and the flag
    anc = _jitted(name)(jax.random.key(0), lw, 4)
    np.testing.assert_array_equal(anc, np.full(4, 3))
    assert not bool(jax.jit(log_weights_ok)(lw))
    filled = resample_particles(jnp.arange(3.0), anc)
    assert np.isnan(np.asarray(filled)).all()


@pytest.mark.parametrize("m", [0, -1, 2.0, None])
def test_num_samples_must_be_positive_int(m):
    with pytest.raises(ValueError, match="num_samples"):
        systematic_resample(jax.random.key(0), jnp.zeros(3), m)


def test_two_dimensional_weights_rejected():
    with pytest.raises(ValueError, match=r"log_weights must be a non-empty vector.*vmap"):
        systematic_resample(jax.random.key(0), jnp.zeros((2, 3)), 3)
    with pytest.raises(ValueError, match="weights must be a non-empty vector"):
        resample(jax.random.key(0), 3, weights=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="log_weights must be a non-empty vector"):
        systematic_resample(jax.random.key(0), jnp.zeros((0,)), 3)


def test_adaptive_resample_degenerate_weights():
    from feynkit.core import log_weights_ok

    n = 4
    particles = jnp.arange(n, dtype=jnp.float32)
    with pytest.raises(ValueError, match="contains NaN"):
        adaptive_resample(jax.random.key(0), particles, jnp.asarray([0.0, jnp.nan, 0.0, 0.0]))
    adaptive = _jitted_adaptive()
    lw = jnp.asarray([0.0, jnp.nan, 0.0, 0.0])
    out, new_lw, anc, resampled = adaptive(jax.random.key(0), {"x": particles}, lw, 0.5)
    assert not bool(resampled) and not bool(log_weights_ok(new_lw))
    np.testing.assert_array_equal(anc, np.arange(n))
    # +inf: resampled among the +inf particles, whatever the threshold
    lw = jnp.asarray([0.0, jnp.inf, 0.0, 0.0])
    out, new_lw, anc, resampled = adaptive(jax.random.key(0), {"x": particles}, lw, 0.0)
    assert bool(resampled)
    np.testing.assert_array_equal(out["x"], np.ones(n))
