"""Weight-only quantized matmul y = x @ dequant(Wq) for int4 (packed) and int8 codes (Pallas).

Weights are stored as `QuantizedArray` stores them (`compression/quant/qarray.py`): codes uint8
of shape (K, N), or (⌈K/2⌉, N) for b ≤ 4 with two codes per byte along K (low nibble = even k);
per-(group, column) scales s and, when asymmetric, integer-valued zero points z of shape
(K / g, N); symmetric codes carry the offset 2^(b−1). So

    y[m, n] = Σ_k x[m, k] · s[k // g, n] · (c[k, n] − z[k // g, n])     (z = 2^(b−1) if symmetric)

The kernel (`weight_only_matmul`, implementation="pallas") owns a (block_m × block_n) output
tile per program and loops over its share of K in steps of ``block_k`` codes: each step loads
block_k/2 bytes × block_n of packed codes (int4) or block_k × block_n codes (int8), one row of
scales (and zeros), unpacks the nibbles, upcasts and scales them in registers and accumulates
two tensor-core dots in f32 (even and odd k: the x tile is read as its even and odd columns by
two stride-2 loads, so no nibble interleave is needed in registers). Decode-sized batches
(1–16 tokens) have too few output tiles to fill the GPU's ~132 multiprocessors, so K is split
over ``split_k`` programs whose f32 partial tiles are summed afterwards (split-K GEMV). The
bytes that must move are the packed codes plus scales (≈ K·N/2 + 4·K·N/g for int4): at 1–64
tokens the product is memory-bound, which is where 4-bit codes pay (≈ 4× fewer bytes than bf16
weights).

Sizes that are not multiples of the blocks are zero-padded (x, codes and scales; padding the
weights costs one copy per call, so store production weights with N a multiple of block_n).
A group shorter than the smallest step the tensor cores take (block_k ≥ 32 codes for int4,
16 for int8) is refused with a ValueError naming ``group_size``.

References:
  Frantar, Castro, Chen, Hoefler, Alistarh (2024), "MARLIN: Mixed-Precision Auto-Regressive
  Parallel Inference on Large Language Models" (in-register dequantization, split-K decode);
  Lin et al. (2024), "AWQ" (per-group zero points, packed int4 GEMV).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from feynkit.compression.kernels import _common as C

__all__ = [
    "QMatmulBlocks",
    "quantized_matmul",
    "supports_quantized_array",
    "weight_only_matmul",
    "weight_only_matmul_reference",
]


@dataclasses.dataclass(frozen=True)
class QMatmulBlocks:
    """Tile sizes and launch options of `weight_only_matmul` (powers of two ≥ 16).

    block_m: most token rows per program (capped at the next power of two ≥ the tokens, ≥ 16);
    block_n: output columns per program; block_k: codes along K per loop step (int4: block_k/2
    bytes; a step never straddles a scale group, so block_k shrinks to the group size);
    split_k: programs sharing one output tile's K range (None: double it while the grid has
    fewer than ``target_programs`` programs, i.e. ≈ 2 per multiprocessor of an H100/H200);
    num_warps, num_stages: Triton launch options (warps per program, pipelining depth).
    """

    block_m: int = 64
    block_n: int = 128
    block_k: int = 128
    split_k: int | None = None
    target_programs: int = 264
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        C.check_block("block_m", self.block_m, 16)
        C.check_block("block_n", self.block_n, 16)
        C.check_block("block_k", self.block_k, 32)
        if self.split_k is not None and self.split_k < 1:
            raise ValueError(f"split_k={self.split_k}: pass None (automatic) or an integer ≥ 1.")


def _unpack(codes, bits, k):
    if bits > 4:
        return codes
    both = jnp.stack([codes & 0xF, codes >> 4], axis=1)
    return both.reshape((2 * codes.shape[0],) + codes.shape[1:])[:k]


def _normalize(x, codes, scale, zero, bits, group_size, k):
    """Validate shapes eagerly; return (x, scale, zero) with scale/zero of shape (G, N)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}: weight codes must have 2..8 bits.")
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"x has shape {x.shape}; its last axis must be K = {k}.")
    n = codes.shape[-1]
    rows = -(-k // 2) if bits <= 4 else k
    if codes.ndim != 2 or codes.shape[0] != rows or codes.dtype != jnp.uint8:
        raise ValueError(
            f"codes must be uint8 of shape ({rows}, N) for K={k} at {bits} bits "
            f"({'two per byte' if bits <= 4 else 'one per byte'}), got {codes.dtype}{codes.shape}."
        )
    if group_size < 1 or k % group_size:
        raise ValueError(f"group_size={group_size} must divide K = {k}.")
    groups = k // group_size
    scale = jnp.asarray(scale, jnp.float32)
    if scale.shape == (1, 1) and groups * n > 1:  # per-tensor scale
        if group_size != k:
            raise ValueError(f"a (1, 1) per-tensor scale needs group_size = K = {k}.")
        scale = jnp.broadcast_to(scale, (1, n))
    if scale.shape != (groups, n):
        raise ValueError(
            f"scale has shape {scale.shape}; expected (K / group_size, N) = ({groups}, {n})."
        )
    if zero is not None:
        zero = jnp.broadcast_to(jnp.asarray(zero, jnp.float32), scale.shape)
    return scale, zero


def weight_only_matmul_reference(
    x,
    codes,
    scale,
    zero=None,
    *,
    bits: int,
    group_size: int,
    k: int,
    out_dtype=None,
    compute_dtype=None,
):
    """Dequantize-then-matmul in plain JAX: w = s·(c − z) in f32, cast to the compute dtype
    (x's unless given), one XLA dot with f32 accumulation, cast to ``out_dtype`` (x's)."""
    x = jnp.asarray(x)
    scale, zero = _normalize(x, codes, scale, zero, bits, group_size, k)
    cd = jnp.dtype(compute_dtype or x.dtype)
    n = codes.shape[-1]
    g = group_size
    c = _unpack(codes, bits, k).astype(jnp.float32).reshape(k // g, g, n)
    z = float(2 ** (bits - 1)) if zero is None else zero[:, None, :]
    w = ((c - z) * scale[:, None, :]).reshape(k, n).astype(cd)
    y = jnp.matmul(x.astype(cd), w, preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)


def _precision(cd):
    return lax.Precision.HIGHEST if cd == jnp.float32 else None


def _dot(a, b, cd):
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=_precision(cd))


def _dequant(c, sc, zz, cd):
    """(codes − z) · s in f32 registers, cast to the compute dtype; c (rows, bn), sc/zz (1, bn)."""
    return ((c.astype(jnp.float32) - zz) * sc).astype(cd)


def _qmm_kernel(*refs, bits, bk, steps, g, groups, offset, cd, has_zero, lowrank):
    """One (block_m × block_n) tile over one K split; refs in the order `_launch` passes them."""
    refs = list(refs)
    o_ref = refs.pop()
    packed = bits <= 4
    x_ref, c_ref, s_ref, *rest = refs
    z_ref = rest.pop(0) if has_zero else None
    if lowrank:  # L1, L2, then the branch's own x if it has one
        l1_ref, l2_ref = rest[0], rest[1]
        xl_ref = rest[2] if len(rest) > 2 else None
    split = pl.program_id(2)
    bm, bn = o_ref.shape

    def body(t, carry):
        acc, low = carry
        k0 = (split * steps + t) * bk
        row = jnp.minimum(k0 // g, groups - 1)
        sc = s_ref[pl.ds(row, 1), :]
        zz = z_ref[pl.ds(row, 1), :] if has_zero else jnp.full((1, bn), offset, jnp.float32)
        if packed:  # byte row i holds k = 2i (low nibble) and 2i + 1: even / odd x columns
            hb = bk // 2
            b = c_ref[pl.ds(t * hb, hb), :]
            ks = [pl.ds(t * bk, hb, stride=2), pl.ds(t * bk + 1, hb, stride=2)]
            ws = [b & 0xF, b >> 4]
        else:
            ks = [pl.ds(t * bk, bk)]
            ws = [c_ref[ks[0], :]]
        xt = [x_ref[:, kk].astype(cd) for kk in ks]
        for xi, ci in zip(xt, ws, strict=True):
            acc = acc + _dot(xi, _dequant(ci, sc, zz, cd), cd)
        if lowrank:  # x·L1 on the same K step (from the x tiles already loaded when shared)
            xl = xt if xl_ref is None else [xl_ref[:, kk].astype(cd) for kk in ks]
            for xi, kk in zip(xl, ks, strict=True):
                low = low + _dot(xi, l1_ref[kk, :].astype(cd), cd)
        return acc, low

    r = l2_ref.shape[0] if lowrank else 16
    init = (jnp.zeros((bm, bn), jnp.float32), jnp.zeros((bm, r), jnp.float32))
    acc, low = lax.fori_loop(0, steps, body, init)
    if lowrank:
        acc = acc + _dot(low.astype(cd), l2_ref[...].astype(cd), cd)
    o_ref[...] = acc.astype(o_ref.dtype)


def split_k_plan(tiles: int, total_steps: int, blocks: QMatmulBlocks) -> tuple[int, int]:
    """(split, steps per split): ``blocks.split_k``, or doubled from 1 while the grid has fewer
    than ``target_programs`` programs and every split keeps at least one K step."""
    split = blocks.split_k
    if split is None:
        split = 1
        while tiles * split * 2 <= blocks.target_programs and split * 2 <= total_steps:
            split *= 2
    split = max(1, min(split, total_steps))
    return split, -(-total_steps // split)


def _plan(m, k, n, bits, group_size, blocks: QMatmulBlocks):
    """(bm, bn, bk, split, steps, Mp, Kp, Np, g_eff, groups) for the launch."""
    groups = k // group_size
    min_k = 32 if bits <= 4 else 16
    if groups == 1:
        bk = blocks.block_k
    elif group_size % blocks.block_k == 0:
        bk = blocks.block_k
    else:
        bk = min(blocks.block_k, group_size & -group_size)  # largest power of two dividing g
    if bk < min_k:
        raise ValueError(
            f"group_size={group_size}: the Pallas kernel steps through K one scale group at a "
            f"time and needs steps of ≥ {min_k} codes at {bits} bits (a power of two dividing "
            "the group); use group_size 32, 64, 128, ... or implementation='reference'."
        )
    bm = min(blocks.block_m, C.pow2_at_least(m, 16))
    bn = min(blocks.block_n, C.pow2_at_least(n, 16))
    mp, np_ = C.round_up(m, bm), C.round_up(n, bn)
    total = -(-k // bk)
    tiles = (mp // bm) * (np_ // bn)
    split, steps = split_k_plan(tiles, total, blocks)
    kp = split * steps * bk
    g_eff = kp if groups == 1 else group_size
    return bm, bn, bk, split, steps, mp, kp, np_, g_eff, groups


def _launch(x2, codes, scale, zero, *, bits, group_size, k, blocks, cd, out_dtype, lowrank=None):
    """Pad, launch the kernel and sum the split-K partials. lowrank: (x_low, L1, L2) or None."""
    m, n = x2.shape[0], codes.shape[1]
    bm, bn, bk, split, steps, mp, kp, np_, g, groups = _plan(m, k, n, bits, group_size, blocks)
    ks = steps * bk  # K codes per split
    packed = bits <= 4
    xp = C.pad_to(x2, (mp, kp))
    ck = ks // 2 if packed else ks  # code rows per split
    cp = C.pad_to(codes, (kp // 2 if packed else kp, np_))
    sp = C.pad_to(scale, (groups, np_), 1.0)
    mt = mp // bm
    args = [xp, cp, sp]
    specs = [
        pl.BlockSpec((bm, ks), lambda i, j, s: (i, s)),
        pl.BlockSpec((ck, bn), lambda i, j, s: (s, j)),
        pl.BlockSpec((groups, bn), lambda i, j, s: (0, j)),
    ]
    if zero is not None:
        args.append(C.pad_to(zero, (groups, np_)))
        specs.append(pl.BlockSpec((groups, bn), lambda i, j, s: (0, j)))
    if lowrank is not None:
        xl, l1, l2 = lowrank
        r = C.pow2_at_least(l1.shape[1], 16)  # Triton tensors have power-of-two sizes
        args += [C.pad_to(l1, (kp, r)), C.pad_to(l2, (r, np_))]
        specs += [
            pl.BlockSpec((ks, r), lambda i, j, s: (s, 0)),
            pl.BlockSpec((r, bn), lambda i, j, s: (0, j)),
        ]
        if xl is not None:  # the branch's activations differ (quantized main path)
            args.append(C.pad_to(xl, (mp, kp)))
            specs.append(pl.BlockSpec((bm, ks), lambda i, j, s: (i, s)))
    part_dtype = jnp.float32 if split > 1 else out_dtype
    kernel = functools.partial(
        _qmm_kernel,
        bits=bits,
        bk=bk,
        steps=steps,
        g=g,
        groups=groups,
        offset=float(2 ** (bits - 1)),
        cd=cd,
        has_zero=zero is not None,
        lowrank=lowrank is not None,
    )
    out = C.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((split * mp, np_), part_dtype),
        grid=(mt, np_ // bn, split),
        in_specs=specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, s: (s * mt + i, j)),
        params=(blocks.num_warps, blocks.num_stages),
        name=f"w{bits}_matmul" + ("_lowrank" if lowrank is not None else ""),
    )(*args)
    if split > 1:
        out = out.reshape(split, mp, np_).sum(axis=0)
    return out[:m, :n].astype(out_dtype)


@functools.partial(
    jax.jit,
    static_argnames=("bits", "group_size", "k", "blocks", "out_dtype", "compute_dtype"),
)
def _pallas(x, codes, scale, zero, *, bits, group_size, k, blocks, out_dtype, compute_dtype):
    lead = x.shape[:-1]
    y = _launch(
        x.reshape(-1, k),
        codes,
        scale,
        zero,
        bits=bits,
        group_size=group_size,
        k=k,
        blocks=blocks,
        cd=jnp.dtype(compute_dtype),
        out_dtype=jnp.dtype(out_dtype),
    )
    return y.reshape(lead + (codes.shape[1],))


def weight_only_matmul(
    x,
    codes,
    scale,
    zero=None,
    *,
    bits: int,
    group_size: int,
    k: int,
    implementation: str | None = None,
    blocks: QMatmulBlocks | None = None,
    out_dtype=None,
    compute_dtype=None,
):
    """y = x @ dequant(codes) for int2..int8 codes with per-group scales (and zero points).

    Args:
      x: (..., K) activations (bf16 or float32; 1–256 tokens is the intended range).
      codes: uint8, (⌈K/2⌉, N) packed two per byte along K when bits ≤ 4, else (K, N); symmetric
        codes (``zero`` None) are stored with the offset 2^(bits−1), as `QuantizedArray` does.
      scale: (K / group_size, N) float scales, or (1, 1) per tensor; zero: like scale or None.
      bits, group_size (dividing K), k: the code width, group length and K.
      implementation: "pallas", "reference" or None (the kernel on GPU, the reference elsewhere;
        "pallas" off a GPU runs in interpret mode).
      blocks: tile sizes (`QMatmulBlocks`); out_dtype / compute_dtype: default x's dtype
        (the dot's operands are in ``compute_dtype``, accumulation in f32).

    Returns:
      (..., N) in ``out_dtype``.
    """
    x = jnp.asarray(x)
    codes = jnp.asarray(codes)
    scale, zero = _normalize(x, codes, scale, zero, bits, group_size, k)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    compute_dtype = jnp.dtype(compute_dtype or x.dtype)
    if C.resolve_implementation(implementation) == "reference":
        return weight_only_matmul_reference(
            x,
            codes,
            scale,
            zero,
            bits=bits,
            group_size=group_size,
            k=k,
            out_dtype=out_dtype,
            compute_dtype=compute_dtype,
        )
    blocks = blocks or QMatmulBlocks()
    _plan(1, k, codes.shape[1], bits, group_size, blocks)  # eager: refuse unsupported groups
    return _pallas(
        x,
        codes,
        scale,
        zero,
        bits=bits,
        group_size=group_size,
        k=k,
        blocks=blocks,
        out_dtype=out_dtype,
        compute_dtype=compute_dtype,
    )


def supports_quantized_array(q, blocks: QMatmulBlocks | None = None) -> str | None:
    """None if `weight_only_matmul` can serve ``q``'s matmul, else the reason it cannot."""
    if q.codes.ndim != 2 or len(q.shape) != 2 or q.axis != 0:
        return (
            f"the kernel serves 2-D (K, N) kernels quantized along axis 0; got shape "
            f"{q.shape}, axis {q.axis}, codes {q.codes.shape}"
        )
    try:
        _plan(1, q.shape[0], q.shape[1], q.bits, q.group_size, blocks or QMatmulBlocks())
    except ValueError as e:
        return str(e)
    return None


def quantized_matmul(
    x, q, *, implementation: str | None = None, blocks: QMatmulBlocks | None = None
):
    """x @ q.dequantize() for a 2-D `QuantizedArray` ``q``, in promote(x.dtype, q.dtype)."""
    x = jnp.asarray(x)
    reason = supports_quantized_array(q, blocks)
    if reason is not None:
        raise ValueError(f"quantized_matmul: {reason}.")
    dt = jnp.promote_types(x.dtype, q.dtype)
    return weight_only_matmul(
        x.astype(dt),
        q.codes,
        q.scale,
        q.zero,
        bits=q.bits,
        group_size=q.group_size,
        k=q.shape[0],
        implementation=implementation,
        blocks=blocks,
    )
