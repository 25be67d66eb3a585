"""SVDQuant: the low-rank split, its exactness at full rank, and W4A4 error with outliers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.compression.quant.qarray import dequantize
from feynkit.compression.quant.smoothquant import (
    activation_absmax,
    smooth_scales,
    smoothquant_apply,
    smoothquant_linear,
)
from feynkit.compression.quant.svdquant import SVDQuantLinear, svdquant_apply, svdquant_linear
from tests.compression.quant._outliers import outlier_layer, rel_err


def _outlier_layer(seed=0, n=512, d_in=128, d_out=128):
    return outlier_layer(seed, n, d_in, d_out, num_outliers=4)


def test_residual_is_the_svd_tail_of_the_smoothed_weight():
    x, w = _outlier_layer()
    am = activation_absmax(x)
    layer = svdquant_linear(w, am, rank=16, bits=8, lowrank_dtype=jnp.float32)
    lam = np.asarray(smooth_scales(am, w), np.float64)
    ws = w * lam[:, None]
    sv = np.linalg.svd(ws, compute_uv=False)
    resid = ws - np.asarray(layer.l1, np.float64) @ np.asarray(layer.l2, np.float64)
    assert np.sum(resid**2) == pytest.approx(np.sum(sv[16:] ** 2), rel=1e-3)
    # 8-bit residual: |R - Q(R)| is at most half a step of its group.
    rq = np.asarray(dequantize(layer.residual), np.float64)
    steps = np.abs(resid.reshape(2, 64, -1)).max(1, keepdims=True) / 127
    assert np.all(np.abs(rq - resid).reshape(2, 64, -1) <= steps / 2 + 1e-5)
    np.testing.assert_allclose(layer.inv_smooth, 1.0 / lam, rtol=1e-5)


def test_full_rank_branch_is_exact_without_activation_quantization():
    x, w = _outlier_layer(1, d_out=64)
    layer = svdquant_linear(
        w, activation_absmax(x), rank=64, a_bits=None, lowrank_dtype=jnp.float32
    )
    assert rel_err(x, w, svdquant_apply(layer, x)) < 1e-9


def test_w4a4_error_far_below_plain_and_smoothquant():
    x, w = _outlier_layer(2)
    am = activation_absmax(x)
    kw = dict(w_bits=4, a_bits=4, w_group_size=64, a_group_size=64)
    plain = rel_err(x, w, smoothquant_apply(smoothquant_linear(w, None, **kw), x))
    smooth = rel_err(x, w, smoothquant_apply(smoothquant_linear(w, am, **kw), x))
    errs = [rel_err(x, w, svdquant_apply(svdquant_linear(w, am, rank=r), x)) for r in (8, 32)]
    assert errs[1] < errs[0] < 0.5 * min(plain, smooth)


def test_pytree_jit_and_storage():
    x, w = _outlier_layer(3)
    layer = svdquant_linear(w, activation_absmax(x), rank=16)
    assert isinstance(layer, SVDQuantLinear) and layer.rank == 16
    assert layer.l1.dtype == jnp.bfloat16 and layer.residual.bits == 4
    out = jax.jit(svdquant_apply)(layer, jnp.asarray(x))
    np.testing.assert_allclose(out, svdquant_apply(layer, x), rtol=1e-5, atol=1e-5)
    n_leaves = len(jax.tree.leaves(layer))
    assert n_leaves == len(jax.tree.leaves(jax.tree.map(lambda a: a, layer)))
    # 4-bit residual (packed) + fp32 scales + bf16 branch + smoothing, well under bf16 weights.
    assert layer.nbytes < 0.6 * w.size * 2


def test_bad_rank():
    x, w = _outlier_layer()
    with pytest.raises(ValueError, match="rank"):
        svdquant_linear(w, None, rank=0)
