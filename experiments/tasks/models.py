"""Model bundles: what the `model/` config group builds for the tasks.

A bundle holds one model in the form every task consumes — ``model_fn(x, t, **cond)`` for the
sampler, the parameters and the ``apply_fn(params, x, t, **cond)`` that re-binds them (so `quant`
can replace them by compressed ones), the prediction kind and schedule, the label layout for
guidance, and what the metrics compare against (an exact target, reference data, a judge).

Builders are the ``_target_`` of the ``configs/model/*.yaml`` options; they are called with the
YAML's values plus ``seed`` and ``smoke`` and return a `ModelBundle`. Their capabilities (kind,
analytic, classifier, experts) are attributes set by `model_option`, so `validate_combination`
reads them from the config before any model is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from feynkit.core.schedules import get_schedule
from feynkit.core.types import Array, PyTree

__all__ = [
    "ModelBundle",
    "byte_lm",
    "digits_unet",
    "gaussian_mixture",
    "model_option",
    "toy_mlp",
    "vae",
]


@dataclasses.dataclass
class ModelBundle:
    """One model, ready for the tasks.

    Attributes:
      name: the model's name (for tables and figures).
      kind: "diffusion", "lm" or "vae".
      apply_fn: ``apply_fn(params, x, t, **cond)`` (diffusion), ``apply_fn(params, tokens)`` (lm).
      params: the parameter pytree (None for an analytic model).
      prediction: the output kind of ``apply_fn`` ("eps", "score", ...).
      schedule: the noise schedule the model was trained on.
      x_shape: one sample's shape.
      num_classes: class labels 0..num_classes-1; ``null_label`` is the unconditional label.
      experts: ``(cond, uncond)`` keyword dicts of the two experts of a product, per sample
        ``(n,) -> dict`` (None: the model has no experts).
      classifier_logits: ``logits(x, t) -> (n, num_classes)`` of a noise-aware classifier.
      target: exact target and samplers (analytic models): see `gaussian_mixture`.
      reference: ``reference(key, n) -> (x, labels)`` data to compare samples with.
      judge: ``judge(x) -> (features, logits)`` for fd_digits and class accuracy.
      quant_where: default regex of the parameters a quantizer acts on.
      calibration_inputs: ``inputs(key, n) -> args`` of batched arrays for
        ``calibration_apply(params, *args)`` (default: ``apply_fn``), which `quant` calibrates on.
      extras: anything else a task may use (e.g. the LM corpus).
    """

    name: str
    kind: str
    apply_fn: Callable[..., Any]
    params: PyTree | None
    prediction: str = "eps"
    schedule: Any = None
    x_shape: tuple[int, ...] = ()
    num_classes: int | None = None
    null_label: int | None = None
    experts: Callable[[int], tuple[dict, dict]] | None = None
    classifier_logits: Callable[[Array, Array], Array] | None = None
    target: Any = None
    reference: Callable[..., tuple[Array, Array]] | None = None
    judge: Callable[[Array], tuple[Array, Array]] | None = None
    quant_where: Any = None
    calibration_inputs: Callable[..., tuple] | None = None
    calibration_apply: Callable[..., Any] | None = None
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    def model_fn(self, params: PyTree | None = None) -> Callable[..., Array]:
        """``model_fn(x, t, **cond)`` with `params` (default: the bundle's) bound."""
        p = self.params if params is None else params
        return lambda x, t, **cond: self.apply_fn(p, x, t, **cond)


def model_option(
    kind: str,
    *,
    analytic: bool = False,
    classifier: bool = False,
    experts: bool = False,
    data: str | None = None,
    config_class: type | None = None,
):
    """Mark a builder with what its model can do (read by `validate_combination`); `data` is
    the kind of ``data/`` option its metrics can use ("points2d", "digits", "bytes")."""

    def deco(fn):
        fn.kind = kind
        fn.data_kind = data
        fn.analytic = analytic
        fn.has_classifier = classifier
        fn.has_experts = experts
        if config_class is not None:
            fn.config_class = config_class
        return fn

    return deco


# ---------------------------------------------------------------------------------------------
# Analytic Gaussian mixtures
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MixtureTarget:
    """The exact mixture: ``base`` (all components, zero log-weights) and one log-weight row per
    label (classes, then the null label, then the two experts)."""

    mixture: Any  # GaussianMixture with the mixture's own weights
    table: np.ndarray  # (num_classes + 3, K) log-weights, -inf outside a sub-mixture
    classes: tuple[tuple[int, ...], ...]
    experts: tuple[tuple[int, ...], tuple[int, ...]]

    def sub(self, row: int):
        """The sub-mixture of label row `row` (class, null, expert)."""
        from feynkit.models import GaussianMixture

        lw = self.table[row]
        keep = np.nonzero(np.isfinite(lw))[0]
        vals, vecs = self.mixture.spectral()
        return GaussianMixture(
            jnp.asarray(lw[keep] - np.logaddexp.reduce(lw[keep])),
            self.mixture.means[keep],
            self.mixture.covs[keep],
            vals[keep],
            vecs[keep],
        )


def _mixture_eps(target: MixtureTarget, schedule: Any):
    """ε(x, t, label) = −σ_t ∇log p_t(x | label) of the VP-noised sub-mixture of each label."""

    def apply_fn(params, x, t, label=None):
        x = jnp.asarray(x)
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        n_rows = target.table.shape[0]
        null = len(target.classes)
        lab = jnp.full(x.shape[:1], null) if label is None else jnp.asarray(label)
        lw = jnp.asarray(target.table)[jnp.clip(lab, 0, n_rows - 1)]  # (n, K)

        def one(xi, ti, lwi):
            m = target.mixture.marginal(schedule, ti)
            comp = m.replace(log_weights=jnp.zeros_like(m.log_weights))
            r = jax.nn.softmax(comp.component_log_probs(xi) + lwi)
            per = -m.precision_matvec(xi[None] - m.means)
            return -schedule.sigma(ti) * jnp.sum(r[:, None] * per, 0)

        return jax.vmap(one)(x, t, lw)

    return apply_fn


@model_option("diffusion", analytic=True, classifier=True, experts=True, data="points2d")
def gaussian_mixture(
    *,
    dim: int = 2,
    weights: list[float],
    means: list[list[float]],
    scales: list[float],
    classes: list[list[int]],
    experts: list[list[int]],
    schedule: str = "linear",
    seed: int = 0,
    smoke: bool = False,
) -> ModelBundle:
    """An exact Gaussian mixture (`feynkit.models.GaussianMixture`) with 2-D `means` embedded in
    R^dim: analytic ε-prediction for every class, the null label and the two experts, the exact
    class posterior as classifier, exact samples as reference."""
    from feynkit.models import GaussianMixture

    m2 = np.asarray(means, np.float64)
    if m2.ndim != 2 or m2.shape[1] != 2 or dim < 2:
        raise ValueError(f"model.means must be a list of 2-D points and model.dim >= 2, got {m2}.")
    k = m2.shape[0]
    for name, groups in (("classes", classes), ("experts", experts)):
        flat = [i for g in groups for i in g]
        if not groups or any(not g for g in groups) or not all(0 <= i < k for i in flat):
            raise ValueError(
                f"model.{name} must be non-empty lists of component indices in [0, {k}), "
                f"got {groups}."
            )
    if len(experts) != 2:
        raise ValueError(f"model.experts needs exactly two sub-mixtures, got {len(experts)}.")
    mix = GaussianMixture.create(
        weights, np.concatenate([m2, np.zeros((k, dim - 2))], 1), scales=scales
    )
    rows = [*classes, list(range(k)), *experts]
    table = np.full((len(rows), k), -np.inf, np.float32)
    lw = np.asarray(mix.log_weights)
    for r, comps in enumerate(rows):
        table[r, comps] = lw[comps]
    target = MixtureTarget(mix, table, tuple(map(tuple, classes)), tuple(map(tuple, experts)))
    sched = get_schedule(schedule)
    c = len(classes)

    def classifier_logits(x, t):
        def one(xi, ti):
            comp = mix.marginal(sched, ti).component_log_probs(xi)  # (K,)
            return jax.vmap(lambda row: jax.nn.logsumexp(comp + row - lw))(
                jnp.asarray(target.table[:c])
            )

        return jax.vmap(one)(x, jnp.broadcast_to(t, x.shape[:1]))

    def reference(key, n, labels=None):
        if labels is None:
            return mix.sample_with_labels(key, n)
        return _class_samples(key, target, np.asarray(labels))

    def experts_fn(n):
        return {"label": jnp.full((n,), c + 1)}, {"label": jnp.full((n,), c + 2)}

    return ModelBundle(
        name=f"gmm{dim}d",
        kind="diffusion",
        apply_fn=_mixture_eps(target, sched),
        params=None,
        prediction="eps",
        schedule=sched,
        x_shape=(dim,),
        num_classes=c,
        null_label=c,
        experts=experts_fn,
        classifier_logits=classifier_logits,
        target=target,
        reference=reference,
    )


def _class_samples(key, target: MixtureTarget, labels: np.ndarray):
    """Exact draws with the given class labels (one batch per class, in label order)."""
    out = np.zeros((labels.shape[0], target.mixture.dim), np.float32)
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        draw = jax.jit(target.sub(int(c)).sample, static_argnums=1)
        out[idx] = np.asarray(draw(jax.random.fold_in(key, int(c)), len(idx)))
    return jnp.asarray(out), jnp.asarray(labels)


# ---------------------------------------------------------------------------------------------
# Learned models from the zoo
# ---------------------------------------------------------------------------------------------


def _zoo():
    from feynkit.experiments import zoo

    return zoo


def _config(cls: type, fields: dict[str, Any]):
    return cls(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in fields.items()})


