"""FLAP: fluctuation scores (float64 reference), exact bias compensation on the calibration mean,
the shrunk model equals the masked model, adaptive budgets, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.compression.prune.flap import (
    flap,
    flap_plan,
    flap_prune,
    flap_statistics,
    fluctuation_scores,
)
from feynkit.compression.quant.calibration import collect_inputs
from feynkit.models import TransformerLM


@pytest.fixture(scope="module")
def lm():
    model = TransformerLM(256, 32, 2, 4, mlp_dim=48, max_len=16)
    params = model.init_params(jax.random.key(0))
    # non-trivial means and fluctuations in the hidden layers
    params = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, params)
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, 256)
    stats = flap_statistics(model.forward, params, tokens)
    paths = [
        f"layers_{i}/{m}/kernel" for i in (0, 1) for m in ("self_attn/o_proj", "mlp/down_proj")
    ]
    rows = collect_inputs(model.forward, params, tokens, paths)
    return model, params, tokens, stats, {p: np.asarray(x, np.float64) for p, x in rows.items()}


@pytest.fixture(scope="module")
def forward(lm):
    return jax.jit(lm[0].forward)


def test_statistics_and_scores_match_float64(lm):
    model, params, tokens, stats, captured = lm
    path = "layers_1/mlp/down_proj/kernel"
    rows = captured[path]
    np.testing.assert_allclose(np.asarray(stats.mean[path]), rows.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(stats.var[path]), rows.var(0, ddof=1), rtol=1e-4)
    W = np.asarray(params["layers_1"]["mlp"]["down_proj"]["kernel"], np.float64)
    np.testing.assert_allclose(
        np.asarray(fluctuation_scores(W, stats.var[path])),
        rows.var(0, ddof=1) * (W**2).sum(1),
        rtol=1e-4,
    )


@pytest.mark.parametrize("module", ["self_attn/o_proj", "mlp/down_proj"])
def test_bias_compensation_exact_on_the_calibration_mean(lm, module):
    model, params, tokens, stats, captured = lm
    plan = flap_plan(params, stats, 0.4, model.head_dim)
    pruned = flap_prune(params, stats, plan, model.head_dim)
    plain = flap_prune(params, stats, plan, model.head_dim, bias_compensation=False)
    path = f"layers_0/{module}/kernel"
    x = captured[path]
    W = np.asarray(params["layers_0"][module.split("/")[0]][module.split("/")[1]]["kernel"])
    keep = (
        np.repeat(plan.heads["layers_0"], model.head_dim)
        if module.startswith("self")
        else plan.channels["layers_0"]
    )
    assert 0 < keep.sum() < len(keep)
    proj = pruned["layers_0"][module.split("/")[0]][module.split("/")[1]]
    Wk, b = np.asarray(proj["kernel"], np.float64), np.asarray(proj["bias"], np.float64)
    assert Wk.shape == (keep.sum(), W.shape[1])
    dense_mean = (x @ W).mean(0)
    np.testing.assert_allclose((x[:, keep] @ Wk + b).mean(0), dense_mean, atol=1e-4)
    # without the bias the mean output is off by exactly the baseline term
    gap = (x[:, keep] @ Wk).mean(0) - dense_mean
    assert np.abs(gap).max() > 1e-2
    assert "bias" not in plain["layers_0"][module.split("/")[0]][module.split("/")[1]]


@pytest.mark.parametrize("structure", ["AL-AM", "UL-UM"])
def test_shrunk_model_equals_masked_model(lm, forward, structure):
    model, params, tokens, stats, _ = lm
    plan = flap_plan(params, stats, 0.3, model.head_dim, structure)
    small = flap_prune(params, stats, plan, model.head_dim)
    masked = flap_prune(params, stats, plan, model.head_dim, shrink=False)
    np.testing.assert_allclose(
        np.asarray(forward(small, tokens)), np.asarray(forward(masked, tokens)), atol=2e-4
    )
    n = sum(x.size for x in jax.tree.leaves(params))
    n_small = sum(x.size for x in jax.tree.leaves(small))
    n_masked = sum(x.size for x in jax.tree.leaves(masked))
    assert n_small < n_masked - 0.1 * (n_masked - n) - 1000
    for name in ("layers_0", "layers_1"):
        assert plan.heads[name].any() and plan.channels[name].any()
        assert small[name]["mlp"]["gate_proj"]["kernel"].shape[1] == plan.channels[name].sum()
        q = small[name]["self_attn"]["q_proj"]["kernel"]
        assert q.shape[1] == plan.heads[name].sum() * model.head_dim


def test_adaptive_budget_and_ratio_zero(lm, forward):
    model, params, tokens, stats, _ = lm
    head_cost, channel_cost = 4 * 32 * model.head_dim, 3 * 32
    for ratio in (0.2, 0.4):
        plan = flap_plan(params, stats, ratio, model.head_dim)
        assert abs(plan.removed_fraction - ratio) * (2 * (4 * head_cost + 48 * channel_cost)) <= (
            head_cost
        )
    plan = flap_plan(params, stats, 0.0, model.head_dim)
    assert plan.removed_fraction == 0.0
    same = flap_prune(params, stats, plan, model.head_dim)
    np.testing.assert_allclose(
        np.asarray(forward(same, tokens)),
        np.asarray(forward(params, tokens)),
        atol=1e-4,
    )


@pytest.mark.slow
def test_grouped_query_attention_prunes_whole_groups():
    model = TransformerLM(256, 32, 1, 4, num_kv_heads=2, mlp_dim=24, max_len=8)
    params = model.init_params(jax.random.key(3))
    tokens = jax.random.randint(jax.random.key(4), (4, 8), 0, 256)
    small, plan = flap(model.forward, params, tokens, 0.3, model.head_dim, structure="UL-UM")
    assert plan.heads["layers_0"].shape == (2,)
    k = small["layers_0"]["self_attn"]["k_proj"]["kernel"]
    q = small["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.shape[1] == 2 * k.shape[1]
    assert jax.jit(model.forward)(small, tokens).shape == (4, 8, 256)


def test_bad_input(lm):
    model, params, tokens, stats, _ = lm
    with pytest.raises(ValueError, match="ratio"):
        flap_plan(params, stats, 1.0, model.head_dim)
    with pytest.raises(ValueError, match="structure"):
        flap_plan(params, stats, 0.2, model.head_dim, "global")
    with pytest.raises(ValueError, match="TransformerLM"):
        flap_plan({"dense": {"kernel": jnp.ones((2, 2))}}, stats, 0.2, model.head_dim)
    bad = stats._replace(var={**stats.var, "layers_0/mlp/down_proj/kernel": jnp.full(48, jnp.nan)})
    with pytest.raises(ValueError, match="not finite"):
        flap_plan(params, bad, 0.2, model.head_dim)
