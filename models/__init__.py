"""Models: analytic targets (Gaussian mixtures with exact scores); Flax models follow."""

from feynkit.models.targets import GaussianMixture

__all__ = ["GaussianMixture"]
