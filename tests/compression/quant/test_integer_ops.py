"""I-ViT integer ops: exact integer sqrt, derived error bounds vs float, integer-only data path."""

import math

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from feynkit.compression.quant.integer_ops import (
    exp_shift,
    i_layernorm,
    i_layernorm_error_bound,
    integer_sqrt,
    shift_gelu,
    shift_gelu_error_bound,
    shiftmax,
    shiftmax_error_bound,
)


def _codes(key, shape, std, scale, mean=0.0):
    x = mean + std * jax.random.normal(key, shape)
    return np.asarray(jnp.round(x / scale), np.int32)


def _softmax64(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _float_ops_on_data(fn, *args) -> list[str]:
    """Primitives with a float output that depend (transitively) on the first argument."""
    bad = []

    def visit(jaxpr, tainted):
        tainted = set(tainted)
        for eqn in jaxpr.eqns:
            ins = [v for v in eqn.invars if not isinstance(v, jex.core.Literal)]
            if not any(v in tainted for v in ins):
                continue
            for sub in jex.core.jaxprs_in_params(eqn.params):  # conservatively: all inputs
                visit(sub, sub.invars)
            tainted.update(eqn.outvars)
            if any(jnp.issubdtype(v.aval.dtype, jnp.floating) for v in eqn.outvars):
                bad.append(eqn.primitive.name)

    closed = jax.make_jaxpr(fn)(*args)
    visit(closed.jaxpr, closed.jaxpr.invars[:1])
    return bad


def test_integer_sqrt_brute_force():
    n = np.arange(1 << 20, dtype=np.int64)  # every n < 2^20
    got = np.asarray(jax.jit(integer_sqrt)(n.astype(np.int32)))
    np.testing.assert_array_equal(got, np.floor(np.sqrt(n)).astype(np.int64))
    # every perfect square up to 2^31 and its neighbours, the int32 maximum, random large n
    k = np.arange(1, 46341, dtype=np.int64)
    edge = np.concatenate([k * k, k * k - 1, k * k + 1, [2**31 - 1, 2**31 - 2, 2**30]])
    rand = np.random.default_rng(0).integers(0, 2**31, size=100_000)
    for m in (edge, rand):
        m = m[m < 2**31]
        got = np.asarray(jax.jit(integer_sqrt)(m.astype(np.int32)))
        np.testing.assert_array_equal(got, [math.isqrt(int(v)) for v in m])
    assert int(integer_sqrt(jnp.int32(-5))) == 0
    assert integer_sqrt(jnp.arange(4, dtype=jnp.int32)).dtype == jnp.int32


def test_exp_shift_matches_exponential():
    # at s = 1/64 (x0 = −64) and n = 10 the result over |x0| 2^n is e^{k s x} (k = 1.4375/log₂e)
    # times the chord 1 + f/2 ≥ 2^f (≤ 6.15% high) and the floors (2^{±1/64}, mantissa ≥ 64/65,
    # and the final shift: relative 1/e)
    x = jnp.arange(-2000, 1, dtype=jnp.int32)
    e = np.asarray(exp_shift(x, jnp.int32(-64), jnp.int32(10)), np.float64)
    assert e[-1] == 64 * 2**10 and (np.diff(e) >= 0).all()  # e^0 ↦ |x0| 2^n, monotone
    k = 1.4375 / math.log2(math.e)
    ratio = e / (64 * 2**10) / np.exp(k * np.asarray(x) / 64)
    big = e >= 2**10
    assert ratio[big].min() > 2 ** (-1 / 64) * 64 / 65 * (1 - 2**-10)
    assert ratio.max() < 1.0615 * 2 ** (1 / 64)
    # below 2^{−18} of e^0 (x log₂e < −18·64) the value underflows to exactly zero
    assert (e[np.asarray(x) * 1.4375 < -18 * 64 - 1] == 0).all()


@pytest.mark.parametrize("scale", [1e-4, 0.02, 0.25, 1.0])
def test_shiftmax_within_derived_bound(scale):
    q = _codes(jax.random.key(0), (256, 64), 3.0, scale)
    p, out_scale = jax.jit(shiftmax)(q, scale)
    assert p.dtype == jnp.int32 and float(out_scale) == 2.0**-7
    assert int(p.min()) >= 0 and int(p.max()) <= 127
    x = q.astype(np.float64) * scale
    err = np.abs(np.asarray(p) * 2.0**-7 - _softmax64(x)).max(-1, keepdims=True)
    bound = shiftmax_error_bound(x, scale)
    assert (err <= bound).all(), float((err / bound).max())
    # the bound is informative: the chord's (√1.0615 − 1)/(√1.0615 + 1) = 0.0149 and one 7-bit
    # output code 0.0078 dominate it; measured max 0.021–0.023, mean 0.0010 at every scale
    assert bound.max() < 0.03
    assert err.max() < 0.03
    assert np.abs(np.asarray(p) * 2.0**-7 - _softmax64(x)).mean() < 0.002
    # codes floor each probability: a row sums to 2^(b−1) minus < 1 per entry
    sums = np.asarray(p).sum(-1)
    assert (sums <= 128).all() and (sums >= 128 - 64 - 1).all()


def test_shiftmax_axis_shift_invariance_and_traced_scale():
    q = _codes(jax.random.key(1), (8, 32), 2.0, 0.05)
    op = jax.jit(shiftmax, static_argnames=("out_bits", "axis"))  # the scale is traced
    p, _ = op(q, 0.05)
    np.testing.assert_array_equal(np.asarray(op(q + 1000, 0.05)[0]), np.asarray(p))
    np.testing.assert_array_equal(np.asarray(op(q.T, 0.05, axis=0)[0]).T, np.asarray(p))
    p6, s6 = op(q, 0.05, out_bits=6)
    assert float(s6) == 2.0**-5 and int(p6.max()) <= 31


@pytest.mark.parametrize("alpha", [1.702, 1.0])
@pytest.mark.parametrize("scale", [1e-4, 0.05, 0.3])
def test_shift_gelu_within_derived_bound(alpha, scale):
    q = _codes(jax.random.key(2), (64, 128), 2.0, scale)
    out, out_scale = jax.jit(shift_gelu, static_argnames="alpha")(q, scale, alpha=alpha)
    assert out.dtype == jnp.int32
    np.testing.assert_allclose(float(out_scale), scale / 128, rtol=1e-6)
    x = q.astype(np.float64) * scale
    approx = np.asarray(out) * float(out_scale)
    err = np.abs(approx - x / (1 + np.exp(-alpha * x)))
    bound = shift_gelu_error_bound(x, scale, alpha=alpha)
    assert (err <= bound).all(), float((err / np.maximum(bound, 1e-12)).max())
    # measured: ≤ 0.078 at |x| ≤ 8.5, mostly |x| / 128 from the 7-bit floored sigmoid; the
    # rest ≤ 0.015 (SiLU) / 0.009 (GELU)
    assert (err - np.abs(x) / 128).max() < 0.02
    assert (approx[q == 0] == 0).all()
    if alpha == 1.702:  # vs the exact erf GELU add the sigmoid approximation's own error
        t = np.linspace(-10, 10, 200_001)
        gelu = lambda t: 0.5 * t * (1 + erf(t / math.sqrt(2)))  # noqa: E731
        approx_err = np.abs(gelu(t) - t / (1 + np.exp(-1.702 * t))).max()
        assert 0.015 < approx_err < 0.025  # the known ≈ 0.02 gap of x σ(1.702 x)
        assert (np.abs(approx - gelu(x)) <= bound + approx_err + 1e-9).all()


@pytest.mark.parametrize("scale", [0.01, 0.05, 0.1])
def test_i_layernorm_within_derived_bound(scale):
    q = _codes(jax.random.key(3), (32, 192), 2.0, scale, mean=0.7)
    rng = np.random.default_rng(0)
    gamma = 1.0 + 0.5 * rng.normal(size=192)
    beta = 0.1 * rng.normal(size=192)
    layernorm = jax.jit(i_layernorm)
    out, out_scale = layernorm(q, scale, gamma, beta)
    assert out.dtype == jnp.int32 and out_scale.shape == ()
    x = q.astype(np.float64) * scale
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    ref = (x - mu) / np.sqrt(var + 1e-5) * gamma + beta
    err = np.abs(np.asarray(out) * float(out_scale) - ref)
    bound = i_layernorm_error_bound(x, scale, gamma)
    assert (err <= bound).all(), float((err / bound).max())
    # dominated by rounding the mean to a code: ≈ 0.5 max|γ| / σ_codes (σ_codes = 2 / s)
    assert err.max() < 0.6 * np.abs(gamma).max() * scale / 2 + 0.01
    # adding an integer to every code shifts the rounded mean by exactly that integer
    np.testing.assert_array_equal(np.asarray(layernorm(q + 37, scale, gamma, beta)[0]), out)


def test_i_layernorm_constant_rows_and_batch_shape():
    gamma, beta = np.linspace(0.5, 2.0, 16), np.linspace(-1.0, 1.0, 16)
    q = np.full((2, 3, 16), 25, np.int32)
    out, s = jax.jit(i_layernorm)(q, 0.1, gamma, beta)
    assert out.shape == (2, 3, 16)
    np.testing.assert_allclose(np.asarray(out) * float(s), np.broadcast_to(beta, (2, 3, 16)),
                               atol=float(s))  # fmt: skip
    with pytest.raises(ValueError, match="shape"):
        i_layernorm(q, 0.1, gamma[:8], beta)


@pytest.mark.parametrize(
    "fn",
    [
        lambda q: shiftmax(q, 0.05),
        lambda q: shift_gelu(q, 0.05),
        lambda q: i_layernorm(q, 0.05, np.ones(32), np.zeros(32)),
        integer_sqrt,
    ],
    ids=["shiftmax", "shift_gelu", "i_layernorm", "integer_sqrt"],
)
def test_data_path_is_integer_only(fn):
    q = jnp.zeros((4, 32), jnp.int32)
    # the check sees float ops on the data (negative control) but not on scalar constants
    assert _float_ops_on_data(lambda q: jnp.round(q * 0.5).astype(jnp.int32), q) != []
    assert _float_ops_on_data(fn, q) == []
    out = jax.jit(fn)(q)
    out = out[0] if isinstance(out, tuple) else out
    assert out.dtype == jnp.int32


def test_bad_inputs():
    with pytest.raises(ValueError, match="integer codes"):
        shiftmax(jnp.ones((2, 3)), 0.1)
    with pytest.raises(ValueError, match="out_bits"):
        shiftmax(jnp.ones((2, 3), jnp.int32), 0.1, out_bits=16)
    with pytest.raises(ValueError, match="alpha"):
        shift_gelu(jnp.ones((2, 3), jnp.int32), 0.1, alpha=-1.0)
