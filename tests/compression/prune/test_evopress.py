"""EvoPress: database and assembly, budget-preserving mutations, the search against brute force."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.compression.prune import magnitude_mask
from feynkit.compression.prune.evopress import (
    assemble,
    average_sparsity,
    build_database,
    evopress_search,
    level_switch,
    size_groups,
)

LEVELS = [0.0, 0.25, 0.5, 0.75]


def _params(key):
    ks = jax.random.split(key, 5)
    return {
        f"l{i}": {"kernel": jax.random.normal(ks[i], (8, 4) if i < 4 else (4, 4))} for i in range(5)
    }


def _magnitude(path, w, s):
    return jnp.where(magnitude_mask(w, s), w, 0.0)


def test_database_and_assembly(key):
    params = _params(key)
    db = build_database(params, r"l\d/kernel", LEVELS, _magnitude)
    assert db.variants["l0/kernel"].shape == (4, 8, 4)
    levels = jnp.array([0, 1, 2, 3, 1])
    traces = []

    @jax.jit
    def build(lv):
        traces.append(1)
        return assemble(params, db, lv)

    out = build(levels)
    build(jnp.array([3, 2, 1, 0, 0]))
    assert len(traces) == 1  # one compilation for every allocation
    for i, lv in enumerate([0, 1, 2, 3, 1]):
        w = params[f"l{i}"]["kernel"]
        np.testing.assert_array_equal(
            np.asarray(out[f"l{i}"]["kernel"]), np.asarray(_magnitude("", w, LEVELS[lv]))
        )
        zeros = float(jnp.mean(out[f"l{i}"]["kernel"] == 0))
        assert zeros == pytest.approx(LEVELS[lv])
    assert average_sparsity(db, [2] * 5) == pytest.approx(0.5)


def test_level_switch_keeps_the_budget(key):
    db = build_database(_params(key), r"l\d/kernel", LEVELS, _magnitude)
    groups = size_groups(db)
    assert sorted(len(g) for g in groups) == [1, 4]
    rng = np.random.default_rng(0)
    lv = np.array([2, 2, 2, 2, 1])
    for _ in range(200):
        lv = level_switch(rng, lv, groups, len(LEVELS))
        assert average_sparsity(db, lv) == pytest.approx(average_sparsity(db, [2, 2, 2, 2, 1]))
        assert lv[4] == 1 and lv.min() >= 0 and lv.max() <= 3


def test_search_finds_the_brute_force_optimum(key):
    # separable loss Σ c_i s_i² over four equal units at average level 1.5 (sum of levels 6):
    # the optimum puts the high levels on the cheap units.
    db = build_database(_params(key), r"l[0-3]/kernel", LEVELS, _magnitude)
    c = np.array([5.0, 0.2, 1.0, 3.0])
    s = np.asarray(LEVELS)

    def loss(lv):
        return float(np.sum(c * s[np.asarray(lv)] ** 2))

    best = min((lv for lv in itertools.product(range(4), repeat=4) if sum(lv) == 6), key=loss)
    init = np.array([2, 2, 1, 1])
    res = evopress_search(
        jax.random.key(0), db, init, [loss, loss], [3, 1], generations=40, offspring=6
    )
    assert res.fitness == pytest.approx(loss(best))
    assert sum(res.levels) == 6
    assert all(b <= a for a, b in zip(res.history, res.history[1:], strict=False))


def test_bad_input(key):
    params = _params(key)
    with pytest.raises(ValueError, match="levels"):
        build_database(params, r"l\d/kernel", [0.5, 0.25], _magnitude)
    with pytest.raises(ValueError, match="levels"):
        build_database(params, r"l\d/kernel", [0.0, 1.0], _magnitude)
    with pytest.raises(ValueError, match="matches no parameter"):
        build_database(params, "nothing", LEVELS, _magnitude)
    with pytest.raises(ValueError, match="shape"):
        build_database(params, r"l0/kernel", LEVELS, lambda p, w, s: w[:1])
    db = build_database(params, r"l\d/kernel", LEVELS, _magnitude)
    with pytest.raises(ValueError, match="survivors"):
        evopress_search(key, db, [1] * 5, [lambda lv: 0.0], [2], generations=1, offspring=2)
    with pytest.raises(ValueError, match="init_levels"):
        evopress_search(key, db, [4] * 5, [lambda lv: 0.0], [1], generations=1, offspring=2)
