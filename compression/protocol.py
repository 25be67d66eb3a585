"""The one protocol every compressed tensor implements, so tree functions and `apply` treat all
containers alike.

A compressed container (`QuantizedArray`, `SpQRArray`, `VQArray`, `DFloat11Array`,
`GearTensor`, `SmoothQuantLinear`, `SVDQuantLinear`, `LowRankCompensated`, `ReshapedKernel`) is
a registered pytree (a ``flax.struct`` dataclass) that subclasses `CompressedTensor` and has

    shape, dtype      of the float array it stands for (static)
    dequantize()      that float array, Ŵ, shape ``shape`` and dtype ``dtype``
    nbits             exact storage in bits of the packed format: integer codes at their bit
                      width (⌈log₂k⌉ for codebook indices), side arrays (scales, codebooks,
                      factors, outliers with their indices) at their stored dtype, unless the
                      container's docstring states a reference convention (GEAR: fp16 scales)
    nbytes            ⌈nbits / 8⌉
    bits_per_weight   nbits / size
    matmul(x)         the product the container serves, x @ Ŵ in the float kernel's layout:
                      x (..., d_in) @ Ŵ (d_in, d_out) for a Flax Dense kernel; an N-D kernel
                      (a Conv's (kh, kw, c_in, c_out)) is read as its im2col matrix
                      Ŵ.reshape(−1, c_out); a batch of matrices (GEAR) as ``jnp.matmul``.
                      Weight-only containers compute x @ dequantize() (XLA fuses the
                      dequantization into the product under jit); activation-quantizing ones
                      (``quantizes_activations``: SmoothQuant, SVDQuant) also round x, so their
                      matmul is not x @ dequantize().

`is_compressed` is the ``is_leaf`` predicate of every tree function.

References:
  Qwix's ``QArray`` (qvalue, scale, static qtype) for the container shape of the protocol.
"""

from __future__ import annotations

import math
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
from flax import struct

from feynkit.core.types import Array, ArrayLike, Float

__all__ = [
    "CompressedTensor",
    "ReshapedKernel",
    "array_bits",
    "is_compressed",
    "kernel_matrix_shape",
]


class CompressedTensor:
    """Base class of every compressed container (see the module docstring for the protocol).

    Subclasses define ``shape`` and ``dtype`` (fields or properties), ``dequantize()`` and
    ``nbits``; ``nbytes``, ``bits_per_weight``, ``size``, ``ndim`` and the weight-only
    ``matmul`` come from here.
    """

    quantizes_activations: ClassVar[bool] = False

    def dequantize(self) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def nbits(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Storage in bytes, ⌈nbits / 8⌉."""
        return -(-int(self.nbits) // 8)

    @property
    def bits_per_weight(self) -> float:
        """Average storage bits per represented value, nbits / size."""
        return float(self.nbits) / max(self.size, 1)

    def matmul(self, x: Float[ArrayLike, "... d_in"]) -> Float[Array, "... d_out"]:
        """x @ Ŵ with Ŵ read as a (d_in, d_out) matrix (N-D kernels: Ŵ.reshape(−1, d_out)).

        Computed in the promoted dtype of x and the container's dtype.
        """
        x = jnp.asarray(x)
        w = self.dequantize()
        w = w.reshape(kernel_matrix_shape(w.shape))
        _check_matmul_input(x, w.shape[0], type(self).__name__)
        dt = jnp.promote_types(x.dtype, w.dtype)
        return jnp.matmul(x.astype(dt), w.astype(dt))


def _check_matmul_input(x, d_in: int, name: str) -> None:
    if x.ndim < 1 or x.shape[-1] != d_in:
        raise ValueError(
            f"{name}.matmul: x has shape {x.shape}; its last axis must be d_in = {d_in} (the "
            "kernel's flattened input axes)."
        )


def is_compressed(x) -> bool:
    """True for any compressed container (use as ``is_leaf`` in tree maps)."""
    return isinstance(x, CompressedTensor)


def kernel_matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(∏ shape[:-1], shape[-1]): the im2col matrix of a kernel (the matrix itself if 2-D)."""
    if len(shape) < 2:
        raise ValueError(f"a kernel needs at least 2 axes (…, d_out), got shape {tuple(shape)}.")
    return math.prod(shape[:-1]), shape[-1]


def array_bits(*arrays) -> int:
    """Σ size · itemsize · 8 over ``arrays`` (None entries skipped): storage at stored dtype."""
    return int(
        sum(
            int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize * 8
            for a in arrays
            if a is not None
        )
    )


@struct.dataclass
class ReshapedKernel(CompressedTensor):
    """An N-D kernel (e.g. a Conv's (kh, kw, c_in, c_out)) stored as a compressed 2-D matrix.

    ``inner`` compresses the im2col matrix W.reshape(∏ shape[:-1], shape[-1]), so every 2-D
    method (GPTQ with the im2col Hessian, SpQR, VPTQ, SVDQuant, ...) applies to convolutions.

    Attributes:
      inner: the 2-D compressed container.
      shape: the kernel's shape (static).
    """

    inner: CompressedTensor
    shape: tuple[int, ...] = struct.field(pytree_node=False)

    @property
    def dtype(self):
        return self.inner.dtype

    @property
    def quantizes_activations(self) -> bool:  # type: ignore[override]
        return self.inner.quantizes_activations

    @property
    def nbits(self) -> int:
        return self.inner.nbits

    def dequantize(self) -> Array:
        return self.inner.dequantize().reshape(self.shape)

    def matmul(self, x: Float[ArrayLike, "... d_in"]) -> Float[Array, "... d_out"]:
        return self.inner.matmul(x)
