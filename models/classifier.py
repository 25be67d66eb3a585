"""Noise-aware classifiers p_φ(y | x_t, t) for classifier guidance.

A classifier trained on noised inputs x_t = α_t x_0 + σ_t ε (with t drawn like in diffusion
training) supplies the guidance term of the conditional score,

    ∇_x log p_t(x | y) = ∇_x log p_t(x) + w ∇_x log p_φ(y | x, t),

with ∇_x log p_φ obtained by `jax.grad` of ``log_softmax(model.forward(params, x, t))[y]``.
Two architectures: an MLP for points in R^d and a small conv net for 8×8 images (NHWC).

References:
  Dhariwal & Nichol (2021), "Diffusion Models Beat GANs on Image Synthesis", §4;
  Song et al. (2021), "Score-Based Generative Modeling through SDEs", §5 and App. I.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax.numpy as jnp

from feynkit.core.types import Array, ArrayLike, Float, Key, PyTree
from feynkit.models.score_mlp import TimeLabelEmbedding

__all__ = ["ImageClassifier", "PointClassifier"]


class PointClassifier(nn.Module):
    """MLP logits(x_t, t) for points x_t of shape (..., d).

    h_0 = W_in x + emb(t);  h_{l+1} = h_l + W_l silu(LN(h_l));  logits = W_out silu(h_L).

    Attributes:
      num_classes: number of classes (logits width).
      hidden: width; num_layers: residual blocks; time_features: sinusoidal width.
    """

    num_classes: int
    hidden: int = 128
    num_layers: int = 2
    time_features: int = 64
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[ArrayLike, "*batch d"], t: Float[ArrayLike, "*batch"]
    ) -> Float[Array, "*batch num_classes"]:
        x = jnp.asarray(x)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dense = functools.partial(nn.Dense, **kw)
        emb = TimeLabelEmbedding(self.hidden, None, self.time_features, name="embed", **kw)(
            t, None, x.shape[:-1]
        )
        h = dense(self.hidden, name="input")(x) + emb
        for i in range(self.num_layers):
            z = nn.LayerNorm(name=f"norm_{i}", **kw)(h)
            h = h + dense(self.hidden, name=f"block_{i}")(nn.silu(z))
        return dense(self.num_classes, name="logits")(nn.silu(h))

    @nn.nowrap
    def init_params(self, key: Key, dim: int) -> PyTree:
        """Parameters for points of dimension ``dim``."""
        return self.init(key, jnp.zeros((1, dim), self.dtype), jnp.zeros((1,)))["params"]

    @nn.nowrap
    def forward(
        self, params: PyTree, x: Float[ArrayLike, "*batch d"], t: Float[ArrayLike, "*batch"]
    ) -> Float[Array, "*batch num_classes"]:
        """Logits of p_φ(y | x_t, t) under ``params``."""
        return self.apply({"params": params}, x, t)


class ImageClassifier(nn.Module):
    """Conv-net logits(x_t, t) for images (B, H, W, C), H and W even (8×8×1 in use).

    conv → GN → [+emb] → conv stride 2 → conv → global mean pool → dense, with GroupNorm and SiLU.

    Attributes:
      num_classes: number of classes; channels: width at full resolution (2× at half).
    """

    num_classes: int
    channels: int = 32
    time_features: int = 64
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[ArrayLike, "b h w c"], t: Float[ArrayLike, "*b"]
    ) -> Float[Array, "b num_classes"]:
        x = jnp.asarray(x)
        if x.ndim != 4:
            raise ValueError(f"x must be (B, H, W, C), got shape {x.shape}.")
        c = self.channels
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = TimeLabelEmbedding(c, None, self.time_features, name="embed", **kw)(
            t, None, x.shape[:1]
        )
        h = nn.Conv(c, (3, 3), name="conv_0", **kw)(x)
        # The time enters after the norm, which would otherwise remove a per-channel shift.
        h = nn.GroupNorm(num_groups=math.gcd(8, c), name="norm_0", **kw)(h)
        h = nn.silu(h + emb[:, None, None, :])
        h = nn.Conv(2 * c, (3, 3), strides=(2, 2), name="conv_1", **kw)(h)
        h = nn.silu(nn.GroupNorm(num_groups=math.gcd(8, 2 * c), name="norm_1", **kw)(h))
        h = nn.Conv(2 * c, (3, 3), name="conv_2", **kw)(h)
        h = nn.silu(h).mean(axis=(1, 2))
        return nn.Dense(self.num_classes, name="logits", **kw)(h)

    @nn.nowrap
    def init_params(self, key: Key, image_shape: tuple[int, int, int] = (8, 8, 1)) -> PyTree:
        """Parameters for images of shape ``image_shape`` = (H, W, C)."""
        x = jnp.zeros((1, *image_shape), self.dtype)
        return self.init(key, x, jnp.zeros((1,)))["params"]

    @nn.nowrap
    def forward(
        self, params: PyTree, x: Float[ArrayLike, "b h w c"], t: Float[ArrayLike, "*b"]
    ) -> Float[Array, "b num_classes"]:
        """Logits of p_φ(y | x_t, t) under ``params``."""
        return self.apply({"params": params}, x, t)
