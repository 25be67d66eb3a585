"""Model compression: `quant` (quantizers), `prune` (masks) and `kernels` (Pallas).

`protocol` is the one interface of every compressed container (dequantize, bytes, bits per
weight, the matmul it serves; `is_compressed`).

`hessian` holds the second-order machinery (damped inverse-Hessian Cholesky, the OBS/GPTQ
column sweep) shared by GPTQ, SpQR and the pruning methods.
"""

if __name__ == "compression":
    # Run from the repository root, this directory can shadow the top-level `compression`
    # module (Python 3.14's stdlib, backports.zstd) that JAX probes with `from compression
    # import zstd` inside try/except ImportError: refuse to be that module.
    raise ImportError("the repository's compression/ is feynkit.compression, not `compression`")

from feynkit.compression import hessian, protocol, quant  # noqa: E402
from feynkit.compression.hessian import (  # noqa: E402
    damped_hessian,
    dead_columns,
    inverse_hessian_cholesky,
    obs_sweep,
)
from feynkit.compression.protocol import CompressedTensor, is_compressed  # noqa: E402

__all__ = [
    "CompressedTensor",
    "damped_hessian",
    "dead_columns",
    "hessian",
    "inverse_hessian_cholesky",
    "is_compressed",
    "obs_sweep",
    "protocol",
    "quant",
]
