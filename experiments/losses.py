"""Training losses, each ``loss_fn(params, batch, key) -> scalar`` (a mean over the batch).

  `denoising_score_loss`  ε-prediction ‖ε̂(α_t x₀ + σ_t ε, t, y) − ε‖², t ~ U[t_min, 1], labels
                          dropped to the null label for classifier-free guidance (ScoreMLP, UNet);
  `noisy_classifier_loss` cross-entropy of p_φ(y | x_t, t) on noised inputs (noise-aware
                          classifiers);
  `negative_elbo_loss`    −ELBO = KL(q(z|x) ‖ N(0, I)) − E_q log p(x|z) (VAE);
  `next_token_loss`       next-token cross-entropy (TransformerLM).

References:
  Ho et al. (2020), "Denoising Diffusion Probabilistic Models"; Ho & Salimans (2022),
  "Classifier-Free Diffusion Guidance"; Dhariwal & Nichol (2021), "Diffusion Models Beat GANs on
  Image Synthesis" (noise-aware classifiers); Kingma & Welling (2014), "Auto-Encoding Variational
  Bayes".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from feynkit.core.schedules import LinearSchedule, VPSchedule
from feynkit.core.types import Array, Float, Key, PyTree
from feynkit.models.vae import decoder_log_prob

__all__ = [
    "LossFn",
    "denoising_score_loss",
    "negative_elbo_loss",
    "next_token_loss",
    "noisy_classifier_loss",
    "vae_elbo",
]

LossFn = Callable[[PyTree, PyTree, Key], Array]


def _split_batch(batch: PyTree) -> tuple[Array, Array | None]:
    if isinstance(batch, tuple | list):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _noised(schedule: VPSchedule, x0: Array, t: Array, eps: Array) -> Array:
    shape = (x0.shape[0],) + (1,) * (x0.ndim - 1)
    return schedule.alpha(t).reshape(shape) * x0 + schedule.sigma(t).reshape(shape) * eps


def denoising_score_loss(
    apply_fn: Callable[..., Array],
    schedule: VPSchedule | None = None,
    num_classes: int | None = None,
    label_dropout: float = 0.1,
    t_min: float = 1e-3,
) -> LossFn:
    """ε-prediction denoising score matching, with label dropout for classifier-free guidance.

        L(θ) = E_{t ~ U[t_min, 1], ε ~ N(0, I)} mean ‖ε_θ(α_t x₀ + σ_t ε, t, ỹ) − ε‖²,

    ỹ = y, replaced by the null label ``num_classes`` with probability ``label_dropout``; the
    score is −ε_θ/σ_t. The batch is (x₀, y), or x₀ alone when ``num_classes`` is None.

    Args:
      apply_fn: ``apply_fn(params, x, t, label)``, e.g. ``ScoreMLP(...).forward``.
      schedule: the VP schedule (default `LinearSchedule()`).
      num_classes: classes of a conditional model, None for an unconditional one.
      label_dropout: probability of the null label.
      t_min: smallest training time.

    References:
      Ho et al. (2020), "Denoising Diffusion Probabilistic Models", eq. 14; Ho & Salimans (2022),
      "Classifier-Free Diffusion Guidance", Algorithm 1.
    """
    schedule = LinearSchedule() if schedule is None else schedule

    def loss_fn(params: PyTree, batch: PyTree, key: Key) -> Array:
        x0, labels = _split_batch(batch)
        k_t, k_eps, k_drop = jax.random.split(key, 3)
        b = x0.shape[0]
        t = jax.random.uniform(k_t, (b,), x0.dtype, minval=t_min, maxval=1.0)
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        if num_classes is None:
            labels = None
        else:
            drop = jax.random.bernoulli(k_drop, label_dropout, (b,))
            labels = jnp.where(drop, num_classes, labels)
        pred = apply_fn(params, _noised(schedule, x0, t, eps), t, labels)
        return jnp.mean((pred - eps) ** 2)

    return loss_fn


def noisy_classifier_loss(
    apply_fn: Callable[..., Array],
    schedule: VPSchedule | None = None,
    t_min: float = 1e-3,
    clean_fraction: float = 0.0,
) -> LossFn:
    """Cross-entropy of a noise-aware classifier on x_t = α_t x₀ + σ_t ε.

        L(φ) = E_{t, ε} −log softmax(f_φ(x_t, t))_y,   t ~ U[t_min, 1],

    except that a fraction ``clean_fraction`` of the batch is taken at t = 0 (clean inputs), which
    keeps the classifier sharp on data while it stays usable for guidance along the path.
    The batch is (x₀, y); ``apply_fn(params, x, t)`` returns logits.

    References:
      Dhariwal & Nichol (2021), "Diffusion Models Beat GANs on Image Synthesis", §4.1.
    """
    schedule = LinearSchedule() if schedule is None else schedule

    def loss_fn(params: PyTree, batch: PyTree, key: Key) -> Array:
        x0, labels = _split_batch(batch)
        k_t, k_eps, k_clean = jax.random.split(key, 3)
        b = x0.shape[0]
        t = jax.random.uniform(k_t, (b,), x0.dtype, minval=t_min, maxval=1.0)
        t = jnp.where(jax.random.bernoulli(k_clean, clean_fraction, (b,)), 0.0, t)
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        logits = apply_fn(params, _noised(schedule, x0, t, eps), t)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return loss_fn


def vae_elbo(model: Any, params: PyTree, key: Key, x: Array) -> Float[Array, " batch"]:
    """One-sample ELBO(x) = log p(x | z) − KL(N(μ, e^{logvar}) ‖ N(0, I)), z ~ q(z | x).

    The KL term is analytic: ½ Σ (e^{logvar} + μ² − 1 − logvar).
    """
    out = model.forward(params, key, x)
    rec = decoder_log_prob(x, out, model.likelihood, len(model.data_shape))
    kl = 0.5 * jnp.sum(jnp.exp(out.logvar) + out.mean**2 - 1.0 - out.logvar, axis=-1)
    return rec - kl


def negative_elbo_loss(model: Any) -> LossFn:
    """Mean −ELBO of a `models.VAE` over the batch (x, or (x, y) with y ignored).

    References:
      Kingma & Welling (2014), "Auto-Encoding Variational Bayes", eq. 10.
    """

    def loss_fn(params: PyTree, batch: PyTree, key: Key) -> Array:
        x, _ = _split_batch(batch)
        return -jnp.mean(vae_elbo(model, params, key, x))

    return loss_fn


def next_token_loss(apply_fn: Callable[[PyTree, Array], Array]) -> LossFn:
    """Mean next-token cross-entropy (nats/token); the batch is (inputs, targets), (B, T) each."""

    def loss_fn(params: PyTree, batch: PyTree, key: Key) -> Array:
        del key
        inputs, targets = batch
        logits = apply_fn(params, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    return loss_fn
