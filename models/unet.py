"""A small UNet for tiny images (8×8, NHWC) with time embedding and an optional class label.

Two resolutions (8×8 → 4×4 → 8×8) of residual blocks. Each block takes the (t, y) embedding as
a per-channel scale and shift after its second GroupNorm (Dhariwal & Nichol's scale-shift norm);
the skip from the encoder is concatenated before the decoder block. The class embedding has a
null label, index ``num_classes``, for classifier-free guidance (see `feynkit.models.score_mlp`).

References:
  Ronneberger et al. (2015), "U-Net: Convolutional Networks for Biomedical Image Segmentation";
  Ho et al. (2020), "Denoising Diffusion Probabilistic Models" (the time-conditioned ResBlock);
  Dhariwal & Nichol (2021), "Diffusion Models Beat GANs on Image Synthesis" (scale-shift norm);
  Ho & Salimans (2022), "Classifier-Free Diffusion Guidance".
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from feynkit.core.types import Array, ArrayLike, Float, Int, Key, PyTree
from feynkit.models.score_mlp import TimeLabelEmbedding

__all__ = ["ResBlock", "UNet"]


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


class ResBlock(nn.Module):
    """h ↦ skip(h) + conv(silu(GN(conv(silu(GN(h)))) ⊙ (1 + a) + b)),  [a, b] = W silu(emb).

    Attributes:
      channels: output channels.
    """

    channels: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, h: Float[Array, "b h w c"], emb: Float[Array, "b e"]
    ) -> Float[Array, "b h w channels"]:
        conv = functools.partial(
            nn.Conv, self.channels, (3, 3), dtype=self.dtype, param_dtype=self.param_dtype
        )
        norm = functools.partial(nn.GroupNorm, dtype=self.dtype, param_dtype=self.param_dtype)
        z = norm(num_groups=_groups(h.shape[-1]), name="norm_in")(h)
        z = conv(name="conv_in")(nn.silu(z))
        # Scale-shift after the norm: a shift added before GroupNorm would be normalised away.
        film = nn.Dense(2 * self.channels, dtype=self.dtype, param_dtype=self.param_dtype)(
            nn.silu(emb)
        )
        scale, shift = jnp.split(film[:, None, None, :], 2, axis=-1)
        z = norm(num_groups=_groups(self.channels), name="norm_out")(z) * (1 + scale) + shift
        z = conv(name="conv_out")(nn.silu(z))
        if h.shape[-1] != self.channels:
            h = nn.Conv(
                self.channels, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype, name="skip"
            )(h)
        return h + z


class UNet(nn.Module):
    """UNet ε(x_t, t, y) for images (B, H, W, C) with H, W even (8×8×1 by default use).

    Attributes:
      channels: channels at full resolution (twice that at half resolution).
      num_classes: number of classes (label ``num_classes`` is the null label), or None.
      time_features: width of the sinusoidal time features.
      dtype, param_dtype: computation and parameter dtypes.

    Use ``model.init_params(key, (8, 8, 1))`` and ``model.forward(params, x, t, label=None)``;
    t and label are scalars or shape (B,). The output has x's shape.
    """

    channels: int = 32
    num_classes: int | None = None
    time_features: int = 64
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Float[ArrayLike, "b h w c"],
        t: Float[ArrayLike, "*b"],
        label: Int[ArrayLike, "*b"] | None = None,
    ) -> Float[Array, "b h w c"]:
        x = jnp.asarray(x)
        if x.ndim != 4 or x.shape[1] % 2 or x.shape[2] % 2:
            raise ValueError(f"x must be (B, H, W, C) with H and W even, got {x.shape}.")
        c = self.channels
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = TimeLabelEmbedding(4 * c, self.num_classes, self.time_features, name="embed", **kw)(
            t, label, x.shape[:1]
        )

        h = nn.Conv(c, (3, 3), name="conv_in", **kw)(x)
        skip = ResBlock(c, name="down_0", **kw)(h, emb)
        h = nn.Conv(2 * c, (3, 3), strides=(2, 2), name="downsample", **kw)(skip)
        h = ResBlock(2 * c, name="down_1", **kw)(h, emb)
        h = ResBlock(2 * c, name="mid", **kw)(h, emb)
        b, hh, ww, ch = h.shape
        h = jax.image.resize(h, (b, 2 * hh, 2 * ww, ch), method="nearest")
        h = nn.Conv(c, (3, 3), name="upsample", **kw)(h)
        h = ResBlock(c, name="up_0", **kw)(jnp.concatenate([h, skip], axis=-1), emb)
        h = nn.GroupNorm(num_groups=_groups(c), name="norm_out", **kw)(h)
        out = nn.Conv(x.shape[-1], (3, 3), name="conv_out", **kw)(nn.silu(h))
        return out.astype(x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else out.dtype)

    @nn.nowrap
    def init_params(self, key: Key, image_shape: tuple[int, int, int] = (8, 8, 1)) -> PyTree:
        """Parameters for images of shape ``image_shape`` = (H, W, C)."""
        x = jnp.zeros((1, *image_shape), self.dtype)
        label = None if self.num_classes is None else jnp.zeros((1,), jnp.int32)
        return self.init(key, x, jnp.zeros((1,)), label)["params"]

    @nn.nowrap
    def forward(
        self,
        params: PyTree,
        x: Float[ArrayLike, "b h w c"],
        t: Float[ArrayLike, "*b"],
        label: Int[ArrayLike, "*b"] | None = None,
    ) -> Float[Array, "b h w c"]:
        """ε(x, t, label) under ``params``; label None (or ``num_classes``) is unconditional."""
        return self.apply({"params": params}, x, t, label)
