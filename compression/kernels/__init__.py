"""Pallas kernels for the compressed hot paths (Triton lowering on GPU, interpret mode on CPU).

* `quantized_matmul`: weight-only x @ dequant(Wq) for int2..int8 codes (int4 packed two per
  byte), per-group scales and zero points, dequantized in registers, split-K for decode batches;
  `QuantizedArray.matmul` dispatches to it.
* `svdquant_fused`: SVDQuant's 4-bit residual product and its low-rank branch in one kernel;
  `SVDQuantLinear.matmul` / `svdquant_apply` dispatch to it.
* `dfloat11_decode`: block-parallel Huffman decode of DFloat11 exponents, bit-exact;
  `dfloat11_decompress` (and so `DFloat11Array.dequantize` / ``matmul``) dispatches to it.
* `w8a8_matmul`: int8 × int8 → int32 and fp8 e4m3 products with per-token × per-channel scales.

Every wrapper takes ``implementation`` in {"pallas", "reference", None}: None runs the kernel on
a GPU backend and the pure-JAX ``*_reference`` elsewhere; "pallas" off a GPU runs interpret mode.
"""

from feynkit.compression.kernels._common import resolve_implementation
from feynkit.compression.kernels.dfloat11_decode import (
    DecodeBlocks,
    dfloat11_decode,
    dfloat11_decode_reference,
)
from feynkit.compression.kernels.quantized_matmul import (
    QMatmulBlocks,
    quantized_matmul,
    weight_only_matmul,
    weight_only_matmul_reference,
)
from feynkit.compression.kernels.svdquant_fused import (
    svdquant_fused_matmul,
    svdquant_fused_matmul_reference,
)
from feynkit.compression.kernels.w8a8_matmul import (
    quantize_per_channel,
    quantize_per_token,
    w8a8_matmul,
    w8a8_matmul_reference,
)

__all__ = [
    "DecodeBlocks",
    "QMatmulBlocks",
    "dfloat11_decode",
    "dfloat11_decode_reference",
    "quantize_per_channel",
    "quantize_per_token",
    "quantized_matmul",
    "resolve_implementation",
    "svdquant_fused_matmul",
    "svdquant_fused_matmul_reference",
    "w8a8_matmul",
    "w8a8_matmul_reference",
    "weight_only_matmul",
    "weight_only_matmul_reference",
]
