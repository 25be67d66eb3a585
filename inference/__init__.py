"""Inference-time methods: `smc` (Feynman–Kac/SMC), `diffusion`, `vi`, `decoding`."""

from feynkit.inference import smc

__all__ = ["smc"]
