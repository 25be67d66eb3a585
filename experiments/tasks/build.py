"""Instantiate the group options of a config with the arguments only the task knows.

Each option is a ``_target_`` into a library factory; the schedule, the model's classifier, a
reward or calibration statistics are passed at instantiation (``hydra.utils.instantiate(node,
schedule=...)``). The ``none`` options (``_target_: null``) build to None. Keys in
`schemas.SETUP_KEYS` (``calibration``, ``reward``) configure the task and never reach a factory.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from feynkit.experiments.tasks.models import ModelBundle
from feynkit.experiments.tasks.schemas import SETUP_KEYS, import_target

__all__ = [
    "build_corrector",
    "build_guidance",
    "build_model",
    "build_quant",
    "build_solver",
    "is_none",
    "option_kwargs",
    "reward_fn",
    "target_name",
]


def target_name(node: Any) -> str | None:
    """The factory name of an option (``"apg"``), or None for a ``none`` option."""
    target = None if node is None else node.get("_target_")
    return None if target is None else str(target).rpartition(".")[2]


def is_none(node: Any) -> bool:
    return target_name(node) is None


def option_kwargs(node: DictConfig) -> dict[str, Any]:
    """The factory keyword arguments of an option (resolved; no `_target_`, no setup keys)."""
    d = OmegaConf.to_container(node, resolve=True)
    return {k: v for k, v in d.items() if not k.startswith("_") and k not in SETUP_KEYS}


def _partial(node: DictConfig) -> Any:
    """``instantiate(node, _partial_=True)`` without the setup keys: the factory with the
    option's values bound, for the task to call (e.g. a data generator ``(key, n)``)."""
    clean = OmegaConf.create(
        {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in SETUP_KEYS}
    )
    return instantiate(clean, _partial_=True, _convert_="all")


def _instantiate(node: DictConfig, **call_kwargs: Any) -> Any:
    """``instantiate`` without the setup keys, passing only the call-time arguments the factory
    accepts (e.g. `schedule` to `apg` but not to `cfg_pp`)."""
    fn = import_target(node._target_)
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in call_kwargs.items() if takes_any or k in params}
    # Objects (a schedule, functions) go to the partial, not through OmegaConf, which would
    # turn a dataclass schedule into a dict.
    return _partial(node)(**kwargs)


DATA_KINDS = {
    "gaussian_mixture_2d": "points2d",
    "two_moons": "points2d",
    "checkerboard": "points2d",
    "load_digits_split": "digits",
    "load_stdlib_corpus": "bytes",
}


def build_model(cfg: DictConfig, seed: int, smoke: bool) -> ModelBundle:
    """The model bundle of ``cfg.model``; a ``data`` option other than auto replaces the data
    its metrics compare with (reference samples, the held-out corpus)."""
    bundle = _instantiate(cfg.model, seed=seed, smoke=smoke)
    data = cfg.get("data")
    if data is None or is_none(data):
        return bundle
    kind = DATA_KINDS[target_name(data)]
    if kind == "bytes":
        bundle.extras["corpus"] = _instantiate(data)
    elif kind == "digits":
        split = _instantiate(data)
        bundle.reference = _labelled_reference(
            lambda key, n: _rows(key, n, split.x_test, split.y_test)
        )
    else:
        bundle.reference = _labelled_reference(_partial(data))
    return bundle


def _rows(key, n, x, y):
    idx = jax.random.choice(key, len(y), (n,), replace=n > len(y))
    return jnp.asarray(x)[idx], jnp.asarray(y)[idx]


def _labelled_reference(draw):
    """``reference(key, n, labels=None)`` from ``draw(key, n) -> (x, labels)``: with labels,
    rows of a larger draw with those labels (in order)."""

    def reference(key, n, labels=None):
        if labels is None:
            return draw(key, n)
        labels = np.asarray(labels)
        pool_x, pool_y = (np.asarray(a) for a in draw(key, 8 * len(labels) + 64))
        out = np.zeros((len(labels), *pool_x.shape[1:]), pool_x.dtype)
        for c in np.unique(labels):
            rows, want = pool_x[pool_y == c], np.nonzero(labels == c)[0]
            if len(rows) == 0:
                raise ValueError(f"the data option has no samples of class {c}.")
            out[want] = rows[np.arange(len(want)) % len(rows)]
        return jnp.asarray(out), jnp.asarray(labels)

    return reference


def build_solver(cfg: DictConfig, bundle: ModelBundle):
    return _instantiate(cfg.solver, schedule=bundle.schedule)


