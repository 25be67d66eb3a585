"""DFloat11: bit-exact round trips, canonical Huffman properties, JAX decoder = NumPy decoder."""

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from feynkit.compression.quant.dfloat11 import (
    build_huffman_code,
    compressed_nbytes,
    compression_ratio,
    dfloat11_compress,
    dfloat11_decompress,
    dfloat11_decompress_numpy,
    exponent_entropy,
    split_bf16,
)


def _bits(x) -> np.ndarray:
    return np.asarray(x).view(np.uint16)


def _bf16_from_bits(bits) -> np.ndarray:
    return np.asarray(bits, np.uint16).view(ml_dtypes.bfloat16)


def _assert_round_trip(x, block_size=64):
    d = dfloat11_compress(x, block_size=block_size)
    y = dfloat11_decompress(d)
    assert y.dtype == jnp.bfloat16 and y.shape == np.shape(x)
    np.testing.assert_array_equal(_bits(y), _bits(x))
    return d


def _special_values() -> np.ndarray:
    bits = [
        0x0000, 0x8000,  # ±0
        0x0001, 0x8001, 0x007F, 0x0040,  # subnormals (exponent 0, mantissa ≠ 0)
        0x7F80, 0xFF80,  # ±inf
        0x7FC0, 0xFFC0, 0x7F81, 0x7FFF, 0xFF81, 0x7FA5,  # NaNs with different payloads
        0x7F7F, 0xFF7F,  # ±max normal
        0x0080, 0x8080,  # ±min normal
        0x3F80, 0xBF80,  # ±1
    ]  # fmt: skip
    return _bf16_from_bits(bits)


@pytest.mark.parametrize("shape", [(64, 48), (1,), (0,), (0, 4)])
def test_round_trip_random_normal(shape):
    x = (jax.random.normal(jax.random.key(0), shape) * 0.02).astype(jnp.bfloat16)
    _assert_round_trip(x)


def test_round_trip_special_values_and_wide_range():
    # the special values, then every one of the 65536 bf16 bit patterns (all 256 exponents,
    # all NaN payloads, all subnormals) in random order
    everything = _bf16_from_bits(np.random.default_rng(0).permutation(65536))
    everything = np.concatenate([_special_values(), everything])
    d = _assert_round_trip(everything, block_size=1000)
    assert compression_ratio(d) > 0.99  # uniform exponents: nothing to gain, ~16 bits/value


def test_round_trip_single_exponent_and_constant():
    # values in [1, 2): exponent 127 only → one symbol with a 1-bit code
    x = (1.0 + 0.9 * jax.random.uniform(jax.random.key(1), (300,))).astype(jnp.bfloat16)
    d = _assert_round_trip(x)
    assert int(np.count_nonzero(np.asarray(d.length_counts))) == 1
    assert np.asarray(d.length_counts)[1] == 1
    _assert_round_trip(jnp.full((300,), -0.0, jnp.bfloat16))  # same stream length: no recompile


def test_block_offsets_and_numpy_decoder_agree_with_jax():
    x = (jax.random.normal(jax.random.key(2), (333,)) * 3.0).astype(jnp.bfloat16)
    x = x.at[::50].set(jnp.inf).at[7].set(jnp.nan)
    for block_size in (1, 1000):
        d = dfloat11_compress(x, block_size=block_size)
        assert d.block_offsets.shape == (-(-333 // block_size),)
        ref = dfloat11_decompress_numpy(d)
        np.testing.assert_array_equal(_bits(dfloat11_decompress(d)), _bits(ref))
        np.testing.assert_array_equal(_bits(ref), _bits(x))


def test_decoder_jit_compiles_once():
    x = (jax.random.normal(jax.random.key(3), (40, 40)) * 0.1).astype(jnp.bfloat16)
    d = dfloat11_compress(x, block_size=100)
    d_neg = dfloat11_compress(-x, block_size=100)  # same exponent stream, other sign bits
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(d))  # a pytree of arrays

    @jax.jit
    @chex.assert_max_traces(n=1)
    def decode(d):
        return dfloat11_decompress(d).astype(jnp.float32)

    np.testing.assert_array_equal(np.asarray(decode(d)), np.asarray(x, np.float32))
    np.testing.assert_array_equal(np.asarray(decode(d_neg)), -np.asarray(x, np.float32))


def test_huffman_code_prefix_free_kraft_and_shannon_bound():
    rng = np.random.default_rng(0)
    for trial in range(20):
        k = int(rng.integers(2, 257))
        counts = rng.integers(0, 1000, size=256) * (rng.random(256) < k / 256)
        counts[rng.integers(256)] += 1 + trial  # at least one symbol
        if trial % 3 == 0:  # trained-weight-like: geometric exponent histogram
            counts = np.floor(1e6 * 0.5 ** np.abs(np.arange(256) - 120)).astype(np.int64)
        lengths, codes = build_huffman_code(counts)
        used = np.flatnonzero(counts)
        assert (lengths[counts == 0] == 0).all() and (lengths[used] >= 1).all()
        words = [format(int(codes[s]), f"0{int(lengths[s])}b") for s in used]
        for a in words:  # prefix-free: no code is a prefix of another
            assert sum(b.startswith(a) for b in words) == 1
        assert sum(2.0 ** -lengths[used]) <= 1.0 + 1e-12
        p = counts[used] / counts.sum()
        entropy = -(p * np.log2(p)).sum()
        mean_len = (p * lengths[used]).sum()
        assert entropy - 1e-9 <= mean_len < entropy + 1 or len(used) == 1


def test_huffman_length_limit():
    # Fibonacci counts make an unlimited Huffman code as deep as the number of symbols
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    counts = np.zeros(256, np.int64)
    counts[:40] = fib
    unlimited, _ = build_huffman_code(counts)
    assert unlimited.max() == 32
    for limit in (8, 12, 20):
        lengths, codes = build_huffman_code(counts, max_length=limit)
        assert lengths.max() == limit and sum(2.0 ** -lengths[:40]) <= 1.0
        words = [format(int(codes[s]), f"0{int(lengths[s])}b") for s in range(40)]
        assert len(set(words)) == 40 and all(
            sum(b.startswith(a) for b in words) == 1 for a in words
        )
    with pytest.raises(ValueError, match="max_length"):
        build_huffman_code(counts, max_length=33)


def test_size_on_weight_like_tensor():
    x = (jax.random.normal(jax.random.key(5), (256, 256)) * 0.02).astype(jnp.bfloat16)
    d = _assert_round_trip(x, block_size=512)
    h = exponent_entropy(x)
    # a normal's exponent entropy is ≈ 2.6 bits (the paper's number for LLM weights)
    assert 2.3 < h < 2.9
    n = x.size
    stream = 4 * (d.words.shape[0] - 2)
    assert compressed_nbytes(d) == stream + 8 + n + 4 * d.block_offsets.shape[0] + 256 + 66
    # size ≈ (8 + E ℓ) / 16 with H ≤ E ℓ < H + 1, plus block offsets and tables
    assert (8 + h) / 16 < compression_ratio(d) < (9 + h) / 16 + 0.01


def test_split_bf16_and_bad_dtype():
    e, sm = split_bf16(_bf16_from_bits([0xBF80, 0x7F81]))
    np.testing.assert_array_equal(e, [127, 255])
    np.testing.assert_array_equal(sm, [0x80, 0x01])
    with pytest.raises(ValueError, match="bfloat16"):
        dfloat11_compress(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="block_size"):
        dfloat11_compress(jnp.ones(3, jnp.bfloat16), block_size=0)
