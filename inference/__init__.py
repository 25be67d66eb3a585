"""Inference-time methods: `smc` (Feynman–Kac/SMC), `diffusion`, `vi`, `decoding`."""

from feynkit.inference import diffusion, smc, vi

__all__ = ["diffusion", "smc", "vi"]