def _toy_config_class():
    return _zoo().ToyModelConfig


@model_option("diffusion", data="points2d")
def toy_mlp(*, seed: int = 0, smoke: bool = False, **fields: Any) -> ModelBundle:
    """The class-conditional ScoreMLP of `zoo.trained_toy_model` (trained once, cached)."""
    zoo = _zoo()
    from feynkit.experiments.data import gaussian_mixture_2d

    ex = _config(zoo.ToyModelConfig, fields)
    model, cached = zoo.trained_toy_model(ex, seed, smoke=smoke)

    def apply_fn(params, x, t, label=None):
        return model.forward(params, x, t, label)

    from feynkit.experiments.data import circle_centers

    centers = circle_centers(ex.num_modes, ex.radius)

    def reference(key, n, labels=None):
        if labels is None:
            return gaussian_mixture_2d(key, n, ex.num_modes, ex.radius, ex.scale)
        labels = jnp.asarray(labels)
        noise = ex.scale * jax.random.normal(key, (labels.shape[0], 2))
        return centers[labels] + noise, labels

    return ModelBundle(
        name="toy_mlp",
        kind="diffusion",
        apply_fn=apply_fn,
        params=cached.params,
        prediction="eps",
        schedule=get_schedule("linear"),
        x_shape=(2,),
        num_classes=ex.num_modes,
        null_label=ex.num_modes,
        reference=reference,
        quant_where=r"(.*/)?kernel",
        calibration_inputs=_diffusion_calibration((2,), ex.num_modes),
        extras={"cached": cached, "centers": centers},
    )


