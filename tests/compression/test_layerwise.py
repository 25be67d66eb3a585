"""compress_layerwise: the one sequential-calibration loop (QuantRecipe and PruneRecipe).

One layer group equals the one-shot recipe exactly; with two groups, group 2's Hessian is the
float64 NumPy Hessian of the inputs the model with group 1 quantized feeds it."""

import re

import jax
import numpy as np
import pytest

from feynkit.compression.layerwise import compress_layerwise
from feynkit.compression.quant import (
    LINEAR_KERNELS,
    calibrate,
    dequantize_tree,
    gptq_recipe,
    match_paths,
)
from feynkit.compression.quant.calibration import collect_inputs
from tests.compression.quant._tiny_lm import tiny_lm, tokens


def _leaves(t):
    return jax.tree_util.tree_leaves(dequantize_tree(t))


def test_single_group_equals_one_shot():
    model, params = tiny_lm()
    x = tokens(0, 4)
    recipe = gptq_recipe(4, group_size=32, act_order=True, where=r"layers_0/mlp/.*kernel")
    seq, extras = compress_layerwise(recipe, model.forward, params, x, r"layers_0/.*")
    one = recipe(params, calibrate(model.forward, params, x, recipe.where))
    assert extras == [None]
    for a, b in zip(_leaves(seq), _leaves(one), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_second_group_hessian_is_that_of_the_quantized_prefix():
    model, params = tiny_lm()
    x = tokens(1, 4)
    recipe = gptq_recipe(3, group_size=32, where=LINEAR_KERNELS)
    seen = {}

    class Spy:  # records the calibration each group gets
        where, needs_calibration = recipe.where, True

        def with_where(self, where):
            inner = recipe.with_where(where)

            def call(p, calib):
                seen.update(calib.hessians)
                return inner(p, calib)

            return type("R", (), {"__call__": staticmethod(call)})()

    seq, _ = compress_layerwise(
        Spy(), model.forward, params, x, [r"layers_0/.*", r"layers_1/.*"], batch_size=None
    )
    paths = match_paths(params, LINEAR_KERNELS)
    l0 = [re.escape(p) for p in paths if p.startswith("layers_0/")]
    q0 = recipe.with_where(l0)(params, calibrate(model.forward, params, x, l0))
    p = "layers_1/mlp/down_proj/kernel"
    X = np.asarray(collect_inputs(model.forward, q0, x, re.escape(p))[p], np.float64)
    X = X.reshape(-1, X.shape[-1])
    H_ref = 2.0 / x.shape[0] * X.T @ X  # n counted in samples, as `calibrate`
    np.testing.assert_allclose(
        np.asarray(seen[p]), H_ref, rtol=2e-4, atol=1e-5 * np.abs(H_ref).max()
    )
    X_float = np.asarray(collect_inputs(model.forward, params, x, re.escape(p))[p], np.float64)
    X_float = X_float.reshape(-1, X_float.shape[-1])
    assert not np.allclose(2.0 / x.shape[0] * X_float.T @ X_float, H_ref, rtol=1e-3)
    assert [np.shape(a) for a in _leaves(seq)] == [
        np.shape(a) for a in jax.tree_util.tree_leaves(params)
    ]


def test_bad_layers_raise():
    model, params = tiny_lm()
    recipe = gptq_recipe(4, where=LINEAR_KERNELS)
    with pytest.raises(ValueError, match="layers"):
        compress_layerwise(recipe, model.forward, params, tokens(0, 2), [])
    with pytest.raises(ValueError, match="layers"):
        compress_layerwise(recipe, model.forward, params, tokens(0, 2), [r"nope/.*"])
