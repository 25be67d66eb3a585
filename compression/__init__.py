"""Model compression: `quant` (quantizers), `prune` (masks) and `kernels` (Pallas)."""

__all__: list[str] = []
