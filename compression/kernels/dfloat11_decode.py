"""DFloat11 decode in Pallas: Huffman-coded exponents back to bf16, bit-exact, block-parallel.

The encoder (`compression/quant/dfloat11.py`) stores, per block of ``block_size`` values, the
bit offset of the block's first exponent code, so blocks decode independently. Here one program
owns ``lanes`` consecutive blocks, one per lane (a thread in Triton's lowering, 4 warps = 128
lanes), and walks them in lock step for ``block_size`` steps: each step reads every lane's
32-bit window of the stream (two word gathers), finds the code length with the canonical-code
test ℓ = max{ℓ used : F_ℓ ≤ w} (a (lanes × 32) compare and an int32 row maximum), gathers F_ℓ
and the first index of ℓ from the 33-entry tables, looks the exponent up in the
256-entry symbol table, and writes the bf16 bits ((sm & 0x80) << 8) | (e << 7) | (sm & 0x7F)
next to the raw sign-mantissa byte it read. The decoded tensor then feeds an ordinary bf16 XLA
matmul (`DFloat11Array.matmul`): the decode writes 2 bytes and reads ≈ 1.4 per value, once per
call, while the matmul at decode-sized batches reads the same 2 bytes per value again; fusing
the decode into the matmul's K loop is left for when the GPU timings show the extra pass costs.

Reads past the end of the stream (the last, partial block and padding lanes decode garbage that
is sliced off) are clamped to the stream's last two words, so no program reads out of bounds.

References:
  Zhang et al. (2025), "70% Size, 100% Accuracy: Lossless LLM Compression for Efficient GPU
  Inference via Dynamic-Length Float" (DFloat11's block-parallel GPU decoder).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from feynkit.compression.kernels import _common as C

__all__ = ["DecodeBlocks", "dfloat11_decode", "dfloat11_decode_reference"]

_MAXLEN = 32


@dataclasses.dataclass(frozen=True)
class DecodeBlocks:
    """lanes: DFloat11 blocks decoded side by side per program (power of two ≥ 16);
    num_warps, num_stages: Triton launch options."""

    lanes: int = 128
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        C.check_block("lanes", self.lanes, 16)


def dfloat11_decode_reference(d):
    """The pure-JAX decoder (`dfloat11_decompress`: vmap over blocks of a scan over codes)."""
    from feynkit.compression.quant.dfloat11 import _dfloat11_decompress_jax

    return _dfloat11_decompress_jax(d)


def _decode_kernel(
    off_ref, sm_ref, words_ref, left_ref, first_ref, used_ref, sym_ref, o_ref, *, steps, nwords
):
    lengths = lax.broadcasted_iota(jnp.int32, (1, _MAXLEN), 1) + 1
    f_l = left_ref[pl.ds(1, _MAXLEN)][None, :]
    u_l = used_ref[pl.ds(1, _MAXLEN)][None, :] != 0

    def step(t, pos):
        idx = jnp.minimum(pos >> 5, nwords - 2)
        off = (pos & 31).astype(jnp.uint32)
        hi = words_ref[idx] << off
        nxt = words_ref[idx + 1] >> (jnp.uint32(32) - jnp.maximum(off, jnp.uint32(1)))
        w = hi | jnp.where(off == 0, jnp.uint32(0), nxt)
        hit = u_l & (f_l <= w[:, None])
        ell = jnp.max(jnp.where(hit, lengths, 0), axis=1)  # int32 row maximum
        left, first = left_ref[ell], first_ref[ell]  # gathers from the 33-entry tables
        shift = (jnp.int32(_MAXLEN) - jnp.maximum(ell, 1)).astype(jnp.uint32)
        rank = ((w - left) >> shift).astype(jnp.int32)
        e = sym_ref[jnp.clip(first + rank, 0, 255)].astype(jnp.uint32)
        sm = sm_ref[:, pl.ds(t, 1)].astype(jnp.uint32)[:, 0]
        bits = ((sm & 0x80) << 8) | (e << 7) | (sm & 0x7F)
        o_ref[:, pl.ds(t, 1)] = bits.astype(jnp.uint16)[:, None]
        return pos + ell

    lax.fori_loop(0, steps, step, off_ref[...])


@functools.partial(jax.jit, static_argnames=("blocks",))
def _pallas(d, blocks: DecodeBlocks):
    from feynkit.compression.quant.dfloat11 import _canonical_tables

    n, bs = d.size, d.block_size
    nb = d.block_offsets.shape[0]
    lanes = min(blocks.lanes, C.pow2_at_least(nb, 16))
    nbp = C.round_up(nb, lanes)
    offsets = C.pad_to(d.block_offsets.astype(jnp.int32), (nbp,))
    sm = C.pad_to(d.sign_mantissa, (nbp * bs,)).reshape(nbp, bs)
    used, left, first = _canonical_tables(d.length_counts)
    nwords = d.words.shape[0]
    full = lambda a: pl.BlockSpec(a.shape, lambda i: (0,) * a.ndim)  # noqa: E731
    tabs = [d.words, left, first.astype(jnp.int32), used.astype(jnp.int32), d.symbols]
    out = C.pallas_call(
        functools.partial(_decode_kernel, steps=bs, nwords=nwords),
        out_shape=jax.ShapeDtypeStruct((nbp, bs), jnp.uint16),
        grid=(nbp // lanes,),
        in_specs=[
            pl.BlockSpec((lanes,), lambda i: (i,)),
            pl.BlockSpec((lanes, bs), lambda i: (i, 0)),
        ]
        + [full(a) for a in tabs],
        out_specs=pl.BlockSpec((lanes, bs), lambda i: (i, 0)),
        params=(blocks.num_warps, blocks.num_stages),
        name="dfloat11_decode",
    )(offsets, sm, *tabs)
    return lax.bitcast_convert_type(out.reshape(-1)[:n], jnp.bfloat16).reshape(d.shape)


def dfloat11_decode(d, *, implementation: str | None = None, blocks: DecodeBlocks | None = None):
    """Decode a `DFloat11Array` to its bf16 tensor, bit-exact.

    implementation: "pallas" (interpret mode off a GPU), "reference" (`lax.scan` under
    `jax.vmap`), or None: the kernel on a GPU, the reference elsewhere.
    """
    if C.resolve_implementation(implementation) == "reference" or d.size == 0:
        return dfloat11_decode_reference(d)
    if d.words.shape[0] < 2:
        raise ValueError("DFloat11Array.words must end with the encoder's two padding words.")
    return _pallas(d, blocks or DecodeBlocks())
