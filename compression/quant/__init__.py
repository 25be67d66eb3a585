"""Quantizers over parameter pytrees: packed `QuantizedArray`, round-to-nearest, GPTQ, and the
methods built on them (SmoothQuant, SVDQuant, SpQR, VPTQ, EoRA), DFloat11, integer-only ops and
KV-cache compression (GEAR, EMS).

Every container implements one protocol (`feynkit.compression.protocol`: ``dequantize()``,
``nbytes``, ``bits_per_weight``, ``matmul(x)``; `is_compressed`), so `dequantize_tree`,
`tree_nbytes`, `tree_bits_per_weight` and `compressed_apply` (a Flax model's own ``apply`` on
compressed parameters) serve all of them. A `QuantRecipe` (``rtn_recipe``, ``gptq_recipe``,
``spqr_recipe``, ``vptq_recipe``, ``smoothquant_recipe``, ``svdquant_recipe``,
``dfloat11_recipe``, ``eora_recipe``) compresses the leaves a regex path filter selects, with
statistics from `calibrate` (Hessians and activation maxima captured from the real model).
"""

from feynkit.compression.protocol import (
    CompressedTensor,
    ReshapedKernel,
    is_compressed,
)
from feynkit.compression.quant.apply import (
    compressed_apply,
    conv_patches,
    layer_inputs,
    quantized_apply,
)
from feynkit.compression.quant.calibration import (
    Calibration,
    calibrate,
    collect_inputs,
    collect_linear_inputs,
    linear_hessians,
)
from feynkit.compression.quant.gptq import gptq_quantize
from feynkit.compression.quant.qarray import (
    QuantizedArray,
    codes_of,
    compute_qparams,
    dequantize,
    dequantize_codes,
    fake_quantize,
    pack_int4,
    qrange,
    quantize,
    quantize_codes,
    quantize_with_params,
    unpack_int4,
)
from feynkit.compression.quant.quant_recipe import LeafStats, QuantRecipe
from feynkit.compression.quant.recipes import (
    RECIPES,
    dfloat11_recipe,
    eora_recipe,
    gptq_recipe,
    rtn_recipe,
    smoothquant_recipe,
    spqr_recipe,
    svdquant_recipe,
    vptq_recipe,
)
from feynkit.compression.quant.tree import (
    ALL_KERNELS,
    LINEAR_KERNELS,
    dequantize_tree,
    is_quantized,
    map_matching,
    match_paths,
    path_str,
    quantize_tree,
    tree_bits_per_weight,
    tree_nbytes,
    tree_paths,
)

__all__ = [
    "ALL_KERNELS",
    "Calibration",
    "CompressedTensor",
    "LINEAR_KERNELS",
    "LeafStats",
    "QuantRecipe",
    "QuantizedArray",
    "RECIPES",
    "ReshapedKernel",
    "calibrate",
    "codes_of",
    "collect_inputs",
    "collect_linear_inputs",
    "compressed_apply",
    "compute_qparams",
    "conv_patches",
    "dequantize",
    "dequantize_codes",
    "dequantize_tree",
    "dfloat11_recipe",
    "eora_recipe",
    "fake_quantize",
    "gptq_quantize",
    "gptq_recipe",
    "is_compressed",
    "is_quantized",
    "layer_inputs",
    "linear_hessians",
    "map_matching",
    "match_paths",
    "pack_int4",
    "path_str",
    "qrange",
    "quantize",
    "quantize_codes",
    "quantize_tree",
    "quantize_with_params",
    "quantized_apply",
    "rtn_recipe",
    "smoothquant_recipe",
    "spqr_recipe",
    "svdquant_recipe",
    "tree_bits_per_weight",
    "tree_nbytes",
    "tree_paths",
    "unpack_int4",
    "vptq_recipe",
]