@model_option("diffusion", classifier=True, data="digits")
def digits_unet(*, seed: int = 0, smoke: bool = False, **fields: Any) -> ModelBundle:
    """The digits UNet and noise-aware classifier of `zoo.trained_digits_models`."""
    zoo = _zoo()
    from feynkit.experiments.data import load_digits_split

    ex = _config(zoo.DigitsModelsConfig, fields)
    split = load_digits_split()
    (unet, classifier), cached = zoo.trained_digits_models(ex, seed, split, smoke=smoke)
    clf_params = cached["classifier"].params

    def apply_fn(params, x, t, label=None):
        return unet.forward(params, x, t, label)

    def reference(key, n, labels=None):
        idx = jax.random.choice(key, len(split.y_test), (n,), replace=n > len(split.y_test))
        return jnp.asarray(split.x_test)[idx], jnp.asarray(split.y_test)[idx]

    return ModelBundle(
        name="digits_unet",
        kind="diffusion",
        apply_fn=apply_fn,
        params=cached["unet"].params,
        prediction="eps",
        schedule=get_schedule("linear"),
        x_shape=tuple(split.x_train.shape[1:]),
        num_classes=zoo.DIGITS_NUM_CLASSES,
        null_label=zoo.DIGITS_NUM_CLASSES,
        classifier_logits=lambda x, t: classifier.forward(clf_params, x, t),
        reference=reference,
        judge=zoo.digits_judge(classifier, clf_params),
        quant_where=r"(.*/)?kernel",
        calibration_inputs=_diffusion_calibration(
            tuple(split.x_train.shape[1:]), zoo.DIGITS_NUM_CLASSES
        ),
        extras={"cached": cached, "split": split},
    )


