"""compressed_apply and calibrate on the models' own apply: the digits UNet (Dense + Conv), the
ScoreMLP (Dense) — the TransformerLM is covered in test_tree / test_calibration."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.compression.quant import (
    ALL_KERNELS,
    QuantizedArray,
    ReshapedKernel,
    SVDQuantLinear,
    calibrate,
    collect_inputs,
    compressed_apply,
    conv_patches,
    dequantize_tree,
    gptq_recipe,
    is_compressed,
    match_paths,
    quantize_tree,
    rtn_recipe,
    smoothquant_recipe,
    svdquant_recipe,
    tree_bits_per_weight,
)
from feynkit.models.score_mlp import ScoreMLP
from feynkit.models.unet import UNet

# A Dense (the block's scale-shift), two 3×3 convs and the stride-2 downsample conv.
SUBSET = [r"down_0/.*kernel", r"downsample/kernel"]


def random_params(init_fn, seed: int = 0):
    """Random parameters of the shapes ``init_fn(key)`` returns: N(0, 1/fan_in) kernels and
    embeddings, N(0, 0.1²) biases, unit norm scales (Flax's own initialisers take ~30 s to
    compile for the UNet on a loaded 2-core CPU; the shapes come from them all the same)."""
    rng = np.random.default_rng(seed)

    def fill(path, a):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.ones(a.shape, a.dtype)
        std = 0.1 if "bias" in name else 1 / np.sqrt(np.prod(a.shape[:-1]))
        return jnp.asarray(std * rng.normal(size=a.shape), a.dtype)

    return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(init_fn, jax.random.key(0)))


@functools.cache
def small_unet():
    model = UNet(channels=8, num_classes=3, time_features=8)
    return model, random_params(model.init_params)


def noised_inputs(seed: int, n: int):
    """(x_t, t, label): images in [−1, 1] noised to a random t (VP), random labels incl. null."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    x0 = jax.random.uniform(k1, (n, 8, 8, 1), minval=-1.0, maxval=1.0)
    t = jax.random.uniform(k2, (n,), minval=0.05, maxval=1.0)
    a = jnp.sqrt(1 - t)[:, None, None, None]
    s = jnp.sqrt(t)[:, None, None, None]
    return a * x0 + s * jax.random.normal(k3, x0.shape), t, jax.random.randint(k4, (n,), 0, 4)


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_conv_patches_reproduce_the_unet_convolutions():
    # patches(x) @ kernel.reshape(-1, c_out) + bias equals every Conv's own output (SAME
    # padding, stride 1 and 2, 1×1), inside the model's own forward pass.
    model, params = small_unet()
    batches = {}

    @jax.jit
    def gaps(params, x, t, y):
        found = {}

        def grab(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            m = context.module
            if isinstance(m, nn.Conv) and context.method_name == "__call__":
                p, batches["/".join(m.path)] = conv_patches(m, args[0])
                w, b = m.get_variable("params", "kernel"), m.get_variable("params", "bias")
                y_hat = p @ w.reshape(-1, w.shape[-1]) + b[None, None, None, :]
                found["/".join(m.path)] = jnp.max(jnp.abs(y_hat - out))
            return out

        with nn.intercept_methods(grab):
            model.forward(params, x, t, y)
        return found

    found = gaps(params, *noised_inputs(0, 3))
    assert "downsample" in found and "up_0/skip" in found and len(found) == 13
    assert all(float(v) < 2e-5 for v in found.values()), found
    assert all(b == (3,) for b in batches.values())


def test_calibrate_conv_and_dense_hessians_are_two_over_n_xxt():
    model, params = small_unet()
    data = noised_inputs(1, 6)
    where = [r"downsample/kernel", r"down_0/Dense_0/kernel"]
    calib = calibrate(model.forward, params, data, where, batch_size=4)  # batches of 4 and 2
    rows = collect_inputs(model.forward, params, data, where, batch_size=4)
    assert calib.num_samples == 6 and sorted(calib.hessians) == sorted(rows)
    assert rows["downsample/kernel"].shape == (6 * 4 * 4, 3 * 3 * 8)  # stride 2: 4×4 outputs
    assert rows["down_0/Dense_0/kernel"].shape == (6, 32)
    for path, X in rows.items():
        X = np.asarray(X, np.float64)
        H = np.asarray(calib.hessians[path])
        np.testing.assert_allclose(H, 2.0 / 6 * X.T @ X, rtol=2e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(calib.absmax[path]), np.abs(X).max(0), rtol=1e-6)


def test_unet_subset_rtn_gptq_svdquant_through_its_own_apply():
    # Dense and Conv kernels (incl. the stride-2 one) compressed by three methods run through
    # UNet.forward via compressed_apply; each stays close to the float model (measured relative
    # ε error, per-channel W4: RTN 0.165, GPTQ 0.116; SVDQuant W4A4 rank 4: 0.114) and
    # GPTQ ≤ RTN on held-out samples of the calibration distribution.
    model, params = small_unet()
    cal, test = noised_inputs(2, 32), noised_inputs(3, 16)
    ref = jax.jit(model.forward)(params, *test)
    calib = calibrate(model.forward, params, cal, SUBSET, batch_size=16)
    f = jax.jit(compressed_apply(model.forward))
    errors = {}
    recipes = {
        "rtn": rtn_recipe(4, where=SUBSET),
        "gptq": gptq_recipe(4, where=SUBSET),
        "svdquant": svdquant_recipe(
            rank=4, group_size=8, a_group_size=8, group_rule="divisor", where=SUBSET
        ),
    }
    for name, recipe in recipes.items():
        q = recipe(params, calib)
        assert isinstance(q["downsample"]["kernel"], ReshapedKernel)
        assert q["down_0"]["Dense_0"]["bias"] is params["down_0"]["Dense_0"]["bias"]
        errors[name] = _rel(f(q, *test), ref)
    assert 1e-3 < errors["rtn"] < 0.3, errors
    assert 1e-3 < errors["svdquant"] < 0.3, errors
    assert errors["gptq"] <= errors["rtn"], errors


def test_weight_only_apply_equals_the_dequantized_float_model():
    model, params = small_unet()
    x, t, y = noised_inputs(4, 4)
    q = rtn_recipe(4, group_size=8, group_rule="divisor")(params)  # every kernel, incl. convs
    assert isinstance(q["conv_in"]["kernel"], ReshapedKernel)  # (3, 3, 1, 8) as (9, 8)
    assert isinstance(q["embed"]["time_in"]["kernel"], QuantizedArray)
    out = jax.jit(compressed_apply(model.forward))(q, x, t, y)
    float_model = jax.jit(lambda q, *a: model.forward(dequantize_tree(q), *a))
    np.testing.assert_allclose(np.asarray(out), np.asarray(float_model(q, x, t, y)), atol=1e-5)
    plain = jax.jit(compressed_apply(model.forward, intercept=False))(q, x, t, y)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(out), atol=1e-5)
    bits = values = 0
    for path in match_paths(params, ALL_KERNELS):
        node = params
        for k in path.split("/"):
            node = node[k]
        d_in, d_out = int(np.prod(node.shape[:-1])), node.shape[-1]
        g = max(g for g in range(1, 9) if d_in % g == 0)  # the "divisor" rule
        bits += d_in * d_out * 4 + (d_in // g) * d_out * 32
        values += d_in * d_out
    assert tree_bits_per_weight(q) == pytest.approx(bits / values)


def test_conv_interception_serves_activation_quantizers():
    # With float activations (a_bits=None) the im2col matmul of every Conv equals the model
    # run on the dequantized kernels; with 4-bit activations the output moves (the
    # activations were rounded inside the Convs and Denses).
    model, params = small_unet()
    x, t, y = noised_inputs(5, 4)
    kw = dict(rank=2, group_size=8, a_group_size=8, group_rule="divisor", smooth=False)
    where = SUBSET + [r"mid/conv_in/kernel", r"up_0/skip/kernel"]  # 3×3, stride 2, 1×1
    q_wa = svdquant_recipe(a_bits=4, where=where, **kw)(params)

    def float_activations(leaf):
        if isinstance(leaf, ReshapedKernel):
            return leaf.replace(inner=leaf.inner.replace(a_bits=None))
        return leaf.replace(a_bits=None) if isinstance(leaf, SVDQuantLinear) else leaf

    q_w = jax.tree_util.tree_map(float_activations, q_wa, is_leaf=is_compressed)
    assert isinstance(q_wa["mid"]["conv_in"]["kernel"].inner, SVDQuantLinear)
    f = jax.jit(compressed_apply(model.forward))
    out_w = f(q_w, x, t, y)
    float_model = jax.jit(lambda q, *a: model.forward(dequantize_tree(q), *a))
    np.testing.assert_allclose(np.asarray(out_w), np.asarray(float_model(q_w, x, t, y)), atol=2e-5)
    assert _rel(f(q_wa, x, t, y), out_w) > 1e-3
    with pytest.raises(ValueError, match="intercept=True"):
        jax.jit(compressed_apply(model.forward, intercept=False))(q_wa, x, t, y)


def test_score_mlp_smoothquant_w8a8_through_its_apply():
    model = ScoreMLP(hidden=32, num_layers=2, num_classes=2, time_features=8)
    params = random_params(functools.partial(model.init_params, dim=2), seed=1)
    x = jax.random.normal(jax.random.key(2), (64, 2))
    t = jax.random.uniform(jax.random.key(3), (64,))
    calib = calibrate(model.forward, params, (x, t))
    q = smoothquant_recipe()(params, calib)
    ref = jax.jit(model.forward)(params, x, t)
    out = jax.jit(compressed_apply(model.forward))(q, x, t)
    assert 1e-5 < _rel(out, ref) < 2e-2  # measured 4e-3


def test_activation_quantizer_outside_dense_or_conv_is_an_error():
    model, params = small_unet()
    x, t, y = noised_inputs(6, 2)
    q = svdquant_recipe(rank=2, group_size=8, a_group_size=8, smooth=False, where=SUBSET)(params)
    # An apply_fn that renames the tree: the kernels no longer sit at their module paths.
    wrapped = {"inner": q}
    renamed = compressed_apply(lambda p, *a: model.forward(dequantize_tree(p["inner"]), *a))
    with pytest.raises(ValueError, match="quantize activations but no nn.Dense"):
        jax.jit(renamed)(wrapped, x, t, y)  # raised while tracing


def test_recipe_bad_input_errors():
    model, params = small_unet()
    with pytest.raises(ValueError, match="bits=1"):
        rtn_recipe(bits=1)
    with pytest.raises(ValueError, match="group_size=0"):
        gptq_recipe(group_size=0)
    with pytest.raises(ValueError, match=r"'nothing/kernel' matches no parameter path"):
        rtn_recipe(where=r"nothing/kernel")(params)
    with pytest.raises(
        ValueError, match=r"conv_in/kernel: group_size=8 must be a positive divisor"
    ):
        rtn_recipe(group_size=8, where=r"conv_in/kernel")(params)  # d_in = 3·3·1 = 9
    with pytest.raises(ValueError, match="needs calibration"):
        gptq_recipe(where=SUBSET)(params)
    with pytest.raises(ValueError, match="not a kernel"):
        rtn_recipe(where=r".*/bias")(params)
    q = rtn_recipe(where=r"downsample/kernel")(params)
    with pytest.raises(ValueError, match="downsample/kernel: already compressed"):
        rtn_recipe(where=ALL_KERNELS)(q)
    calib = calibrate(model.forward, params, noised_inputs(7, 4), r"downsample/kernel")
    with pytest.raises(ValueError, match="no calibration hessian for down_0/"):
        gptq_recipe(where=SUBSET)(params, calib)
    with pytest.raises(ValueError, match="QuantRecipe"):
        quantize_tree(params, lambda p: p)
    with pytest.raises(ValueError, match="not kernels of modules"):
        calibrate(model.forward, params, noised_inputs(7, 2), r"norm_out/scale")
    with pytest.raises(ValueError, match="leading sample axis"):
        calibrate(model.forward, params, (jnp.zeros((2, 8, 8, 1)), jnp.zeros((3,))), SUBSET)


@pytest.mark.slow
def test_unet_every_kernel_rtn_gptq_svdquant():
    # All 19 kernels of the UNet (convs as im2col matrices). Measured relative ε error on
    # held-out noised inputs: RTN-W4 (groups ≤ 16) 0.246, GPTQ-W4 0.204, SVDQuant W4A4 (rank
    # 4) 0.208; storage 6.1 bits per weight for W4 (f32 scales of small groups), 14.1 for
    # SVDQuant (the bf16 branch is large next to these tiny kernels).
    model, params = small_unet()
    cal, test = noised_inputs(8, 32), noised_inputs(9, 32)
    ref = jax.jit(model.forward)(params, *test)
    calib = calibrate(model.forward, params, cal, batch_size=16)
    f = jax.jit(compressed_apply(model.forward))
    g = dict(group_size=16, group_rule="divisor")
    err = {
        "rtn": _rel(f(rtn_recipe(4, **g)(params), *test), ref),
        "gptq": _rel(f(gptq_recipe(4, **g)(params, calib), *test), ref),
        "svdquant": _rel(
            f(svdquant_recipe(rank=4, a_group_size=16, **g)(params, calib), *test), ref
        ),
    }
    assert err["gptq"] <= err["rtn"] < 0.3 and err["svdquant"] < 0.3, err


def test_compressed_unet_samples_through_diffusion_sample_with_cfg():
    # The compressed model is an ordinary model_fn of the one sampler loop: DDPM ancestral steps
    # with CFG (w = 2) on the UNet, same key for every run. Measured relative distance of the
    # final samples to the float model's: RTN-W8 0.010, RTN-W4 (groups ≤ 8) 0.106.
    from feynkit.core.schedules import LinearSchedule
    from feynkit.inference import diffusion

    model, params = small_unet()
    y = jnp.arange(4) % 3
    x_init = jax.random.normal(jax.random.key(10), (4, 8, 8, 1))
    schedule = LinearSchedule()
    forward = compressed_apply(model.forward)

    @jax.jit
    def sample(p):
        def model_fn(x, t, label=None):
            return forward(p, x, t, label)

        x, _ = diffusion.sample(
            jax.random.key(11),
            diffusion.ddpm(schedule),
            model_fn,
            x_init,
            diffusion.time_grid(8),
            guidance=diffusion.cfg(2.0),
            cond={"label": y},
            uncond={"label": jnp.full_like(y, 3)},
        )
        return x

    ref = sample(params)
    assert bool(jnp.all(jnp.isfinite(ref)))
    e8 = _rel(sample(rtn_recipe(8)(params)), ref)
    e4 = _rel(sample(rtn_recipe(4, group_size=8, group_rule="divisor")(params)), ref)
    assert 1e-5 < e8 < e4 < 0.3, (e8, e4)


def test_calibrate_runs_a_partly_compressed_model():
    # Layer-sequential schemes calibrate later kernels on the model whose earlier kernels are
    # already compressed: the captured inputs are those of the compressed model.
    model, params = small_unet()
    data = noised_inputs(12, 8)
    where = r"down_1/conv_in/kernel"
    q = rtn_recipe(2, where=r"downsample/kernel")(params)
    h_float = calibrate(model.forward, params, data, where).hessians[where]
    h_q = calibrate(model.forward, q, data, where).hessians[where]
    rows = collect_inputs(compressed_apply(model.forward), q, data, where)[where]
    np.testing.assert_allclose(
        np.asarray(h_q), 2.0 / 8 * np.asarray(rows, np.float64).T @ rows, rtol=2e-5, atol=1e-5
    )
    assert _rel(h_q, h_float) > 1e-3
