"""feynkit: inference-time methods in JAX.

    import feynkit as fk
    fk.core.systematic_resample, fk.models.GaussianMixture, fk.inference.smc.fkc_sample

Subpackages: `core` (weights, resampling, schedules), `models` (analytic targets and Flax models),
`inference` (diffusion, smc, vi, decoding), `compression` (quant, prune, kernels) and
`experiments` (the Hydra entry point and paper replications; imported on demand).
"""

from feynkit import compression, core, inference, models

__version__ = "0.1.0"

__all__ = ["__version__", "compression", "core", "inference", "models"]
