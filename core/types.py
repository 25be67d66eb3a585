"""Shared type aliases."""

from typing import Any, Protocol

import jax
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

PyTree = Any
Key = PRNGKeyArray

__all__ = [
    "Array",
    "ArrayLike",
    "Float",
    "Int",
    "Key",
    "PyTree",
    "ResampleFn",
    "ScoreFn",
]


class ResampleFn(Protocol):
    """`resample_fn(key, log_weights, num_samples) -> ancestor indices` of shape (num_samples,)."""

    def __call__(self, key: jax.Array, log_weights: Array, num_samples: int) -> Array: ...


class ScoreFn(Protocol):
    """`score_fn(x, t) -> ∇ log p_t(x)` on a batch: x of shape (n, d), t a scalar."""

    def __call__(self, x: Array, t: Array) -> Array: ...
