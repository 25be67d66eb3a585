"""Pallas kernels against their pure-JAX references (interpret mode on CPU, compiled on a GPU).

Each case draws fresh random inputs (its own key), includes sizes that are not multiples of the
blocks, and checks ‖out − ref‖ / ‖ref‖ against a tolerance keyed by the compute dtype, plus the
reference itself against a float64 NumPy product; DFloat11 decoding must be bit-exact.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from feynkit.compression.kernels import (
    QMatmulBlocks,
    dfloat11_decode,
    quantize_per_channel,
    quantize_per_token,
    svdquant_fused_matmul,
    w8a8_matmul,
    weight_only_matmul,
)
from feynkit.compression.quant.dfloat11 import dfloat11_compress, dfloat11_decompress_numpy
from feynkit.compression.quant.qarray import quantize
from feynkit.compression.quant.svdquant import svdquant_linear

# kernel vs reference (same operands, different summation order / bf16 output rounding)
TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-2}
# reference vs float64 NumPy on the same dequantized operands
TOL64 = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2}


def _f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _rel(a, b):
    a, b = _f64(a), _f64(b)
    assert np.all(np.isfinite(a)), "kernel output has NaN/Inf (unwritten or wrong indexing)"
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _weight_only(m, k, n, bits, group_size, symmetric, dtype):
    def case(key):
        kw, kx = jax.random.split(key)
        w = jax.random.normal(kw, (k, n)).astype(dtype)
        x = jax.random.normal(kx, (m, k)).astype(dtype)
        q = quantize(w, bits, group_size=group_size, symmetric=symmetric)
        kwargs = dict(bits=bits, group_size=q.group_size, k=k)
        out, ref = (
            weight_only_matmul(x, q.codes, q.scale, q.zero, implementation=impl, **kwargs)
            for impl in ("pallas", "reference")
        )
        exact = _f64(x) @ _f64(q.dequantize().astype(dtype))
        return out, ref, exact, jnp.dtype(dtype)

    return case


def _svdquant(m, k, n, rank, group_size, dtype, quantized_x):
    def case(key):
        ks = jax.random.split(key, 4)
        x = jax.random.normal(ks[0], (m, k)).astype(dtype)
        l1 = jax.random.normal(ks[1], (k, rank)).astype(jnp.bfloat16)
        l2 = (0.1 * jax.random.normal(ks[2], (rank, n))).astype(jnp.bfloat16)
        q = quantize(jax.random.normal(ks[3], (k, n)).astype(dtype), 4, group_size=group_size)
        xq = jnp.round(x * 4) / 4 if quantized_x else None
        kwargs = dict(x_quant=xq, bits=4, group_size=group_size, k=k)
        out, ref = (
            svdquant_fused_matmul(x, l1, l2, q.codes, q.scale, None, implementation=i, **kwargs)
            for i in ("pallas", "reference")
        )
        exact = _f64(x) @ _f64(l1) @ _f64(l2) + _f64(x if xq is None else xq) @ _f64(
            q.dequantize().astype(dtype)
        )
        return out, ref, exact, jnp.dtype(dtype)

    return case


def _w8a8(m, k, n, dtype):
    def case(key):
        kx, kw = jax.random.split(key)
        xq, sx = quantize_per_token(jax.random.normal(kx, (m, k)), dtype)
        wq, sw = quantize_per_channel(jax.random.normal(kw, (k, n)), dtype)
        out, ref = (w8a8_matmul(xq, sx, wq, sw, implementation=i) for i in ("pallas", "reference"))
        exact = (_f64(xq) * _f64(sx)) @ (_f64(wq) * _f64(sw))
        return out, ref, exact, jnp.dtype(jnp.float32)

    return case


CASES = {
    "int4_sym_g64_n96": _weight_only(3, 256, 96, 4, 64, True, jnp.float32),
    "int4_asym_perchannel_k200_bf16": _weight_only(17, 200, 130, 4, None, False, jnp.bfloat16),
    "int3_sym_g32": _weight_only(5, 128, 48, 3, 32, True, jnp.float32),
    "int8_asym_g32_one_token": _weight_only(1, 128, 64, 8, 32, False, jnp.float32),
    "int8_sym_perchannel_bf16": _weight_only(9, 96, 40, 8, None, True, jnp.bfloat16),
    "svdquant_float_x": _svdquant(3, 256, 96, 8, 64, jnp.float32, False),
    "svdquant_w4a4_bf16": _svdquant(17, 128, 130, 32, 64, jnp.bfloat16, True),
    "w8a8_int8": _w8a8(5, 200, 72, jnp.int8),
    "w8a8_fp8": _w8a8(16, 64, 32, jnp.float8_e4m3fn),
}


class TestKernelsMatchReference:
    @pytest.mark.parametrize("name", sorted(CASES))
    def test_matches_reference(self, name):
        seed = sorted(CASES).index(name) + 101
        out, ref, exact, dtype = CASES[name](jax.random.key(seed))
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert _rel(out, ref) < TOL[dtype]
        assert _rel(ref, exact) < TOL64[dtype]

    @pytest.mark.parametrize("shape,block_size", [((37, 29), 16), ((200,), 64)])
    def test_dfloat11_decode_bit_exact(self, shape, block_size):
        key = jax.random.key(sum(shape) + block_size)
        x = np.array((0.05 * jax.random.normal(key, shape)).astype(jnp.bfloat16))
        x.reshape(-1)[:3] = [0.0, -np.inf, 3.0e38]  # zero, infinity, a large exponent
        d = dfloat11_compress(x, block_size=block_size)
        out = np.asarray(dfloat11_decode(d, implementation="pallas"))
        assert out.dtype == ml_dtypes.bfloat16 and out.shape == shape
        np.testing.assert_array_equal(out.view(np.uint16), x.view(np.uint16))
        np.testing.assert_array_equal(
            np.asarray(dfloat11_decompress_numpy(d)).view(np.uint16), x.view(np.uint16)
        )


def test_quantized_array_dispatch_and_jit():
    kw, kx = jax.random.split(jax.random.key(7))
    q = quantize(jax.random.normal(kw, (128, 48)), 4, group_size=64, symmetric=False)
    x = jax.random.normal(kx, (2, 3, 128))
    dense = jnp.matmul(x, q.dequantize())
    if jax.default_backend() != "gpu":  # default off a GPU: x @ dequantize(), bit for bit
        np.testing.assert_array_equal(np.asarray(q.matmul(x)), np.asarray(dense))
    jitted = jax.jit(lambda q, x: q.matmul(x, implementation="pallas"))
    out = jitted(q, x)
    assert out.shape == (2, 3, 48) and _rel(out, dense) < 1e-5
    jitted(q, jax.random.normal(kx, (2, 3, 128)))
    assert jitted._cache_size() == 1  # a new x of the same shape does not recompile


def test_svdquant_layer_dispatch():
    kw, kx = jax.random.split(jax.random.key(3))
    w, x = jax.random.normal(kw, (128, 64)), jax.random.normal(kx, (4, 128))
    layer = svdquant_linear(w, jnp.max(jnp.abs(x), axis=0), rank=8, a_bits=4)
    assert _rel(layer.matmul(x, implementation="pallas"), layer.matmul(x)) < 1e-5


def test_dfloat11_array_matmul_dispatch():
    kw, kx = jax.random.split(jax.random.key(5))
    w = np.asarray(jax.random.normal(kw, (48, 24)).astype(jnp.bfloat16))
    d = dfloat11_compress(w, block_size=32)
    x = jax.random.normal(kx, (3, 48)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(d.matmul(x, implementation="pallas"), np.float32),
        np.asarray(jnp.matmul(x, jnp.asarray(w)), np.float32),
    )


def test_clear_errors():
    q = quantize(jax.random.normal(jax.random.key(0), (64, 32)), 4, group_size=16)
    x = jnp.ones((2, 64))
    with pytest.raises(ValueError, match="group_size=16"):
        q.matmul(x, implementation="pallas")
    with pytest.raises(ValueError, match="implementation"):
        q.matmul(x, implementation="triton")
    with pytest.raises(ValueError, match="last axis"):
        weight_only_matmul(jnp.ones((2, 63)), q.codes, q.scale, bits=4, group_size=16, k=64)
    with pytest.raises(ValueError, match="block_k"):
        QMatmulBlocks(block_k=48)
    q3 = quantize(jax.random.normal(jax.random.key(1), (4, 64, 32)), 4, axis=1, group_size=32)
    with pytest.raises(ValueError, match="2-D"):
        q3.matmul(jnp.ones((2, 256)), implementation="pallas")
