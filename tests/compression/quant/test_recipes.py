"""Every recipe factory on a small parameter tree: containers, storage, the error each method
minimises, calibration plumbing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.compression.quant import (
    RECIPES,
    Calibration,
    DFloat11Array,
    LowRankCompensated,
    QuantizedArray,
    ReshapedKernel,
    SmoothQuantLinear,
    SpQRArray,
    VQArray,
    dfloat11_recipe,
    eora_recipe,
    gptq_recipe,
    quantize_tree,
    rtn_recipe,
    smoothquant_recipe,
    spqr_recipe,
    tree_bits_per_weight,
    vptq_recipe,
)

D_IN, D_OUT = 32, 16


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    # Correlated inputs with a few loud channels: the Hessian is far from isotropic.
    mix = rng.normal(size=(D_IN, D_IN)) / np.sqrt(D_IN) + np.eye(D_IN)
    X = rng.normal(size=(256, D_IN)) @ mix
    X[:, :3] *= 8.0
    H = jnp.asarray(2.0 / 256 * X.T @ X, jnp.float32)
    w = jnp.asarray(rng.normal(size=(D_IN, D_OUT)) / np.sqrt(D_IN), jnp.float32)
    conv = jnp.asarray(rng.normal(size=(2, 2, 8, D_OUT)) / np.sqrt(D_IN), jnp.float32)
    params = {"dense": {"kernel": w, "bias": jnp.zeros(D_OUT)}, "conv": {"kernel": conv}}
    calib = Calibration(
        hessians={"dense/kernel": H, "conv/kernel": H},
        absmax={"dense/kernel": jnp.max(jnp.abs(X), 0), "conv/kernel": jnp.max(jnp.abs(X), 0)},
        num_samples=256,
    )
    return params, calib, np.asarray(H, np.float64)


def _out_err(w, w_hat, H):
    d = np.asarray(w, np.float64).reshape(D_IN, -1) - np.asarray(w_hat, np.float64).reshape(
        D_IN, -1
    )
    return float(np.sum(d * (H @ d)))


@pytest.mark.parametrize(
    "recipe, kind",
    [
        (rtn_recipe(3, group_size=8), QuantizedArray),
        (gptq_recipe(3, group_size=8), QuantizedArray),
        (spqr_recipe(3, group_size=8, qq_group_size=8), SpQRArray),
        (vptq_recipe(num_centroids=16, kmeans_iters=5), VQArray),
        (smoothquant_recipe(w_bits=4, a_bits=8), SmoothQuantLinear),
        (dfloat11_recipe(), DFloat11Array),
        (eora_recipe(rtn_recipe(3), rank=2), LowRankCompensated),
    ],
    ids=lambda r: getattr(r, "name", None) or r.__name__,
)
def test_every_recipe_builds_its_container_for_dense_and_conv(setup, recipe, kind):
    params, calib, _ = setup
    q = recipe(params, calib if recipe.needs_calibration else None)
    dense, conv = q["dense"]["kernel"], q["conv"]["kernel"]
    assert isinstance(dense, kind) and q["dense"]["bias"] is params["dense"]["bias"]
    if kind is DFloat11Array:  # any shape as is, float32 back out
        assert isinstance(conv, DFloat11Array) and conv.shape == (2, 2, 8, D_OUT)
    else:  # a conv kernel is compressed as its (kh·kw·c_in, c_out) matrix
        assert isinstance(conv, ReshapedKernel) and isinstance(conv.inner, kind)
    for c, w in ((dense, params["dense"]["kernel"]), (conv, params["conv"]["kernel"])):
        assert c.shape == w.shape and c.dequantize().dtype == jnp.float32
    bits = tree_bits_per_weight(q)
    assert 1 < bits < (17 if kind is DFloat11Array else 12), bits


def test_gptq_spqr_vptq_eora_lower_the_output_error_of_rtn(setup):
    # tr(ΔWᵀ H ΔW) is what the Hessian methods minimise (held by the calibration H).
    params, calib, H = setup
    w = params["dense"]["kernel"]

    def err(recipe):
        return _out_err(w, recipe(params, calib)["dense"]["kernel"].dequantize(), H)

    rtn = err(rtn_recipe(3, group_size=8))
    assert err(gptq_recipe(3, group_size=8)) < 0.8 * rtn
    assert err(eora_recipe(rtn_recipe(3, group_size=8), rank=4)) < err(
        eora_recipe(rtn_recipe(3, group_size=8), rank=4, method="svd")
    )
    assert err(eora_recipe(rtn_recipe(3, group_size=8), rank=4)) < 0.7 * rtn


def test_vptq_recipe_is_deterministic_in_its_seed(setup):
    params, calib, _ = setup
    a = vptq_recipe(num_centroids=16, kmeans_iters=5, seed=1, where="dense/kernel")
    q1, q2 = a(params, calib), a(params, calib)
    np.testing.assert_array_equal(
        np.asarray(q1["dense"]["kernel"].indices), np.asarray(q2["dense"]["kernel"].indices)
    )


def test_dfloat11_recipe_stores_bf16_exactly(setup):
    params, _, _ = setup
    q = dfloat11_recipe()(params)
    w = params["dense"]["kernel"]
    np.testing.assert_array_equal(
        np.asarray(q["dense"]["kernel"].dequantize()),
        np.asarray(w.astype(jnp.bfloat16).astype(jnp.float32)),
    )
    assert q["dense"]["bias"].dtype == jnp.float32  # outside `where`
    q_all = dfloat11_recipe(where=[r".*kernel", r"dense/bias"])(params)
    assert isinstance(q_all["dense"]["bias"], DFloat11Array)


def test_names_needs_and_registry():
    assert set(RECIPES) == {
        "rtn", "gptq", "spqr", "vptq", "smoothquant", "svdquant", "dfloat11"
    }  # fmt: skip
    assert not rtn_recipe().needs_calibration and gptq_recipe().needs_calibration
    assert rtn_recipe(eora_rank=4).needs_calibration
    assert not vptq_recipe(hessian_weighted=False, use_obs=False).needs_calibration
    assert not smoothquant_recipe(smooth=False).needs_calibration
    assert gptq_recipe(4, group_size=32).name == "gptq4_g32"
    assert rtn_recipe(where=None).where == rtn_recipe().where


def test_where_override_and_calibration_errors(setup):
    params, calib, _ = setup
    q = quantize_tree(params, rtn_recipe(4), r"dense/kernel")
    assert isinstance(q["dense"]["kernel"], QuantizedArray)
    assert not isinstance(q["conv"]["kernel"], ReshapedKernel)
    with pytest.raises(ValueError, match="no calibration absmax for (conv|dense)/kernel"):
        smoothquant_recipe()(params, Calibration(calib.hessians, {}, 1))
    with pytest.raises(ValueError, match="Hessian .* does not fit"):
        gptq_recipe()(params, {"dense/kernel": jnp.eye(4), "conv/kernel": jnp.eye(4)})
    with pytest.raises(ValueError, match="calibration must be a Calibration"):
        gptq_recipe()(params, [1, 2])
    with pytest.raises(ValueError, match="method='x'"):
        eora_recipe(rtn_recipe(), method="x")
    with pytest.raises(ValueError, match="a_bits=12"):
        smoothquant_recipe(a_bits=12)
    with pytest.raises(ValueError, match="dense/bias: shape"):
        rtn_recipe(where="dense/bias")(params)


def test_recipe_output_is_a_jit_argument(setup):
    params, calib, _ = setup
    q = gptq_recipe(4, where="dense/kernel")(params, calib)
    x = jax.random.normal(jax.random.key(0), (3, D_IN))
    f = jax.jit(lambda p, x: p["dense"]["kernel"].matmul(x))
    np.testing.assert_allclose(
        np.asarray(f(q, x)), np.asarray(x @ q["dense"]["kernel"].dequantize()), atol=1e-5
    )
