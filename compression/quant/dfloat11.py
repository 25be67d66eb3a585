"""DFloat11: lossless bf16 compression by Huffman-coding the exponent byte.

A bf16 value is 1 sign bit s, 8 exponent bits e and 7 mantissa bits m. In trained weights the
exponent takes few values (empirical entropy H(e) ≈ 2.6 bits), while s and m are close to
uniform. DFloat11 stores

    sign-mantissa byte  (s << 7) | m          raw, one byte per value
    exponent e          canonical Huffman code of length ℓ(e) ≤ 32, packed in one bitstream

so a value costs 8 + ℓ(e) bits, E[ℓ] < H(e) + 1 (about 11 bits: ~70% of bf16). Decoding is
bit-exact. Canonical codes are determined by the code lengths alone: with n_ℓ codes of length
ℓ, the first code of length ℓ is c_ℓ = (c_{ℓ−1} + n_{ℓ−1}) << 1, and symbols sorted by (ℓ, e)
take consecutive codes. Left-justified to 32 bits (F_ℓ = c_ℓ << (32 − ℓ)), the codes of length ℓ
fill [F_ℓ, F_ℓ'), ℓ' the next used length, so a 32-bit window w of the stream decodes as

    ℓ(w) = max{ℓ used : F_ℓ ≤ w},   symbol = sorted[first_index_ℓ + (w − F_ℓ) >> (32 − ℓ)].

For parallel decoding the values are cut into blocks of ``block_size``; each block stores the
bit offset of its first code, so blocks decode independently (`jax.vmap` over blocks of a
`lax.scan` over codes). The paper's GPU kernel instead gives each thread a fixed span of
encoded bytes plus a "gap" (offset of the first code starting in it) and each thread block
an output position, and uses hierarchical 256-entry lookup tables; the information stored is
the same up to a few bytes per block. The encoder runs in NumPy on the host (a one-off).

References:
  Zhang et al. (2025), "70% Size, 100% Accuracy: Lossless LLM Compression for Efficient GPU
  Inference via Dynamic-Length Float"; Huffman (1952); Schwartz & Kallick (1964), canonical codes.
"""

from __future__ import annotations

import heapq

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import struct
from jax import lax

from feynkit.compression.protocol import (
    CompressedTensor,
    _check_matmul_input,
    array_bits,
    kernel_matrix_shape,
)
from feynkit.core.types import Array, ArrayLike

__all__ = [
    "DFloat11Array",
    "build_huffman_code",
    "compressed_nbytes",
    "compression_ratio",
    "dfloat11_compress",
    "dfloat11_decompress",
    "dfloat11_decompress_numpy",
    "exponent_entropy",
    "split_bf16",
]

MAX_CODE_LENGTH = 32  # a code fits one 32-bit window
_LENGTHS = np.arange(MAX_CODE_LENGTH + 1)


@struct.dataclass
class DFloat11Array(CompressedTensor):
    """A bf16 tensor with Huffman-coded exponents (see the module docstring).

    Protocol: ``dequantize()`` decodes bit-exactly and casts to ``dtype`` (bf16 unless the
    tensor stood for wider weights, e.g. float32 kernels stored in bf16 by `dfloat11_recipe`);
    storage counts every stored array (stream, sign-mantissa bytes, offsets, code tables).

    Attributes:
      words: uint32, the exponent bitstream, first bit = most significant bit of ``words[0]``,
        followed by two zero words so a 32-bit window can always be read.
      sign_mantissa: uint8 (size,), ``(sign << 7) | mantissa`` per value.
      block_offsets: int32 (num_blocks,), bit offset in the stream of each block's first code.
      symbols: uint8 (256,), exponents in canonical order (sorted by (length, exponent)).
      length_counts: uint16 (33,), number of codes of each length 0..32 (index 0 unused).
      shape: of the original tensor (static); block_size: values per block (static);
      dtype: of ``dequantize()`` (static, default bfloat16).
    """

    words: Array
    sign_mantissa: Array
    block_offsets: Array
    symbols: Array
    length_counts: Array
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    block_size: int = struct.field(pytree_node=False)
    dtype: np.dtype = struct.field(pytree_node=False, default=np.dtype(ml_dtypes.bfloat16))

    @property
    def nbits(self) -> int:
        return array_bits(*jax.tree.leaves(self))

    def dequantize(self, implementation: str | None = None) -> Array:
        return dfloat11_decompress(self, implementation).astype(self.dtype)

    def matmul(self, x: ArrayLike, implementation: str | None = None) -> Array:
        """x @ Ŵ after decoding Ŵ (``implementation`` as in `dfloat11_decompress`)."""
        x = jnp.asarray(x)
        w = self.dequantize(implementation)
        w = w.reshape(kernel_matrix_shape(w.shape))
        _check_matmul_input(x, w.shape[0], type(self).__name__)
        dt = jnp.promote_types(x.dtype, w.dtype)
        return jnp.matmul(x.astype(dt), w.astype(dt))


