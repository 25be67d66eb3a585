"""quantize_tree / compressed_apply / tree_nbytes on the real TransformerLM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.compression.quant import (
    LINEAR_KERNELS,
    QuantizedArray,
    compressed_apply,
    dequantize,
    dequantize_tree,
    match_paths,
    quantize_tree,
    rtn_recipe,
    tree_bits_per_weight,
    tree_nbytes,
    tree_paths,
)
from tests.compression.quant._tiny_lm import tiny_lm, tokens


def is_q(x):
    return isinstance(x, QuantizedArray)


LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_selects_exactly_the_linear_kernels():
    _, params = tiny_lm()
    q = quantize_tree(params, rtn_recipe(bits=4, group_size=32, where=LINEAR_KERNELS))
    leaves = jax.tree_util.tree_leaves(q, is_leaf=lambda x: isinstance(x, QuantizedArray))
    quantized = [x for x in leaves if isinstance(x, QuantizedArray)]
    assert len(quantized) == 2 * len(LINEAR_NAMES)
    assert isinstance(q["layers_1"]["mlp"]["down_proj"]["kernel"], QuantizedArray)
    assert q["lm_head"]["kernel"] is params["lm_head"]["kernel"]
    assert q["embed_tokens"]["embedding"] is params["embed_tokens"]["embedding"]
    assert tree_paths(q) == tree_paths(params)
    deq = dequantize_tree(q)
    assert jax.tree_util.tree_structure(deq) == jax.tree_util.tree_structure(params)


def test_eight_bit_forward_close_to_float():
    model, params = tiny_lm()
    x = tokens(1)
    ref = jax.jit(model.forward)(params, x)
    qparams = rtn_recipe(bits=8, where=LINEAR_KERNELS)(params)
    out = jax.jit(compressed_apply(model.forward))(qparams, x)
    # 8-bit per-channel: rms weight error ≈ max|w|/(254·√3) ≈ 0.8 % of rms|w| per kernel; the
    # 14 kernels of the random-init model add up to ~2 % relative logit error (measured 1.8 %).
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert rel < 4e-2, rel
    assert rel > 1e-5  # the quantized weights were used


def test_memory_matches_closed_form():
    _, params = tiny_lm()
    q = rtn_recipe(bits=4, group_size=128, where=LINEAR_KERNELS)(params)
    expected, bf16 = 0, 0
    for path, leaf in zip(tree_paths(params), jax.tree_util.tree_leaves(params), strict=True):
        bf16 += 2 * leaf.size
        if any(f"{name}/kernel" in path for name in LINEAR_NAMES):
            d_in, d_out = leaf.shape
            expected += d_in * d_out // 2 + (d_in // 128) * d_out * 4  # nibbles + f32 scales
        else:
            expected += 2 * leaf.size  # kept in bf16
    assert tree_nbytes(q, float_dtype=jnp.bfloat16) == expected
    assert tree_nbytes(params, float_dtype=jnp.bfloat16) == bf16
    assert tree_nbytes(params) == 2 * bf16  # float32 params
    kernel_bytes = q["layers_0"]["mlp"]["up_proj"]["kernel"].nbytes
    assert kernel_bytes / (2 * 128 * 256) == pytest.approx(0.25 + 4 / (2 * 128))
    # 4-bit codes + one f32 scale per 128 inputs: 4 + 32/128 bits per quantized weight.
    assert tree_bits_per_weight(q) == pytest.approx(4 + 32 / 128)
    head = params["lm_head"]["kernel"].size
    n_q = sum(x.size for x in jax.tree_util.tree_leaves(q, is_leaf=is_q) if is_q(x))
    mixed = tree_bits_per_weight(q, [LINEAR_KERNELS, r"lm_head/kernel"])
    assert mixed == pytest.approx(((4 + 32 / 128) * n_q + 32 * head) / (n_q + head))


def test_asymmetric_and_list_of_patterns():
    _, params = tiny_lm()
    where = [r".*self_attn/(q|k)_proj/kernel", r"lm_head/kernel"]
    assert len(match_paths(params, where)) == 5
    q = quantize_tree(params, rtn_recipe(bits=3, group_size=64, symmetric=False), where)
    head = q["lm_head"]["kernel"]
    assert head.zero.shape == head.scale.shape == (2, 64)
    w = params["lm_head"]["kernel"]
    assert float(jnp.max(jnp.abs(dequantize(head) - w))) <= float(jnp.max(head.scale)) / 2 + 1e-6
    assert not isinstance(q["layers_0"]["self_attn"]["v_proj"]["kernel"], QuantizedArray)


def test_unmatched_pattern_names_it_and_lists_paths():
    _, params = tiny_lm()
    with pytest.raises(ValueError, match=r"'.\*qproj/kernel'.*layers_0/"):
        quantize_tree(params, rtn_recipe(), [LINEAR_KERNELS, r".*qproj/kernel"])


def test_bad_recipe_errors_name_the_parameter():
    _, params = tiny_lm()
    with pytest.raises(ValueError, match="bits=9"):
        rtn_recipe(bits=9)
    with pytest.raises(ValueError, match=r"layers_0/.*kernel: group_size=96"):
        quantize_tree(params, rtn_recipe(bits=4, group_size=96, where=LINEAR_KERNELS))
    with pytest.raises(ValueError, match="group_rule"):
        rtn_recipe(bits=4, group_rule="nearest")
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad["layers_1"]["mlp"]["up_proj"]["kernel"] = (
        bad["layers_1"]["mlp"]["up_proj"]["kernel"].at[0, 0].set(jnp.nan)
    )
    with pytest.raises(ValueError, match="layers_1/mlp/up_proj/kernel: weights contain NaN"):
        quantize_tree(params | bad, rtn_recipe(bits=4), LINEAR_KERNELS)


def test_quantized_tree_through_jit_is_a_pytree_argument():
    model, params = tiny_lm()
    qparams = rtn_recipe(bits=4, group_size=64, where=LINEAR_KERNELS)(params)
    f = jax.jit(compressed_apply(model.forward))
    a = f(qparams, tokens(2))
    qparams2 = jax.tree_util.tree_map(lambda x: x, qparams)  # same structure, no retrace needed
    b = f(qparams2, tokens(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert f._cache_size() == 1
