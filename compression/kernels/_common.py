"""Shared plumbing of the Pallas kernels: the ``implementation=`` switch, padding, launch options.

Every kernel module exposes a wrapper with ``implementation`` in {"pallas", "reference", None}:
None picks the Pallas kernel on a GPU backend and the pure-JAX reference elsewhere; "pallas" on
a backend without a GPU runs the kernel in Pallas interpret mode (slow, for tests). Kernels are
written for the Triton lowering of Pallas (``jax.experimental.pallas.triton``): each program
owns an output tile, loops over the reduction axis in ``block_k`` steps (``lax.fori_loop``,
software-pipelined by Triton over ``num_stages`` shared-memory stages), upcasts the codes in
registers and feeds bf16/f32 operands to the tensor cores with f32 accumulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

IMPLEMENTATIONS = ("pallas", "reference")


def resolve_implementation(implementation: str | None) -> str:
    """ "pallas" / "reference" as given; None: "pallas" on a GPU backend, "reference" elsewhere."""
    if implementation is None:
        return "pallas" if jax.default_backend() == "gpu" else "reference"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS} or None (the kernel on GPU, the "
            f"reference elsewhere), got {implementation!r}."
        )
    return implementation


def interpret_mode() -> bool:
    """Pallas interpret mode everywhere but on a GPU backend."""
    return jax.default_backend() != "gpu"


def compiler_params(num_warps: int, num_stages: int):
    """Triton launch options on a GPU backend (None in interpret mode)."""
    if interpret_mode():
        return None
    from jax.experimental.pallas import triton as plgpu

    cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


def pallas_call(kernel, **kwargs):
    """`pl.pallas_call` with interpret mode off a GPU and Triton options on one."""
    params = kwargs.pop("params", None)
    cp = None if params is None else compiler_params(*params)
    return pl.pallas_call(kernel, interpret=interpret_mode(), compiler_params=cp, **kwargs)


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_to(a, shape, value=0):
    """Zero- (or ``value``-) pad ``a`` at the end of each axis to ``shape`` (no copy if equal)."""
    pads = [(0, t - s) for s, t in zip(a.shape, shape, strict=True)]
    if all(p == (0, 0) for p in pads):
        return a
    return jnp.pad(a, pads, constant_values=value)


def pow2_at_least(n: int, lo: int) -> int:
    """The smallest power of two ≥ max(n, lo)."""
    return max(lo, 1 << max(int(n) - 1, 0).bit_length())


def check_block(name: str, value: int, minimum: int) -> None:
    if value < minimum or value & (value - 1):
        raise ValueError(
            f"{name}={value}: block sizes must be powers of two ≥ {minimum} (Triton tiles; the "
            "tensor-core dot needs ≥ 16 along each axis)."
        )
