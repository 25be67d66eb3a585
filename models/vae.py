"""Variational autoencoder with MLP encoder and decoder.

Encoder q_φ(z | x) = N(μ_φ(x), diag exp(logvar_φ(x))); a sample is reparameterised with an
explicit key, z = μ + exp(logvar / 2) ⊙ ε, ε ~ N(0, I), so gradients reach φ through z. The
decoder p_θ(x | z) is Bernoulli (it returns logits) or Gaussian (it returns a mean, with a learned
per-dimension log-variance). A forward pass returns everything an ELBO estimate needs,

    ELBO(x) = E_q[log p_θ(x | z)] − KL(q_φ(z | x) ‖ N(0, I)),

namely (μ, logvar, z, reconstruction, decoder log-variance); `decoder_log_prob` evaluates
log p_θ(x | z) from it.

References:
  Kingma & Welling (2014), "Auto-Encoding Variational Bayes";
  Rezende, Mohamed & Wierstra (2014), "Stochastic Backpropagation and Approximate Inference in
  Deep Generative Models".
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from feynkit.core.types import Array, ArrayLike, Float, Key, PyTree

__all__ = ["VAE", "VAEOutput", "decoder_log_prob", "reparameterize"]

_LIKELIHOODS = ("bernoulli", "gaussian")


class VAEOutput(NamedTuple):
    """What one VAE forward pass hands to an ELBO.

    Attributes:
      mean, logvar: parameters of q(z | x), shape (..., latent_dim).
      z: the reparameterised sample, shape (..., latent_dim).
      recon: decoder output of x's shape: Bernoulli logits or the Gaussian mean.
      recon_logvar: Gaussian decoder log-variance of x's shape (zeros for Bernoulli).
    """

    mean: Array
    logvar: Array
    z: Array
    recon: Array
    recon_logvar: Array


def reparameterize(
    key: Key, mean: Float[ArrayLike, "*batch k"], logvar: Float[ArrayLike, "*batch k"]
) -> Float[Array, "*batch k"]:
    """z = μ + exp(logvar / 2) ⊙ ε with ε ~ N(0, I) drawn from ``key``.

    References:
      Kingma & Welling (2014), "Auto-Encoding Variational Bayes", §2.4.
    """
    mean = jnp.asarray(mean)
    eps = jax.random.normal(key, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * jnp.asarray(logvar)) * eps


def decoder_log_prob(
    x: Float[ArrayLike, "*batch"], output: VAEOutput, likelihood: str, data_ndim: int
) -> Float[Array, "*lead"]:
    """log p_θ(x | z) summed over the ``data_ndim`` trailing (data) axes.

    Bernoulli: Σ x log σ(ℓ) + (1 − x) log σ(−ℓ) with ℓ the logits (x in [0, 1]).
    Gaussian: Σ −½ [log 2π + s + (x − m)² e^{−s}] with m the mean and s the log-variance.
    """
    x = jnp.asarray(x)
    axes = tuple(range(x.ndim - data_ndim, x.ndim))
    if likelihood == "bernoulli":
        logits = output.recon
        ll = x * jax.nn.log_sigmoid(logits) + (1 - x) * jax.nn.log_sigmoid(-logits)
    elif likelihood == "gaussian":
        s = output.recon_logvar
        ll = -0.5 * (math.log(2 * math.pi) + s + (x - output.recon) ** 2 * jnp.exp(-s))
    else:
        raise ValueError(f"likelihood must be one of {_LIKELIHOODS}, got {likelihood!r}.")
    return ll.sum(axis=axes)


class _MLP(nn.Module):
    hidden: tuple[int, ...]
    out: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, h: Array) -> Array:
        for i, width in enumerate(self.hidden):
            h = nn.silu(
                nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name=f"dense_{i}")(
                    h
                )
            )
        return nn.Dense(self.out, dtype=self.dtype, param_dtype=self.param_dtype, name="out")(h)


class VAE(nn.Module):
    """VAE on data of shape ``data_shape`` (flattened for the MLPs), latent of ``latent_dim``.

    Attributes:
      data_shape: shape of one datum, e.g. (2,) or (8, 8, 1).
      latent_dim: dimension of z.
      hidden: widths of the encoder's hidden layers (the decoder mirrors them).
      likelihood: "bernoulli" (decoder returns logits) or "gaussian" (mean + learned logvar).

    Use ``model.init_params(key)``, ``model.forward(params, key, x) -> VAEOutput``,
    ``model.encode(params, x) -> (mean, logvar)`` and ``model.decode(params, z) -> recon``.
    """

    data_shape: tuple[int, ...]
    latent_dim: int = 8
    hidden: tuple[int, ...] = (128, 128)
    likelihood: str = "bernoulli"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        if self.likelihood not in _LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {_LIKELIHOODS}, got {self.likelihood!r}.")
        size = math.prod(self.data_shape)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = _MLP(tuple(self.hidden), 2 * self.latent_dim, **kw)
        self.decoder = _MLP(tuple(reversed(self.hidden)), size, **kw)
        if self.likelihood == "gaussian":
            self.decoder_logvar = self.param(
                "decoder_logvar", nn.initializers.zeros, (size,), self.param_dtype
            )

    def _encode(self, x: Array) -> tuple[Array, Array]:
        x = jnp.asarray(x)
        lead = x.shape[: x.ndim - len(self.data_shape)]
        if x.shape[len(lead) :] != tuple(self.data_shape):
            raise ValueError(f"x must end in data_shape {self.data_shape}, got {x.shape}.")
        h = self.encoder(x.reshape(*lead, -1))
        return h[..., : self.latent_dim], h[..., self.latent_dim :]

    def _decode(self, z: Array) -> tuple[Array, Array]:
        lead = z.shape[:-1]
        recon = self.decoder(z).reshape(*lead, *self.data_shape)
        if self.likelihood == "gaussian":
            logvar = self.decoder_logvar.astype(recon.dtype).reshape(self.data_shape)
            logvar = jnp.broadcast_to(logvar, recon.shape)
        else:
            logvar = jnp.zeros_like(recon)
        return recon, logvar

    def __call__(self, key: Key, x: Float[ArrayLike, "*batch"]) -> VAEOutput:
        mean, logvar = self._encode(x)
        z = reparameterize(key, mean, logvar)
        recon, recon_logvar = self._decode(z)
        return VAEOutput(mean, logvar, z, recon, recon_logvar)

    @nn.nowrap
    def init_params(self, key: Key) -> PyTree:
        """Parameters (initialised on one zero datum)."""
        x = jnp.zeros((1, *self.data_shape), self.dtype)
        return self.init(key, jax.random.key(0), x)["params"]

    @nn.nowrap
    def forward(self, params: PyTree, key: Key, x: Float[ArrayLike, "*batch"]) -> VAEOutput:
        """Encode x, draw z ~ q(z | x) with ``key``, decode z."""
        return self.apply({"params": params}, key, x)

    @nn.nowrap
    def encode(
        self, params: PyTree, x: Float[ArrayLike, "*batch"]
    ) -> tuple[Float[Array, "*lead k"], Float[Array, "*lead k"]]:
        """(μ_φ(x), logvar_φ(x))."""
        return self.apply({"params": params}, x, method="_encode")

    @nn.nowrap
    def decode(self, params: PyTree, z: Float[ArrayLike, "*lead k"]) -> Float[Array, "*batch"]:
        """Decoder output for z (Bernoulli logits or Gaussian mean), shape (*lead, *data_shape)."""
        return self.apply({"params": params}, jnp.asarray(z), method="_decode")[0]