def split_bf16(x: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Exponent bytes e = (bits >> 7) & 0xFF and sign-mantissa bytes (s << 7) | m of a bf16 array.

    Args:
      x: bf16 array (NumPy/ml_dtypes or JAX), any shape.

    Returns:
      (exponent, sign_mantissa), both uint8 and flattened.
    """
    x = np.asarray(x)
    if x.dtype != ml_dtypes.bfloat16:
        raise ValueError(
            f"DFloat11 compresses bfloat16 arrays, got {x.dtype}; cast with "
            ".astype(jnp.bfloat16) first (that is what 'bf16 weights' means)."
        )
    bits = x.reshape(-1).view(np.uint16)
    exponent = ((bits >> 7) & 0xFF).astype(np.uint8)
    sign_mantissa = (((bits >> 8) & 0x80) | (bits & 0x7F)).astype(np.uint8)
    return exponent, sign_mantissa


def exponent_entropy(x: ArrayLike) -> float:
    """Empirical entropy H(e) = −Σ p_e log₂ p_e (bits) of a bf16 array's exponent byte."""
    counts = np.bincount(split_bf16(x)[0], minlength=256)
    p = counts[counts > 0] / max(counts.sum(), 1)
    return float(-(p * np.log2(p)).sum())


def _huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Optimal (unlimited) Huffman code lengths; symbols with count 0 get length 0."""
    lengths = np.zeros(len(counts), np.int64)
    used = np.flatnonzero(counts)
    if len(used) == 1:
        lengths[used] = 1
    if len(used) <= 1:
        return lengths
    # heap of (weight, tie-break, symbols in the subtree); merging deepens every member by one
    heap = [(int(counts[s]), i, [int(s)]) for i, s in enumerate(used)]
    heapq.heapify(heap)
    tie = len(heap)
    while len(heap) > 1:
        w1, _, s1 = heapq.heappop(heap)
        w2, _, s2 = heapq.heappop(heap)
        lengths[s1 + s2] += 1
        heapq.heappush(heap, (w1 + w2, tie, s1 + s2))
        tie += 1
    return lengths


def _limit_lengths(lengths: np.ndarray, counts: np.ndarray, limit: int) -> np.ndarray:
    """Clip lengths to ``limit`` and restore Kraft Σ 2^−ℓ ≤ 1 by lengthening the rarest codes."""
    lengths = lengths.copy()
    used = lengths > 0
    lengths[used] = np.minimum(lengths[used], limit)
    kraft = int(sum(1 << (limit - int(ln)) for ln in lengths[used]))
    while kraft > (1 << limit):
        # lengthening a length-ℓ code frees 2^(limit−ℓ−1); take the rarest code below the limit
        cand = np.flatnonzero(used & (lengths < limit))
        s = cand[np.lexsort((-lengths[cand], counts[cand]))[0]]
        kraft -= 1 << (limit - int(lengths[s]) - 1)
        lengths[s] += 1
    return lengths


def build_huffman_code(
    counts: ArrayLike, max_length: int = MAX_CODE_LENGTH
) -> tuple[np.ndarray, np.ndarray]:
    """Length-limited canonical Huffman code for symbol counts.

    Lengths are Huffman's optimal ones (E ℓ < H + 1); if one exceeds ``max_length`` they are
    clipped and the rarest codes lengthened until Kraft's inequality Σ 2^−ℓ ≤ 1 holds again.
    Canonical codes: symbols sorted by (ℓ, symbol) take consecutive integers, the code moving
    to the next length as c ← (c + 1) << (ℓ' − ℓ).

    Args:
      counts: (num_symbols,) nonnegative integer counts (≤ 256 symbols).
      max_length: longest code allowed (1..32).

    Returns:
      (lengths, codes): int64 arrays (num_symbols,); unused symbols have length 0 and code 0.

    References: Huffman (1952); DFloat11 (Zhang et al., 2025) limits codes to 32 bits.
    """
    counts = np.asarray(counts, np.int64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError("counts must be a 1-D array of nonnegative integers.")
    if not 1 <= max_length <= MAX_CODE_LENGTH:
        raise ValueError(f"max_length must be in [1, {MAX_CODE_LENGTH}], got {max_length}.")
    if np.count_nonzero(counts) > (1 << max_length):
        raise ValueError(
            f"{np.count_nonzero(counts)} symbols do not fit codes of {max_length} bits."
        )
    lengths = _limit_lengths(_huffman_lengths(counts), counts, max_length)
    codes = np.zeros(len(counts), np.int64)
    code, prev = 0, 0
    for s in np.lexsort((np.arange(len(counts)), lengths)):
        if lengths[s] == 0:
            continue
        if prev:
            code = (code + 1) << (int(lengths[s]) - prev)
        prev = int(lengths[s])
        codes[s] = code
    return lengths, codes


def _pack_bits(codes: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, int]:
    """Concatenate codes MSB-first into big-endian uint32 words (+2 zero words of padding)."""
    total = int(lengths.sum())
    if total >= 2**31 - 64:
        raise ValueError("the exponent stream exceeds 2^31 bits; compress smaller tensors.")
    starts = np.cumsum(lengths) - lengths
    owner = np.repeat(np.arange(len(codes)), lengths)
    j = np.arange(total) - starts[owner]
    bits = ((codes[owner] >> (lengths[owner] - 1 - j)) & 1).astype(np.uint8)
    nwords = -(-total // 32) + 2
    padded = np.zeros(nwords * 32, np.uint8)
    padded[:total] = bits
    words = np.packbits(padded).view(">u4").astype(np.uint32)
    return words, total


def dfloat11_compress(x: ArrayLike, *, block_size: int = 512) -> DFloat11Array:
    """Compress a bf16 tensor losslessly (host-side NumPy encoder).

    Args:
      x: bf16 array of any shape (cast float32 weights with ``.astype(jnp.bfloat16)``).
      block_size: values per independently decodable block (one int32 bit offset each).

    Returns:
      A `DFloat11Array`; `dfloat11_decompress` restores ``x`` bit for bit.

    References: Zhang et al. (2025), "70% Size, 100% Accuracy" (DFloat11).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be ≥ 1, got {block_size}.")
    shape = tuple(np.shape(x))
    exponent, sign_mantissa = split_bf16(x)
    counts = np.bincount(exponent, minlength=256)
    lengths, codes = build_huffman_code(counts)
    words, _ = _pack_bits(codes[exponent], lengths[exponent])
    value_lengths = lengths[exponent]
    starts = np.cumsum(value_lengths) - value_lengths
    block_offsets = starts[::block_size].astype(np.int32)
    order = np.lexsort((np.arange(256), lengths))
    order = order[lengths[order] > 0]
    symbols = np.zeros(256, np.uint8)
    symbols[: len(order)] = order
    return DFloat11Array(
        words=jnp.asarray(words),
        sign_mantissa=jnp.asarray(sign_mantissa),
        block_offsets=jnp.asarray(block_offsets),
        symbols=jnp.asarray(symbols),
        length_counts=jnp.asarray(np.bincount(lengths[lengths > 0], minlength=33)[:33], jnp.uint16),
        shape=shape,
        block_size=int(block_size),
    )


def _canonical_tables(length_counts: Array) -> tuple[Array, Array, Array]:
    """(used, F_ℓ left-justified first codes (uint32), first_index_ℓ) for ℓ = 0..32.

    Unrolling c_ℓ = (c_{ℓ−1} + n_{ℓ−1}) << 1 gives F_ℓ = c_ℓ 2^{32−ℓ} = Σ_{j<ℓ} n_j 2^{32−j}, an
    exclusive prefix sum (below 2^32 for every used ℓ by Kraft's inequality).
    """
    counts = length_counts.astype(jnp.int32)
    ells = jnp.arange(MAX_CODE_LENGTH + 1, dtype=jnp.uint32)
    weight = counts.astype(jnp.uint32) << (jnp.uint32(MAX_CODE_LENGTH) - jnp.maximum(ells, 1))
    weight = jnp.where(ells == 0, jnp.uint32(0), weight)
    left = jnp.cumsum(weight, dtype=jnp.uint32) - weight
    return counts > 0, left, jnp.cumsum(counts) - counts


def _window(words: Array, pos: Array) -> Array:
    """The 32 bits of the stream starting at bit ``pos`` (MSB first), as uint32."""
    idx = pos >> 5
    off = (pos & 31).astype(jnp.uint32)
    hi = words[idx] << off
    lo = jnp.where(off == 0, jnp.uint32(0), words[idx + 1] >> (jnp.uint32(32) - off))
    return hi | lo


def dfloat11_decompress(d: DFloat11Array, implementation: str | None = None) -> Array:
    """Decode a `DFloat11Array` to the original bf16 tensor, bit-exact (jit-able).

    implementation: "pallas" (the block-parallel kernel of
    `feynkit.compression.kernels.dfloat11_decode`; interpret mode off a GPU), "reference" (the
    JAX decoder below) or None: the kernel on a GPU, the reference elsewhere.
    """
    from feynkit.compression.kernels.dfloat11_decode import dfloat11_decode

    return dfloat11_decode(d, implementation=implementation)


@jax.jit
def _dfloat11_decompress_jax(d: DFloat11Array) -> Array:
    """The JAX decoder of `dfloat11_decompress` (bit-exact).

    Each block decodes its ``block_size`` codes sequentially (`lax.scan`) from its stored bit
    offset; blocks run in parallel (`jax.vmap`). A 32-bit window w at the current position gives
    ℓ = max{used ℓ : F_ℓ ≤ w} and the exponent sorted[first_index_ℓ + (w − F_ℓ) >> (32 − ℓ)];
    the bf16 bits are ((sm & 0x80) << 8) | (e << 7) | (sm & 0x7F).

    Args:
      d: from `dfloat11_compress`.

    Returns:
      bf16 array of shape ``d.shape``.
    """
    n = d.size
    if n == 0:
        return jnp.zeros(d.shape, jnp.bfloat16)
    used, left, first_index = _canonical_tables(d.length_counts)
    ells = jnp.arange(MAX_CODE_LENGTH + 1, dtype=jnp.int32)

    def decode_block(start):
        def step(pos, _):
            w = _window(d.words, pos)
            ell = jnp.max(jnp.where(used & (left <= w), ells, 0))
            rank = (w - left[ell]) >> (jnp.uint32(MAX_CODE_LENGTH) - ell.astype(jnp.uint32))
            return pos + ell, d.symbols[first_index[ell] + rank.astype(jnp.int32)]

        return lax.scan(step, start, None, length=d.block_size)[1]

    exponent = jax.vmap(decode_block)(d.block_offsets).reshape(-1)[:n].astype(jnp.uint16)
    sm = d.sign_mantissa.astype(jnp.uint16)
    bits = ((sm & 0x80) << 8) | (exponent << 7) | (sm & 0x7F)
    return lax.bitcast_convert_type(bits, jnp.bfloat16).reshape(d.shape)


def dfloat11_decompress_numpy(d: DFloat11Array) -> np.ndarray:
    """Reference decoder: a bit-by-bit canonical Huffman walk in Python (slow; for tests).

    Reads bits one at a time, code ← 2·code + bit, until code − c_ℓ < n_ℓ (c_ℓ the first code
    of length ℓ); it ignores the block offsets, so it also checks them against the stream.
    """
    counts = np.asarray(d.length_counts, np.int64)
    symbols = np.asarray(d.symbols)
    bits = np.unpackbits(np.asarray(d.words).astype(">u4").view(np.uint8))
    first, index, code = np.zeros(34, np.int64), np.zeros(34, np.int64), 0
    for ell in range(1, 33):
        code = (code + counts[ell - 1]) << 1 if ell > 1 else 0
        first[ell], index[ell] = code, counts[:ell].sum()
    exponent = np.zeros(d.size, np.uint16)
    pos = 0
    for i in range(d.size):
        code, ell = 0, 0
        while True:
            code, ell, pos = (code << 1) | int(bits[pos]), ell + 1, pos + 1
            if code - first[ell] < counts[ell]:
                exponent[i] = symbols[index[ell] + code - first[ell]]
                break
    sm = np.asarray(d.sign_mantissa).astype(np.uint16)
    out = ((sm & 0x80) << 8) | (exponent << 7) | (sm & 0x7F)
    return out.view(ml_dtypes.bfloat16).reshape(d.shape)


def compressed_nbytes(d: DFloat11Array) -> int:
    """Bytes stored: bitstream words, sign-mantissa bytes, block offsets and code tables."""
    return d.nbytes


def compression_ratio(d: DFloat11Array) -> float:
    """Compressed bytes / bf16 bytes (2 per value), tables and offsets included (paper: ≈ 0.70)."""
    return compressed_nbytes(d) / max(2 * d.size, 1)
