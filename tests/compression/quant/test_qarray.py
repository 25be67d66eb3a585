"""Round-to-nearest quantization and the packed QuantizedArray."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from feynkit.compression.quant import (
    QuantizedArray,
    codes_of,
    compute_qparams,
    dequantize,
    fake_quantize,
    pack_int4,
    qrange,
    quantize,
    quantize_with_params,
    unpack_int4,
)

SETTINGS = settings(deadline=None, max_examples=10, derandomize=True, database=None)


def _expand_scale(q: QuantizedArray) -> np.ndarray:
    """Scale broadcast to the weight shape (repeat each group along the axis)."""
    s = np.asarray(q.scale)
    if q.per_tensor:
        return np.broadcast_to(s, q.shape)
    return np.repeat(s, q.group_size, axis=q.axis)


@st.composite
def _layouts(draw):
    bits = draw(st.integers(2, 8))
    symmetric = draw(st.booleans())
    n_in = draw(st.sampled_from([4, 6, 12, 16]))
    n_out = draw(st.integers(1, 5))
    group = draw(st.sampled_from([None] + [g for g in (2, 3, 4, 8) if n_in % g == 0]))
    axis = draw(st.sampled_from([0, 1]))
    return bits, symmetric, n_in, n_out, group, axis


@SETTINGS
@given(_layouts(), st.integers(0, 2**31 - 1))
def test_round_trip_exact_on_grid_values(layout, seed):
    # w = s·(c − z) with s a power of two and each group reaching the ends of its code range, so
    # the recomputed scale/zero are the generating ones and the round trip is exact.
    bits, symmetric, n_in, n_out, group, axis = layout
    rng = np.random.default_rng(seed)
    g = n_in if group is None else group
    n_groups = n_in // g
    s = 2.0 ** rng.integers(-6, 4, size=(n_groups, n_out))
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        c = rng.integers(-qmax, qmax + 1, size=(n_groups, g, n_out))
        c[:, 0, :] = qmax * rng.choice([-1, 1], size=(n_groups, n_out))
        z = np.zeros((n_groups, n_out))
    else:
        qmax = 2**bits - 1
        c = rng.integers(0, qmax + 1, size=(n_groups, g, n_out))
        c[:, 0, :], c[:, -1, :] = 0, qmax
        z = rng.integers(0, qmax + 1, size=(n_groups, n_out)).astype(float)
    w = (s[:, None, :] * (c - z[:, None, :])).reshape(n_in, n_out).astype(np.float32)
    if axis == 1:
        w = w.T
    q = quantize(w, bits, group_size=group, axis=axis, symmetric=symmetric)
    np.testing.assert_array_equal(np.asarray(dequantize(q)), w)
    assert q.codes.dtype == jnp.uint8
    lo, hi = qrange(bits, symmetric)
    c_back = np.asarray(codes_of(q))
    assert lo <= c_back.min() and c_back.max() <= hi


@SETTINGS
@given(
    _layouts(),
    st.data(),
)
def test_error_at_most_half_a_step(layout, data):
    bits, symmetric, n_in, n_out, group, axis = layout
    shape = (n_in, n_out) if axis == 0 else (n_out, n_in)
    elems = st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_infinity=False)
    w = data.draw(hnp.arrays(np.float32, shape, elements=elems))
    q = quantize(w, bits, group_size=group, axis=axis, symmetric=symmetric)
    err = np.abs(np.asarray(dequantize(q), np.float64) - w)
    s = _expand_scale(q).astype(np.float64)
    assert np.all(np.isfinite(np.asarray(q.scale))) and np.all(np.asarray(q.scale) > 0)
    assert np.all(err <= s * (0.5 + 1e-5) + 1e-30)


@SETTINGS
@given(
    hnp.arrays(
        np.uint8,
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=7),
        elements=st.integers(0, 15),
    ),
    st.integers(0, 2),
)
def test_pack_unpack_int4_lossless(codes, axis):
    axis = axis % codes.ndim
    packed = pack_int4(codes, axis)
    assert packed.dtype == jnp.uint8
    assert packed.shape[axis] == (codes.shape[axis] + 1) // 2
    np.testing.assert_array_equal(np.asarray(unpack_int4(packed, codes.shape[axis], axis)), codes)


def test_pack_int4_nibble_layout():
    packed = pack_int4(np.array([1, 2, 15, 0, 7], np.uint8))
    np.testing.assert_array_equal(np.asarray(packed), [1 | 2 << 4, 15, 7])


def test_symmetric_codes_and_scale_closed_form():
    w = np.array([[-2.0, 0.5], [1.0, 0.0], [0.3, -1.5], [2.0, 0.2]], np.float32)
    q = quantize(w, 3, symmetric=True)  # per output channel: s = max|w| / 3
    np.testing.assert_allclose(np.asarray(q.scale), [[2 / 3, 0.5]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(codes_of(q)), [[-3, 1], [2, 0], [0, -3], [3, 0]])
    assert q.zero is None and qrange(3, True) == (-4, 3)


def test_asymmetric_zero_point_closed_form():
    w = np.array([[1.0], [2.0], [4.0], [3.0]], np.float32)
    q = quantize(w, 2, symmetric=False)  # range [0, 4] (0 included), s = 4/3, z = 0
    np.testing.assert_allclose(np.asarray(q.scale), [[4 / 3]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(q.zero), [[0.0]])
    np.testing.assert_array_equal(np.asarray(codes_of(q))[:, 0], [1, 2, 3, 2])
    w2 = np.array([[-1.0], [2.0]], np.float32)
    q2 = quantize(w2, 8, symmetric=False)  # s = 3/255, z = round(1/s) = 85
    np.testing.assert_allclose(np.asarray(q2.zero), [[85.0]])


def test_all_zero_group_gives_finite_scale_and_zeros():
    w = np.zeros((8, 3), np.float32)
    w[:4, 1] = [1.0, -2.0, 0.5, 0.25]
    for sym in (True, False):
        q = quantize(w, 4, group_size=4, symmetric=sym)
        assert np.all(np.isfinite(np.asarray(q.scale)))
        np.testing.assert_array_equal(np.asarray(dequantize(q))[:, [0, 2]], 0.0)
        np.testing.assert_array_equal(np.asarray(dequantize(q))[4:], 0.0)


def test_per_tensor_scale():
    w = np.array([[1.0, -4.0], [2.0, 0.5]], np.float32)
    q = quantize(w, 4, per_tensor=True)
    assert q.scale.shape == (1, 1) and q.per_tensor
    np.testing.assert_allclose(float(q.scale[0, 0]), 4 / 7, rtol=1e-6)
    assert np.max(np.abs(np.asarray(dequantize(q)) - w)) <= 2 / 7 + 1e-6


def test_layout_shapes_and_nbytes():
    w = jax.random.normal(jax.random.key(0), (64, 10))
    q4 = quantize(w, 4, group_size=16, symmetric=False)
    assert q4.codes.shape == (32, 10) and q4.scale.shape == (4, 10) and q4.zero.shape == (4, 10)
    assert q4.nbytes == 32 * 10 + 2 * 4 * 10 * 4
    q8 = quantize(w, 8, axis=1)
    assert q8.codes.shape == (64, 10) and q8.scale.shape == (64, 1)
    assert q8.nbytes == 640 + 64 * 4
    w3 = jax.random.normal(jax.random.key(1), (2, 12, 3))
    q3 = quantize(w3, 3, group_size=4, axis=1)
    assert q3.codes.shape == (2, 6, 3) and q3.scale.shape == (2, 3, 3)
    assert np.max(np.abs(np.asarray(dequantize(q3) - w3))) <= float(jnp.max(q3.scale)) / 2 + 1e-6


def test_dtype_preserved_bf16():
    w = jax.random.normal(jax.random.key(0), (32, 8)).astype(jnp.bfloat16)
    q = quantize(w, 8, group_size=8)
    assert q.scale.dtype == jnp.float32 and dequantize(q).dtype == jnp.bfloat16
    assert fake_quantize(w, 8, group_size=8).dtype == jnp.bfloat16


def test_quantize_with_params_matches_quantize():
    w = jax.random.normal(jax.random.key(2), (24, 5))
    for sym in (True, False):
        q = quantize(w, 3, group_size=6, symmetric=sym)
        scale, zero = compute_qparams(w, 3, group_size=6, symmetric=sym)
        q2 = quantize_with_params(w, scale, zero, 3)
        assert q2.group_size == 6 and q2.symmetric == sym
        np.testing.assert_array_equal(np.asarray(q2.codes), np.asarray(q.codes))
    # external scales: codes are clipped to the signed range
    q3 = quantize_with_params(w, jnp.full((1, 5), 0.01), None, 4)
    assert set(np.unique(np.asarray(codes_of(q3)))) <= set(range(-8, 8))
    with pytest.raises(ValueError, match="scale shape"):
        quantize_with_params(w, jnp.ones((5, 5)), None, 4)


def test_fake_quantize_matches_and_is_straight_through_and_jits():
    w = jax.random.normal(jax.random.key(3), (32, 6))
    fq = jax.jit(lambda w: fake_quantize(w, 4, group_size=8, symmetric=False))
    q = quantize(w, 4, group_size=8, symmetric=False)
    np.testing.assert_array_equal(np.asarray(fq(w)), np.asarray(dequantize(q)))
    g = jax.grad(lambda w: jnp.sum(fake_quantize(w, 4) * 3.0))(w)
    np.testing.assert_allclose(np.asarray(g), 3.0)
    g0 = jax.grad(lambda w: jnp.sum(fake_quantize(w, 4, straight_through=False)))(w)
    # without STE the rounding blocks the identity path; only the scale (max) path remains
    assert np.all(np.isfinite(np.asarray(g0))) and np.mean(np.asarray(g0) == 0) > 0.5


def test_quantize_under_jit_and_pytree():
    w = jax.random.normal(jax.random.key(4), (16, 4))
    q = jax.jit(lambda w: quantize(w, 4, group_size=8))(w)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 2  # codes, scale (zero None)
    q_back = jax.tree_util.tree_unflatten(treedef, leaves)
    np.testing.assert_array_equal(np.asarray(dequantize(q_back)), np.asarray(dequantize(q)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(bits=1), "bits"),
        (dict(bits=9), "bits"),
        (dict(bits=4, group_size=5), "group_size"),
        (dict(bits=4, group_size=0), "group_size"),
        (dict(bits=4, axis=2), "axis"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    w = np.ones((16, 4), np.float32)
    with pytest.raises(ValueError, match=match):
        quantize(w, **kwargs)


def test_non_finite_weights_raise():
    w = np.ones((8, 2), np.float32)
    w[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(w, 4)
    w[3, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(w, 4)
