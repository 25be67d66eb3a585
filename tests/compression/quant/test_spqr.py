"""SpQR: near-exactness at high bits, the bit count, bilevel statistics, outliers vs GPTQ."""

import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.compression.quant.gptq import gptq_quantize
from feynkit.compression.quant.qarray import dequantize
from feynkit.compression.quant.spqr import (
    SpQRArray,
    spqr_bits_per_weight,
    spqr_dequantize,
    spqr_quantize,
)

D_IN, D_OUT, N = 72, 32, 512  # 72 = 4.5 groups of 16: exercises the ragged last group


def _layer(seed=0, outliers=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(N, D_IN)) * np.exp(0.7 * rng.normal(size=D_IN))[None]).astype(np.float32)
    w = (rng.normal(size=(D_IN, D_OUT)) / np.sqrt(D_IN)).astype(np.float32)
    if outliers:  # a few isolated large weights, as SpQR finds in LLMs
        idx = rng.choice(D_IN * D_OUT, outliers, replace=False)
        w.reshape(-1)[idx] = 8.0 * np.sign(rng.normal(size=outliers)) / np.sqrt(D_IN)
    return w, (2.0 / N * x.T @ x).astype(np.float32)


def _proxy(w, wh, H):
    d = np.asarray(w, np.float64) - np.asarray(wh, np.float64)
    return float(np.trace(d.T @ H @ d) / np.trace(w.T @ H @ w))


@pytest.mark.slow  # a separate compilation (bits are static)
def test_eight_bits_without_outliers_is_nearly_exact_and_bits_follow_the_formula():
    w, H = _layer()
    q = spqr_quantize(w, H, 8, qq_bits=8, outlier_threshold=float("inf"))
    assert isinstance(q, SpQRArray) and q.outlier_values.size == 0
    assert spqr_dequantize(q).shape == (D_IN, D_OUT)
    assert _proxy(w, spqr_dequantize(q), H) < 1e-4
    groups = -(-D_IN // 16)
    expect = 8 + 8 * 2 * groups * D_OUT / w.size + 16 * 2 * groups * 2 * 2 / w.size
    assert spqr_bits_per_weight(q) == pytest.approx(expect)


def test_three_bit_statistics_and_the_reference_bit_formula():
    w, H = _layer(1)
    q = spqr_quantize(w, H, 3, outlier_threshold=float("inf"), act_order=False)
    assert int(jnp.max(q.stat_codes)) <= 7 and int(jnp.max(q.codes)) <= 7
    assert q.stat_codes.shape == (5, 2, D_OUT) and q.stat_params.shape == (5, 2, 2, 2)
    assert q.stat_params.dtype == jnp.float16
    np.testing.assert_array_equal(q.perm, np.arange(D_IN))
    # Whole groups give the reference 3 + (3 + 3)/16 + 2·32/256 = 3.625 bits; the half group
    # of 8 rows is charged in full.
    assert spqr_bits_per_weight(q) == pytest.approx(3.625 * 80 / 72 - 3 * 8 / 72)


def test_outliers_are_kept_exactly_and_beat_gptq_at_small_groups():
    w, H = _layer(2, outliers=12)
    q = spqr_quantize(w, H, 3, outlier_threshold=0.2)
    wh = np.asarray(spqr_dequantize(q))
    n_out = q.outlier_values.size
    assert 1 <= n_out < 0.05 * w.size
    # Outlier positions hold fp16 values of the (OBS-updated) weights, so close to the originals.
    rows, cols = np.asarray(q.outlier_rows), np.asarray(q.outlier_cols)
    np.testing.assert_allclose(wh[rows, cols], np.asarray(q.outlier_values, np.float32))
    gptq = gptq_quantize(w, H, 3, group_size=8, symmetric=False)
    no_out = spqr_quantize(w, H, 3, outlier_threshold=float("inf"))
    e_spqr, e_none = _proxy(w, wh, H), _proxy(w, spqr_dequantize(no_out), H)
    assert e_spqr < e_none
    # GPTQ with groups of 8 and fp16 scale + 3-bit zero costs 3 + 19/8 = 5.4 bits, more than SpQR.
    assert spqr_bits_per_weight(q) < 5.0 and e_spqr < _proxy(w, dequantize(gptq), H)


def test_bad_inputs():
    w, H = _layer()
    with pytest.raises(ValueError, match="H must be"):
        spqr_quantize(w, H[:4, :4])
    with pytest.raises(ValueError, match="bits"):
        spqr_quantize(w, H, 1)
    with pytest.raises(ValueError, match="outlier_threshold"):
        spqr_quantize(w, H, outlier_threshold=0.0)