from feynkit.compression.quant.dfloat11 import (  # noqa: E402
    DFloat11Array,
    build_huffman_code,
    compressed_nbytes,
    compression_ratio,
    dfloat11_compress,
    dfloat11_decompress,
    dfloat11_decompress_numpy,
    exponent_entropy,
    split_bf16,
)
from feynkit.compression.quant.eora import (  # noqa: E402
    LowRankCompensated,
    LowRankCompensation,
    activation_weighted_error,
    apply_compensation,
    eora_compensation,
    svd_compensation,
)
from feynkit.compression.quant.integer_ops import (  # noqa: E402
    exp_shift,
    i_layernorm,
    i_layernorm_error_bound,
    integer_sqrt,
    shift_exp_distortion,
    shift_gelu,
    shift_gelu_error_bound,
    shiftmax,
    shiftmax_error_bound,
)
from feynkit.compression.quant.kv_cache import (  # noqa: E402
    KVCompressor,
    ems_kv_compressor,
    gear_kv_compressor,
    identity_kv_compressor,
    lm_attention_probs,
    uniform_kv_compressor,
)
from feynkit.compression.quant.kv_ems import (  # noqa: E402
    EmsCache,
    ems_bytes,
    ems_compress,
    ems_expand,
    global_local_scores,
)
from feynkit.compression.quant.kv_gear import (  # noqa: E402
    GearTensor,
    compressed_bytes,
    fp16_bytes,
    gear_bytes,
    gear_compress,
    gear_decompress,
    num_outliers,
)
from feynkit.compression.quant.smoothquant import (  # noqa: E402
    SmoothQuantLinear,
    activation_absmax,
    quantize_activations,
    smooth_scales,
    smoothquant_apply,
    smoothquant_linear,
)
from feynkit.compression.quant.spqr import (  # noqa: E402
    SpQRArray,
    spqr_bits_per_weight,
    spqr_dequantize,
    spqr_quantize,
)
from feynkit.compression.quant.svdquant import (  # noqa: E402
    SVDQuantLinear,
    svdquant_apply,
    svdquant_linear,
)
from feynkit.compression.quant.vptq import (  # noqa: E402
    KMeansResult,
    VQArray,
    kmeans,
    vptq_quantize,
    vq_assign,
    vq_bits_per_weight,
    vq_dequantize,
)

__all__ += [
    "SmoothQuantLinear",
    "activation_absmax",
    "quantize_activations",
    "smooth_scales",
    "smoothquant_apply",
    "smoothquant_linear",
    "SVDQuantLinear",
    "svdquant_apply",
    "svdquant_linear",
    "SpQRArray",
    "spqr_bits_per_weight",
    "spqr_dequantize",
    "spqr_quantize",
    "KMeansResult",
    "VQArray",
    "kmeans",
    "vq_assign",
    "vq_bits_per_weight",
    "vq_dequantize",
    "vptq_quantize",
    "LowRankCompensated",
    "LowRankCompensation",
    "activation_weighted_error",
    "apply_compensation",
    "eora_compensation",
    "svd_compensation",
    "DFloat11Array",
    "build_huffman_code",
    "compressed_nbytes",
    "compression_ratio",
    "dfloat11_compress",
    "dfloat11_decompress",
    "dfloat11_decompress_numpy",
    "exponent_entropy",
    "split_bf16",
    "exp_shift",
    "i_layernorm",
    "i_layernorm_error_bound",
    "integer_sqrt",
    "shift_exp_distortion",
    "shift_gelu",
    "shift_gelu_error_bound",
    "shiftmax",
    "shiftmax_error_bound",
    "GearTensor",
    "compressed_bytes",
    "fp16_bytes",
    "gear_bytes",
    "gear_compress",
    "gear_decompress",
    "num_outliers",
    "EmsCache",
    "ems_bytes",
    "ems_compress",
    "ems_expand",
    "global_local_scores",
    "KVCompressor",
    "ems_kv_compressor",
    "gear_kv_compressor",
    "identity_kv_compressor",
    "lm_attention_probs",
    "uniform_kv_compressor",
]

from feynkit.compression.layerwise import compress_layerwise  # noqa: E402

__all__ += ["compress_layerwise"]