def build_guidance(cfg: DictConfig, bundle: ModelBundle, **extra: Any):
    """The `Guidance` of ``cfg.guidance`` (None for none and for classifier guidance, which
    wraps the model instead: see `classifier_model`)."""
    name = target_name(cfg.guidance)
    if name is None or name == "classifier_guided_model":
        return None
    interval = cfg.guidance.get("interval")
    kwargs = {"schedule": bundle.schedule, **extra}
    if interval is not None:
        kwargs["interval"] = tuple(interval)
    return _instantiate(cfg.guidance, **kwargs)


def classifier_model(cfg: DictConfig, bundle: ModelBundle, model_fn):
    """The denoiser guided by the bundle's classifier (prediction kind "prediction")."""
    from feynkit.inference.diffusion import as_denoiser

    denoise = as_denoiser(model_fn, bundle.schedule, bundle.prediction)
    return _instantiate(
        cfg.guidance,
        denoise_fn=denoise,
        logits_fn=bundle.classifier_logits,
        schedule=bundle.schedule,
    )


def reward_fn(cfg: DictConfig, bundle: ModelBundle, labels=None):
    """The FK-steering reward ``r(x) -> (n,)`` of ``corrector.reward`` (`labels` bound).

    kind "auto": the classifier's log-probability of the conditioning label at t = 0 where the
    model has a classifier, else minus the squared distance to ``reward.center``;
    "classifier" and "distance" choose one explicitly.
    """
    spec = cfg.corrector.get("reward") or {}
    kind = spec.get("kind", "auto")
    if kind == "auto":
        kind = "classifier" if bundle.classifier_logits is not None else "distance"
    if kind == "classifier":
        if bundle.classifier_logits is None:
            raise ValueError(
                f"corrector.reward.kind=classifier needs a model with a classifier; "
                f"{bundle.name} has none: use reward.kind=distance."
            )
        logits_fn = bundle.classifier_logits

        def classifier_reward(x, **_):
            logits = logits_fn(x, jnp.zeros(x.shape[:1], x.dtype))
            logp = jax.nn.log_softmax(logits, -1)
            lab = jnp.zeros(x.shape[:1], jnp.int32) if labels is None else jnp.asarray(labels)
            lab = jnp.clip(lab, 0, logits.shape[-1] - 1)
            return jnp.take_along_axis(logp, lab[:, None], -1)[:, 0]

        return classifier_reward
    if kind == "distance":
        center = jnp.asarray(spec.get("center", [0.0, 0.0]), jnp.float32)

        def distance_reward(x, **_):
            flat = x.reshape(x.shape[0], -1)
            c = jnp.zeros(flat.shape[1:], flat.dtype).at[: center.shape[0]].set(center)
            return -jnp.sum((flat - c) ** 2, -1)

        return distance_reward
    raise ValueError(f"corrector.reward.kind={kind!r}: choose auto, classifier or distance.")


def build_corrector(cfg: DictConfig, bundle: ModelBundle, labels=None):
    """The `Corrector` of ``cfg.corrector`` (None for none)."""
    if is_none(cfg.corrector):
        return None
    extra: dict[str, Any] = {"schedule": bundle.schedule}
    if target_name(cfg.corrector) == "fk_steering_corrector":
        extra["reward_fn"] = reward_fn(cfg, bundle, labels)
    return _instantiate(cfg.corrector, **extra)


def build_quant(cfg: DictConfig, bundle: ModelBundle):
    """The `QuantRecipe` of ``cfg.quant`` (None for none); ``where: null`` takes the model's
    quantizable kernels."""
    if is_none(cfg.quant):
        return None
    extra = {}
    if cfg.quant.get("where") is None:
        extra["where"] = bundle.quant_where
    return _instantiate(cfg.quant, **extra)


def compress_params(cfg: DictConfig, bundle: ModelBundle, key):
    """``(recipe, compressed params)`` of the bundle under ``cfg.quant``; calibration (when the
    recipe needs it) runs the model's own apply on ``quant.calibration.num_samples`` inputs."""
    recipe = build_quant(cfg, bundle)
    if recipe is None:
        return None, bundle.params
    calibration = None
    if getattr(recipe, "needs_calibration", False):
        from feynkit.compression.quant import calibrate

        n = int((cfg.quant.get("calibration") or {}).get("num_samples", 32))
        inputs = bundle.calibration_inputs(key, n)
        where = cfg.quant.get("where") or bundle.quant_where
        apply = bundle.calibration_apply or bundle.apply_fn
        calibration = calibrate(apply, bundle.params, inputs, where=where)
    return recipe, recipe(bundle.params, calibration=calibration)


def compressed_apply_fn(bundle: ModelBundle):
    """``apply_fn`` that accepts compressed parameters (the library's one mechanism)."""
    from feynkit.compression.quant import compressed_apply

    return compressed_apply(bundle.apply_fn)
