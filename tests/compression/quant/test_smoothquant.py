"""SmoothQuant: the smoothing factors, exact equivalence, and W8A8/W4A4 error with outliers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.compression.quant.smoothquant import (
    SmoothQuantLinear,
    activation_absmax,
    quantize_activations,
    smooth_scales,
    smoothquant_apply,
    smoothquant_linear,
)
from tests.compression.quant._outliers import outlier_layer, rel_err


def _rel_err(x, w, layer):
    return rel_err(x, w, smoothquant_apply(layer, x))


def test_smooth_scales_formula_and_shared_inputs():
    x, w = outlier_layer()
    am = np.abs(x).max(0)
    np.testing.assert_allclose(activation_absmax(x), am, rtol=1e-6)
    s = smooth_scales(am, w, alpha=0.5)
    np.testing.assert_allclose(s, np.sqrt(am) / np.sqrt(np.abs(w).max(1)), rtol=1e-5)
    s8 = smooth_scales(am, w, alpha=0.8)
    np.testing.assert_allclose(s8, am**0.8 / np.abs(w).max(1) ** 0.2, rtol=1e-5)
    w2 = 3.0 * w[:, :5]
    shared = smooth_scales(am, [w, w2], alpha=0.5)
    wmax = np.maximum(np.abs(w).max(1), np.abs(w2).max(1))
    np.testing.assert_allclose(shared, np.sqrt(am / wmax), rtol=1e-5)
    # After smoothing at alpha = 0.5 both sides have equal per-channel maxima.
    np.testing.assert_allclose(am / s, np.abs(w * np.asarray(s)[:, None]).max(1), rtol=1e-5)


def test_smoothing_is_exact_before_quantization():
    x, w = outlier_layer(1)
    s = np.asarray(smooth_scales(activation_absmax(x), w), np.float64)
    np.testing.assert_allclose((x / s) @ (w * s[:, None]), x @ w, rtol=1e-4, atol=1e-3)


def test_per_token_activation_error_is_at_most_half_a_step():
    x, _ = outlier_layer(2)
    for bits, gs in ((8, None), (4, None), (4, 16)):
        xq = np.asarray(quantize_activations(x, bits, gs))
        groups = x.reshape(x.shape[0], -1, gs or x.shape[1])
        step = np.abs(groups).max(-1, keepdims=True) / (2 ** (bits - 1) - 1)
        err = np.abs(xq.reshape(groups.shape) - groups)
        assert np.all(err <= step / 2 + 1e-6 * step)


@pytest.mark.parametrize("bits,gs", [(8, None), (4, 16)])
def test_smoothing_beats_plain_rtn_with_activation_outliers(bits, gs):
    x, w = outlier_layer(3)
    kw = dict(w_bits=bits, a_bits=bits, w_group_size=gs, a_group_size=gs)
    plain = _rel_err(x, w, smoothquant_linear(w, None, **kw))
    smooth = _rel_err(x, w, smoothquant_linear(w, activation_absmax(x), **kw))
    # The outlier channels set the per-token activation scale; smoothing shrinks them ~sqrt(30)x.
    assert smooth < 0.5 * plain


def test_weight_only_and_jit():
    x, w = outlier_layer(4)
    layer = smoothquant_linear(w, activation_absmax(x), w_bits=8, a_bits=None)
    assert isinstance(layer, SmoothQuantLinear) and layer.a_bits is None
    assert _rel_err(x, w, layer) < 1e-4
    layer8 = smoothquant_linear(w, activation_absmax(x))
    out = jax.jit(smoothquant_apply)(layer8, jnp.asarray(x))
    np.testing.assert_allclose(out, smoothquant_apply(layer8, x), rtol=1e-6, atol=1e-6)
    assert out.shape == (x.shape[0], w.shape[1]) and out.dtype == jnp.float32


def test_bad_inputs():
    x, w = outlier_layer()
    with pytest.raises(ValueError, match="alpha"):
        smooth_scales(activation_absmax(x), w, alpha=1.5)
    with pytest.raises(ValueError, match="d_in"):
        smooth_scales(activation_absmax(x), w.T, alpha=0.5)
