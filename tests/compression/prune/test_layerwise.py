"""prune_layerwise: each layer is calibrated on the model whose earlier layers are pruned (the
reference codes' sequential scheme), which differs from calibrating once on the float model."""

import re

import numpy as np
import pytest

from feynkit.compression import prune
from feynkit.compression.quant import LINEAR_KERNELS, calibrate, match_paths
from tests.compression.quant._tiny_lm import tiny_lm, tokens


@pytest.mark.slow
def test_layerwise_calibrates_on_the_pruned_prefix():
    model, params = tiny_lm()
    x = tokens(0, 8)
    recipe = prune.wanda_recipe(0.5, where=LINEAR_KERNELS)
    seq, masks = prune.prune_layerwise(
        recipe, model.forward, params, x, [r"layers_0/.*", r"layers_1/.*"]
    )
    paths = match_paths(params, LINEAR_KERNELS)
    l0 = [re.escape(p) for p in paths if p.startswith("layers_0/")]
    l1 = [re.escape(p) for p in paths if p.startswith("layers_1/")]
    step0, _ = prune.prune_tree(
        params, recipe, l0, calibration=calibrate(model.forward, params, x, l0)
    )
    manual, _ = prune.prune_tree(
        step0, recipe, l1, calibration=calibrate(model.forward, step0, x, l1)
    )
    oneshot, _ = prune.prune_tree(
        params, recipe, calibration=calibrate(model.forward, params, x, LINEAR_KERNELS)
    )
    k = "layers_1/mlp/down_proj/kernel".split("/")
    get = lambda t: np.asarray(t[k[0]][k[1]][k[2]][k[3]])  # noqa: E731
    np.testing.assert_array_equal(get(seq), get(manual))
    assert not np.array_equal(get(seq) != 0, get(oneshot) != 0)  # other inputs, other mask
    assert prune.mask_sparsity(masks) == 0.5
