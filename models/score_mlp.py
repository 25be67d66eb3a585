"""Score/denoiser MLP with a sinusoidal time embedding and optional class conditioning.

The network maps (x_t, t, y) to an array of x's shape: an ε-prediction, a score or an x_0
prediction, whichever the training loss asks of it. Class labels are embedded with one extra
*null* label, index ``num_classes``, which stands for "no condition"; training with labels dropped
to the null label makes one network give both the conditional and the unconditional output that
classifier-free guidance combines,

    ε̃(x, t, y) = ε(x, t, ∅) + w (ε(x, t, y) − ε(x, t, ∅)).

Every model exposes its forward pass as a plain function of (params, inputs),
``model.forward(params, x, t, label=None)``, so that samplers, guidance and compressors treat
the parameters as data: ``functools.partial(model.forward, params)`` is a score function
``f(x, t, label=...)``.

References:
  Vaswani et al. (2017), "Attention Is All You Need" (sinusoidal embeddings);
  Ho et al. (2020), "Denoising Diffusion Probabilistic Models";
  Ho & Salimans (2022), "Classifier-Free Diffusion Guidance" (the null label).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax.numpy as jnp

from feynkit.core.types import Array, ArrayLike, Float, Int, Key, PyTree

__all__ = ["ScoreMLP", "TimeLabelEmbedding", "sinusoidal_embedding"]


def sinusoidal_embedding(
    t: Float[ArrayLike, "*batch"],
    dim: int,
    *,
    scale: float = 1000.0,
    max_period: float = 10_000.0,
) -> Float[Array, "*batch dim"]:
    """Sinusoidal embedding of a (continuous) time, as in Transformer positions and DDPM.

    e(t) = [cos(s t ω_0), …, cos(s t ω_{h−1}), sin(s t ω_0), …, sin(s t ω_{h−1})],
    ω_j = max_period^(−j/h), h = dim/2, s = ``scale`` (t ∈ [0, 1] is stretched to [0, 1000] so
    that the fastest frequencies resolve the diffusion time grid).

    Args:
      t: times, any shape.
      dim: embedding width, even.
      scale: multiplier applied to t before embedding.
      max_period: slowest period.

    Returns:
      The embedding, shape t.shape + (dim,), in t's floating dtype (float32 for integer t).

    References:
      Vaswani et al. (2017), "Attention Is All You Need", §3.5.
    """
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}.")
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.float32)
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=t.dtype) / half)
    args = (scale * t)[..., None] * freqs.reshape((1,) * t.ndim + (half,))
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimeLabelEmbedding(nn.Module):
    """Embedding of (t, label): an MLP on the sinusoidal time features plus a label embedding.

    emb = W₂ silu(W₁ e(t)) + E[y],  with E of num_classes + 1 rows, the last the null label.

    Attributes:
      features: output width.
      num_classes: number of classes, or None for an unconditional model (labels refused).
      time_features: width of the sinusoidal features.
    """

    features: int
    num_classes: int | None = None
    time_features: int = 64
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        t: Float[ArrayLike, "*batch"],
        label: Int[ArrayLike, "*batch"] | None,
        batch_shape: tuple[int, ...],
    ) -> Float[Array, "*batch features"]:
        t = jnp.broadcast_to(jnp.asarray(t, self.dtype), batch_shape)
        emb = sinusoidal_embedding(t, self.time_features)
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        emb = dense(self.features, name="time_in")(emb)
        emb = dense(self.features, name="time_out")(nn.silu(emb))
        if self.num_classes is None:
            if label is not None:
                raise ValueError("this model is unconditional (num_classes=None): got a label.")
            return emb
        if label is None:
            label = self.num_classes
        label = jnp.broadcast_to(jnp.asarray(label, jnp.int32), batch_shape)
        table = nn.Embed(
            self.num_classes + 1,
            self.features,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="label",
        )
        return emb + table(label)


class ScoreMLP(nn.Module):
    """Residual MLP f(x_t, t, y) with output of x's shape, conditioned on time and a class label.

    h_0 = W_in x;  h_{l+1} = h_l + W_l² silu(W_l¹ silu(LN(h_l)) + U_l emb);  out = W_out silu(h_L).

    Attributes:
      hidden: width of the residual stream.
      num_layers: number of residual blocks.
      num_classes: number of classes (label ``num_classes`` is the null label), or None.
      time_features: width of the sinusoidal time features.
      dtype: computation dtype (parameters stay in param_dtype).
      param_dtype: parameter dtype.

    Use ``model.init_params(key, dim)`` and ``model.forward(params, x, t, label=None)``; x has
    shape (..., dim), t and label broadcast to x.shape[:-1].
    """

    hidden: int = 128
    num_layers: int = 3
    num_classes: int | None = None
    time_features: int = 64
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Float[ArrayLike, "*batch dim"],
        t: Float[ArrayLike, "*batch"],
        label: Int[ArrayLike, "*batch"] | None = None,
    ) -> Float[Array, "*batch dim"]:
        x = jnp.asarray(x)
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        emb = TimeLabelEmbedding(
            self.hidden,
            self.num_classes,
            self.time_features,
            self.dtype,
            self.param_dtype,
            name="embed",
        )(t, label, x.shape[:-1])
        h = dense(self.hidden, name="input")(x)
        for i in range(self.num_layers):
            z = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=f"norm_{i}")(h)
            z = dense(self.hidden, name=f"block_{i}_in")(nn.silu(z))
            z = z + dense(self.hidden, name=f"cond_{i}")(emb)
            h = h + dense(self.hidden, name=f"block_{i}_out")(nn.silu(z))
        out = dense(x.shape[-1], name="output")(nn.silu(h))
        return out.astype(x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else out.dtype)

    @nn.nowrap
    def init_params(self, key: Key, dim: int) -> PyTree:
        """Parameters for inputs of width ``dim`` (the conditioning branch is always built)."""
        x = jnp.zeros((1, dim), self.dtype)
        label = None if self.num_classes is None else jnp.zeros((1,), jnp.int32)
        return self.init(key, x, jnp.zeros((1,)), label)["params"]

    @nn.nowrap
    def forward(
        self,
        params: PyTree,
        x: Float[ArrayLike, "*batch dim"],
        t: Float[ArrayLike, "*batch"],
        label: Int[ArrayLike, "*batch"] | None = None,
    ) -> Float[Array, "*batch dim"]:
        """f(x, t, label) under ``params``; label None (or ``num_classes``) is unconditional."""
        return self.apply({"params": params}, x, t, label)