def _diffusion_calibration(x_shape: tuple[int, ...], num_classes: int):
    """Noised inputs at uniform times with random labels: ``(x_t, t, label)``."""

    def inputs(key, n):
        kx, kt, kl = jax.random.split(key, 3)
        t = jax.random.uniform(kt, (n,), minval=0.05, maxval=0.95)
        return (
            jax.random.normal(kx, (n, *x_shape)),
            t,
            jax.random.randint(kl, (n,), 0, num_classes + 1),
        )

    return inputs


@model_option("lm", data="bytes")
def byte_lm(*, seed: int = 0, smoke: bool = False, **fields: Any) -> ModelBundle:
    """The byte-level TransformerLM of `zoo.trained_lm` and its corpus."""
    zoo = _zoo()
    from feynkit.compression.quant import LINEAR_KERNELS

    ex = _config(zoo.LMConfig, fields)
    corpus = zoo.lm_corpus(ex, smoke=smoke)
    model, cached = zoo.trained_lm(ex, seed, corpus, smoke=smoke)
    seq_len = zoo.LM_SMOKE["seq_len"] if smoke else ex.seq_len

    def inputs(key, n):
        from feynkit.experiments.data import token_windows

        return (token_windows(key, corpus.validation, n, seq_len)[0],)

    return ModelBundle(
        name="byte_lm",
        kind="lm",
        apply_fn=model.forward,
        params=cached.params,
        prediction="logits",
        x_shape=(seq_len,),
        quant_where=LINEAR_KERNELS,
        calibration_inputs=inputs,
        extras={"cached": cached, "corpus": corpus, "seq_len": seq_len, "model": model},
    )


@model_option("vae", data="digits")
def vae(*, seed: int = 0, smoke: bool = False, **fields: Any) -> ModelBundle:
    """The Bernoulli VAE of `zoo.trained_vae` on binarised digits."""
    zoo = _zoo()
    from feynkit.experiments.data import load_digits_split

    ex = _config(zoo.VAEModelConfig, fields)
    split = load_digits_split()
    model, cached = zoo.trained_vae(ex, seed, split, smoke=smoke)
    x_test = jnp.asarray(zoo.binarize(split.x_test))

    def inputs(key, n):
        return (x_test[:n],)

    return ModelBundle(
        name="vae",
        kind="vae",
        apply_fn=model.forward,
        params=cached.params,
        prediction="logits",
        x_shape=tuple(split.x_test.shape[1:]),
        quant_where=r"(.*/)?kernel",
        calibration_inputs=inputs,
        calibration_apply=lambda p, x: model.forward(p, jax.random.key(0), x),
        extras={"cached": cached, "model": model, "x_test": x_test},
    )


def _set_config_classes() -> None:
    # The zoo (helper of every trained model) is imported lazily; its config dataclasses give
    # the schemas of the learned models' options.
    try:
        zoo = _zoo()
    except ImportError:  # pragma: no cover - the zoo is part of the package
        return
    toy_mlp.config_class = zoo.ToyModelConfig
    digits_unet.config_class = zoo.DigitsModelsConfig
    byte_lm.config_class = zoo.LMConfig
    vae.config_class = zoo.VAEModelConfig


_set_config_classes()
