"""Shared type aliases and the role signatures pieces are combined by.

One signature per role, so that an analytic score, a Flax model and a quantized Flax model,
or any two resamplers, guidance methods or quantizers, are interchangeable:

  `ModelFn`        ``model_fn(x, t, **cond) -> output`` (ε, x₀, v, score or velocity; t (batch,))
  `DenoiseFn`      ``denoise(x, t, **cond) -> Prediction`` (a model wrapped by `as_denoiser`)
  `ScoreFn`        ``score_fn(x, t) -> ∇ log p_t(x)`` (t a scalar)
  `LogProbFn`      ``log_prob_fn(x, t) -> log p_t(x)`` per sample, up to a constant
  `RewardFn`       ``reward_fn(x) -> r`` of shape (n,)
  `ResampleFn`     ``resample_fn(key, log_weights, num_samples) -> ancestor indices``
  `GuidanceFn`     ``combine(cond, uncond, state, t) -> (prediction, state)``
  `QuantizerFn`    ``quantizer(w) -> compressed leaf`` (the `compression` protocol)
  `CompressorFn`   ``compressor(params, calibration=None) -> compressed params`` (a recipe)
  `Schedule`       α_t, σ_t and the SDE coefficients a solver integrates

The predictions, compressed leaves and guidance states are defined where they live
(`inference.diffusion.Prediction`, `compression.CompressedTensor`); `core` imports nothing of
the package, so they appear here as ``Any``.
"""

from typing import Any, Protocol, runtime_checkable

import jax
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

PyTree = Any
Key = PRNGKeyArray

__all__ = [
    "Array",
    "ArrayLike",
    "CompressorFn",
    "DenoiseFn",
    "Float",
    "GuidanceFn",
    "Int",
    "Key",
    "LogProbFn",
    "ModelFn",
    "PyTree",
    "QuantizerFn",
    "ResampleFn",
    "RewardFn",
    "Schedule",
    "ScoreFn",
]


class ModelFn(Protocol):
    """`model_fn(x, t, **cond) -> output`: x of shape (batch, ...), t of shape (batch,); the
    output's kind (ε, x₀, v, score, velocity) is named where the model is used."""

    def __call__(self, x: Array, t: Array, **cond: Any) -> Array: ...


class DenoiseFn(Protocol):
    """`denoise(x, t, **cond) -> Prediction` at a scalar time t (see `as_denoiser`)."""

    def __call__(self, x: Array, t: Array, **cond: Any) -> Any: ...


class ScoreFn(Protocol):
    """`score_fn(x, t) -> ∇ log p_t(x)` on a batch: x of shape (n, d), t a scalar."""

    def __call__(self, x: Array, t: Array) -> Array: ...


class LogProbFn(Protocol):
    """`log_prob_fn(x, t) -> log p_t(x)` (up to a constant) of shape (n,), t a scalar."""

    def __call__(self, x: Array, t: Array) -> Array: ...


class RewardFn(Protocol):
    """`reward_fn(x) -> r`, one reward per sample, shape (n,)."""

    def __call__(self, x: Array) -> Array: ...


class ResampleFn(Protocol):
    """`resample_fn(key, log_weights, num_samples) -> ancestor indices` of shape (num_samples,)."""

    def __call__(self, key: jax.Array, log_weights: Array, num_samples: int) -> Array: ...


class GuidanceFn(Protocol):
    """`combine(cond, uncond, state, t) -> (prediction, state)`: merges the conditional and
    unconditional predictions at time t (the ``combine`` of a `Guidance`)."""

    def __call__(self, cond: Any, uncond: Any, state: Any, t: Array) -> tuple[Any, Any]: ...


class QuantizerFn(Protocol):
    """`quantizer(w) -> compressed leaf` implementing the compressed-tensor protocol."""

    def __call__(self, w: Array) -> Any: ...


class CompressorFn(Protocol):
    """`compressor(params, calibration=None) -> params` with compressed leaves (a recipe)."""

    def __call__(self, params: PyTree, calibration: Any = None) -> PyTree: ...


@runtime_checkable
class Schedule(Protocol):
    """A noise schedule x_t = α_t x₀ + σ_t ε, with the coefficients solvers read:

        log_snr = log(α²/σ²),  drift_coef f = d log α/dt,  beta g² = dσ²/dt − 2 f σ²,

    and the time derivatives of α and σ (probability-flow and flow solvers). `VPSchedule`
    (linear, cosine) and `RectifiedFlowSchedule` implement it.
    """

    def alpha(self, t: ArrayLike) -> Array: ...

    def sigma(self, t: ArrayLike) -> Array: ...

    def log_snr(self, t: ArrayLike) -> Array: ...

    def drift_coef(self, t: ArrayLike) -> Array: ...

    def beta(self, t: ArrayLike) -> Array: ...

    def dalpha_dt(self, t: ArrayLike) -> Array: ...

    def dsigma_dt(self, t: ArrayLike) -> Array: ...
