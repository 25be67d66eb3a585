"""Models: analytic targets (Gaussian mixtures with exact scores) and Flax networks.

Every Flax model exposes plain functions of (params, inputs): ``model.init_params(key, ...)``
and ``model.forward(params, ...)`` (the LM adds ``init_cache`` and ``step``), so samplers,
guidance and compressors treat parameters as data.
"""

from feynkit.models.classifier import ImageClassifier, PointClassifier
from feynkit.models.exact_samplers import rejection_sample, sample_guided, sample_tempered
from feynkit.models.safetensors_io import (
    hf_to_lm_params,
    lm_from_hf_config,
    lm_params_to_hf,
    load_lm_safetensors,
    load_safetensors,
    load_safetensors_metadata,
    save_lm_safetensors,
    save_safetensors,
)
from feynkit.models.score_mlp import ScoreMLP, TimeLabelEmbedding, sinusoidal_embedding
from feynkit.models.targets import GaussianMixture
from feynkit.models.transformer import (
    KVCache,
    RMSNorm,
    TransformerLM,
    apply_rope,
    rope_cos_sin,
    rotate_half,
)
from feynkit.models.unet import ResBlock, UNet
from feynkit.models.vae import VAE, VAEOutput, decoder_log_prob, reparameterize

__all__ = [
    "VAE",
    "GaussianMixture",
    "ImageClassifier",
    "KVCache",
    "PointClassifier",
    "RMSNorm",
    "ResBlock",
    "ScoreMLP",
    "TimeLabelEmbedding",
    "TransformerLM",
    "UNet",
    "VAEOutput",
    "apply_rope",
    "decoder_log_prob",
    "hf_to_lm_params",
    "lm_from_hf_config",
    "lm_params_to_hf",
    "load_lm_safetensors",
    "load_safetensors",
    "load_safetensors_metadata",
    "rejection_sample",
    "reparameterize",
    "rope_cos_sin",
    "rotate_half",
    "save_lm_safetensors",
    "sample_guided",
    "sample_tempered",
    "save_safetensors",
    "sinusoidal_embedding",
]
