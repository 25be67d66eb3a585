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
    resample_particles,
    residual_resample,
    stratified_resample,
    systematic_resample,
)

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
