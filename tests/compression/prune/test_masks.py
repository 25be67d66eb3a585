"""Core pruning: masks against brute-force NumPy selections, N:M validity, exact zeros, path
selection identical to quantize_tree, gradual pruning under jit, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from feynkit.compression import prune, quant


def _params(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "dense": {"kernel": jax.random.normal(k[0], (16, 8)), "bias": jnp.ones(8)},
        "conv": {"kernel": jax.random.normal(k[1], (3, 3, 4, 8))},
        "head": {"kernel": jax.random.normal(k[2], (8, 4))},
    }


@pytest.mark.parametrize("s", [0.0, 0.25, 0.5, 0.9])
def test_row_mask_prunes_the_smallest_per_output_channel(s):
    w = np.asarray(_params()["dense"]["kernel"])
    mask = np.asarray(prune.magnitude_mask(w, s))
    k = int(np.floor(s * w.shape[0]))
    for j in range(w.shape[1]):  # brute force: the k smallest |w| of column j are pruned
        pruned = np.argsort(np.abs(w[:, j]))[:k]
        expect = np.ones(w.shape[0], bool)
        expect[pruned] = False
        np.testing.assert_array_equal(mask[:, j], expect)


def test_layer_and_global_masks_match_a_sorted_threshold():
    p = _params()
    w = np.asarray(p["dense"]["kernel"])
    mask = np.asarray(prune.magnitude_mask(w, 0.4, granularity="layer"))
    thr = np.sort(np.abs(w).ravel())[int(0.4 * w.size)]
    np.testing.assert_array_equal(mask, np.abs(w) >= thr)
    ks = [p["dense"]["kernel"], p["conv"]["kernel"]]
    masks = prune.global_magnitude_masks(ks, 0.3)
    allw = np.concatenate([np.abs(np.asarray(x)).ravel() for x in ks])
    thr = np.sort(allw)[int(0.3 * allw.size)]
    for x, m in zip(ks, masks, strict=True):
        np.testing.assert_array_equal(np.asarray(m), np.abs(np.asarray(x)) >= thr)
    assert sum(int((~m).sum()) for m in masks) == int(0.3 * allw.size)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_is_valid_and_keeps_the_largest(n, m):
    w = np.asarray(_params()["dense"]["kernel"])
    mask = np.asarray(prune.magnitude_mask(w, n=n, m=m))
    groups = mask.reshape(-1, m, w.shape[1])
    assert (groups.sum(axis=1) == n).all()
    wg = np.abs(w).reshape(-1, m, w.shape[1])
    kept_min = np.where(groups, wg, np.inf).min(axis=1)
    dropped_max = np.where(groups, -np.inf, wg).max(axis=1)
    assert (kept_min >= dropped_max).all()
    pruned, _ = prune.prune_tree({"k": w}, prune.magnitude_recipe(n=n, m=m), where="k")
    assert prune.is_nm_sparse(pruned["k"], n, m)


def test_prune_tree_keeps_shapes_and_exact_zeros_and_selects_like_quantize_tree():
    p = _params()
    where = r"(dense|conv)/kernel"
    pruned, masks = prune.prune_tree(p, prune.magnitude_recipe(0.5), where=where)
    q = quant.quantize_tree(p, quant.rtn_recipe(4), where=where)
    sel_p = {
        k
        for k, m in zip(
            quant.tree_paths(p),
            jax.tree_util.tree_leaves(masks, is_leaf=lambda x: x is None),
            strict=True,
        )
        if m is not None
    }
    sel_q = {
        k
        for k, leaf in zip(
            quant.tree_paths(q),
            jax.tree_util.tree_leaves(q, is_leaf=quant.is_compressed),
            strict=True,
        )
        if quant.is_compressed(leaf)
    }
    assert sel_p == sel_q == {"dense/kernel", "conv/kernel"}
    for name in ("dense", "conv"):
        w, m, out = p[name]["kernel"], masks[name]["kernel"], pruned[name]["kernel"]
        assert out.shape == w.shape and out.dtype == w.dtype and m.dtype == jnp.bool_
        np.testing.assert_array_equal(np.asarray(out), np.where(m, w, 0.0))
        assert np.all(np.asarray(out)[~np.asarray(m)] == 0)
    assert masks["head"]["kernel"] is None and masks["dense"]["bias"] is None
    np.testing.assert_array_equal(pruned["head"]["kernel"], p["head"]["kernel"])
    again = prune.apply_masks(p, masks)
    for a, b in zip(
        jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(pruned), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_cubic_schedule_closed_form():
    s = [float(prune.cubic_sparsity(t, 0.9, 10, 50, frequency=10)) for t in (0, 10, 25, 30, 50, 99)]
    expect = [0.0, 0.0, 0.9 * (1 - 0.75**3), 0.9 * (1 - 0.5**3), 0.9, 0.9]
    np.testing.assert_allclose(s, expect, rtol=1e-6)


def test_gradual_pruning_keeps_pruned_weights_exactly_zero_under_jit():
    p = _params(1)
    tx = optax.chain(
        optax.adam(0.05),
        prune.gradual_magnitude_pruning(0.8, 2, 12, frequency=2, where=r"(dense|conv)/kernel"),
    )
    state = tx.init(p)
    traces = []

    @jax.jit
    def step(params, state, key):
        grads = jax.tree_util.tree_map(lambda x: jax.random.normal(key, x.shape), params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for i in range(20):
        p, state = step(p, state, jax.random.key(i))
        masks = prune.pruning_masks(state)
        for name in ("dense", "conv"):
            m = np.asarray(masks[name]["kernel"])
            assert np.all(np.asarray(p[name]["kernel"])[~m] == 0.0)
        traces.append(prune.mask_sparsity(masks))
    assert step._cache_size() == 1
    assert np.all(np.diff(traces) >= 0)  # pruned weights never come back
    n = sum(x.size for x in (p["dense"]["kernel"], p["conv"]["kernel"]))
    expect = (int(0.8 * 128) + int(0.8 * 288)) / n
    assert traces[-1] == pytest.approx(expect)
    assert np.all(np.asarray(p["head"]["kernel"]) != 0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sparsity=1.0), "sparsity=1.0 must be a number in"),
        (dict(sparsity=-0.1), "sparsity=-0.1"),
        (dict(n=5, m=4), "N:M = 5:4"),
        (dict(n=2), "give both n and m"),
    ],
)
def test_bad_recipe_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prune.magnitude_recipe(**kwargs)


def test_bad_input_names_the_parameter():
    p = _params()
    with pytest.raises(ValueError, match=r"dense/kernel: M=3 does not divide"):
        prune.prune_tree(p, prune.magnitude_recipe(n=1, m=3), where="dense/kernel")
    with pytest.raises(ValueError, match="matches no parameter path"):
        prune.prune_tree(p, prune.magnitude_recipe(0.5), where="nothing/kernel")
    bad = {"k": p["dense"]["kernel"].at[0, 0].set(jnp.nan)}
    with pytest.raises(ValueError, match="k: pruning scores contain NaN"):
        prune.prune_tree(bad, prune.magnitude_recipe(0.5), where="k")
    masks = {
        "dense": {"kernel": jnp.ones((8, 16), bool), "bias": None},
        "conv": {"kernel": None},
        "head": {"kernel": None},
    }
    with pytest.raises(ValueError, match=r"mask for dense/kernel has shape \(8, 16\)"):
        prune.apply_masks(p, masks)
    with pytest.raises(ValueError, match="final_sparsity"):
        prune.gradual_magnitude_pruning(1.2, 0, 10)
