"""Diffusion sampling: predictions, one sampler loop, solvers, guidance, Tweedie, inversion."""

from feynkit.inference.diffusion.prediction import (
    PREDICTION_KINDS,
    Prediction,
    as_denoiser,
    from_prediction,
    to_prediction,
)
from feynkit.inference.diffusion.sampler import (
    Guidance,
    PredictFn,
    SampleInfo,
    Solver,
    guided_predict_fn,
    sample,
    time_grid,
)
from feynkit.inference.diffusion.solvers import ddim

__all__ = [
    "PREDICTION_KINDS",
    "Guidance",
    "PredictFn",
    "Prediction",
    "SampleInfo",
    "Solver",
    "as_denoiser",
    "ddim",
    "from_prediction",
    "guided_predict_fn",
    "sample",
    "time_grid",
    "to_prediction",
]
