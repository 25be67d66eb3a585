"""A tiny TransformerLM shared by the quantization tests (widths divisible by 128)."""

import functools

import jax

from feynkit.models.transformer import TransformerLM

VOCAB = 64


@functools.cache
def tiny_lm():
    model = TransformerLM(
        vocab_size=VOCAB, d_model=128, num_layers=2, num_heads=4, mlp_dim=256, max_len=16
    )
    return model, jax.jit(model.init_params)(jax.random.key(0))


def tokens(seed: int, n: int = 4, t: int = 16):
    return jax.random.randint(jax.random.key(seed), (n, t), 0, VOCAB)
