"""The model zoo: trained-and-cached models that replications, benchmarks and tasks share.

Each loader returns the model (a Flax module) and a `train.CachedModel` from the config-hash
model cache (`train.cached_train`): a hit restores the parameters, a miss trains and stores them.

  `trained_toy_model`      class-conditional ScoreMLP on the 2-D mixture of 8 Gaussians
                           (ε-prediction, linear VP schedule);
  `trained_digits_models`  class-conditional UNet on 8x8 digits and a noise-aware classifier;
  `digits_judge`           the classifier as feature extractor (fd_digits) and judge;
  `trained_lm`             byte-level TransformerLM on the Python standard library's source;
  `load_lm`                `trained_lm` with its corpus, for a replication config with
                           ``cache_dir`` and ``lm_smoke``;
  `trained_draft_lm`       a smaller byte LM (same recipe) as a speculative-decoding draft;
  `trained_medusa_heads`   Medusa-1 heads trained on the frozen byte LM;
  `trained_vae`            Bernoulli VAE on binarised digits.

A loader's `ex` is its model config (`ToyModelConfig`, `DigitsModelsConfig`, `LMConfig`,
`VAEModelConfig`) or any config carrying those fields (a replication's config subclasses the
model config); only the fields that define the model are read, and the cache key is built from
them, so every caller with the same model settings shares one cache entry.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from feynkit.core.schedules import LinearSchedule
from feynkit.experiments import train as tr
from feynkit.experiments.data import (
    BYTE_VOCAB_SIZE,
    TextCorpus,
    gaussian_mixture_2d,
    load_digits_split,
    load_stdlib_corpus,
    split_files,
    stdlib_source_files,
)
from feynkit.models import VAE, ImageClassifier, ScoreMLP, TransformerLM, UNet, decoder_log_prob

__all__ = [
    "DIGITS_NUM_CLASSES",
    "LM_SMOKE",
    "TOY_SMOKE",
    "DIGITS_SMOKE",
    "VAE_SMOKE",
    "DigitsModelsConfig",
    "LM_FINETUNE_SUBSETS",
    "LMConfig",
    "ToyModelConfig",
    "VAEModelConfig",
    "binarize",
    "digits_judge",
    "finetuned_lms",
    "lm_corpus",
    "load_lm",
    "model_config",
    "package_corpus",
    "penultimate_features",
    "trained_digits_models",
    "trained_draft_lm",
    "trained_lm",
    "trained_medusa_heads",
    "trained_toy_model",
    "trained_vae",
]

# Bump one when the training code changes what a config trains (it is part of the cache key).
TOY_CACHE_VERSION = 1
DIGITS_CACHE_VERSION = 1
LM_CACHE_VERSION = 1
VAE_CACHE_VERSION = 1

DIGITS_NUM_CLASSES = 10  # label DIGITS_NUM_CLASSES is the null (unconditional) label


def model_config(cls: type, ex: Any | None = None, smoke: bool = False):
    """A `cls` instance holding the fields of `ex` that `cls` has (`cls()` when `ex` is None),
    with the zoo's smoke settings for `cls` applied when `smoke` (the small, quickly trained
    model every smoke run shares)."""
    if ex is None:
        cfg = cls()
    elif type(ex) is cls:
        cfg = ex
    else:
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if not hasattr(ex, n)]
        if missing:
            raise ValueError(
                f"{type(ex).__name__} lacks the {cls.__name__} fields {missing}; pass a "
                f"{cls.__name__} or a config that subclasses it."
            )
        cfg = cls(**{n: getattr(ex, n) for n in names})
    return dataclasses.replace(cfg, **_SMOKE[cls]) if smoke else cfg


# ---------------------------------------------------------------------------------------------
# 2-D toy: conditional ScoreMLP on the mixture of Gaussians on a circle
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ToyModelConfig:
    """What defines the toy score model (data, architecture, training)."""

    cache_dir: str | None = None  # model cache (default $FEYNKIT_CACHE or ~/.cache/feynkit)
    # data: gaussian_mixture_2d
    num_modes: int = 8
    radius: float = 4.0
    scale: float = 0.5
    # model
    hidden: int = 128
    num_layers: int = 3
    time_features: int = 64
    # training
    steps: int = 3000
    batch_size: int = 512
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    label_dropout: float = 0.1
    t_min: float = 1e-3
    checkpoint_every: int = 1000


TOY_SMOKE = dict(hidden=64, num_layers=2, steps=200, batch_size=256, checkpoint_every=200)


def _toy_model(ex: ToyModelConfig) -> ScoreMLP:
    return ScoreMLP(ex.hidden, ex.num_layers, ex.num_modes, ex.time_features)


def _toy_defining_config(ex: ToyModelConfig, seed: int) -> dict:
    """What the trained parameters depend on (the cache key), not evaluation settings."""
    keep = (
        "num_modes radius scale hidden num_layers time_features steps batch_size "
        "learning_rate warmup_steps label_dropout t_min"
    ).split()
    return {
        "name": "train_toy-score_mlp",
        "version": TOY_CACHE_VERSION,
        "seed": seed,
        **{k: getattr(ex, k) for k in keep},
    }


def _train_score_mlp(ex: ToyModelConfig, key: jax.Array, checkpoint_dir: Path | None):
    model = _toy_model(ex)
    params = model.init_params(jax.random.fold_in(key, 0), 2)
    loss_fn = tr.denoising_score_loss(
        model.forward, LinearSchedule(), ex.num_modes, ex.label_dropout, ex.t_min
    )

    def batch_fn(data, k, step):
        return gaussian_mixture_2d(k, ex.batch_size, ex.num_modes, ex.radius, ex.scale)

    optimizer = tr.make_optimizer(ex.learning_rate, ex.steps, ex.warmup_steps)
    t0 = time.perf_counter()
    state, history = tr.train(
        loss_fn,
        optimizer,
        params,
        batch_fn,
        jax.random.fold_in(key, 1),
        ex.steps,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=ex.checkpoint_every,
        log_every=100,
        steps_per_call=100,
        desc="score_mlp",
    )
    info = {"train_seconds": time.perf_counter() - t0, "history": history}
    return state.params, info


def trained_toy_model(
    ex: ToyModelConfig | Any | None = None, seed: int = 0, smoke: bool = False
) -> tuple[ScoreMLP, tr.CachedModel]:
    """The `train_toy` conditional ScoreMLP and its parameters, from the model cache or trained.

    ε-prediction on the linear VP schedule; ``model.forward(params, x, t, label)`` with label
    ``None`` (or ``ex.num_modes``) for the unconditional branch. `ex` defaults to
    `ToyModelConfig()`; ``smoke=True`` applies `TOY_SMOKE` (a small, quickly trained model).
    """
    ex = model_config(ToyModelConfig, ex, smoke)
    cached = tr.cached_train(
        _toy_defining_config(ex, seed),
        functools.partial(_train_score_mlp, ex, jax.random.fold_in(jax.random.key(seed), 0)),
        directory=ex.cache_dir,
    )
    return _toy_model(ex), cached


# ---------------------------------------------------------------------------------------------
# Digits: conditional UNet and noise-aware classifier
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DigitsModelsConfig:
    """What defines the digits UNet and classifier."""

    cache_dir: str | None = None  # model cache (default $FEYNKIT_CACHE or ~/.cache/feynkit)
    # UNet
    channels: int = 16
    time_features: int = 32
    steps: int = 2500
    batch_size: int = 128
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    label_dropout: float = 0.1
    t_min: float = 1e-3
    # classifier (features for fd_digits, judge for class_accuracy)
    classifier_channels: int = 32
    classifier_steps: int = 1500
    classifier_learning_rate: float = 2e-3
    clean_fraction: float = 0.5
    checkpoint_every: int = 500


DIGITS_SMOKE = dict(
    channels=8,
    time_features=16,
    steps=150,
    batch_size=64,
    classifier_channels=8,
    classifier_steps=150,
    checkpoint_every=150,
)


def penultimate_features(classifier: nn.Module, params, x: jax.Array, t) -> jax.Array:
    """The input of the classifier's final ``logits`` layer (its penultimate activations)."""
    captured = []

    def interceptor(next_fun, args, kwargs, context):
        if context.module.name == "logits" and context.method_name == "__call__":
            captured.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        classifier.forward(params, x, t)
    if len(captured) != 1:
        raise ValueError("the classifier has no single submodule named 'logits'.")
    return captured[0]


def digits_judge(classifier: nn.Module, params):
    """``judge(x) -> (features, logits)`` of clean images (clipped to [−1, 1], t = 0), jitted:
    the feature space of `fd_digits` and the classifier that scores class accuracy."""

    @jax.jit
    def judge(x):
        x = jnp.clip(x, -1.0, 1.0)
        t = jnp.zeros(x.shape[:1])
        return penultimate_features(classifier, params, x, t), classifier.forward(params, x, t)

    return judge


def _digits_models(ex: DigitsModelsConfig) -> tuple[UNet, ImageClassifier]:
    unet = UNet(ex.channels, DIGITS_NUM_CLASSES, ex.time_features)
    classifier = ImageClassifier(DIGITS_NUM_CLASSES, ex.classifier_channels, ex.time_features)
    return unet, classifier


def _digits_defining_configs(ex: DigitsModelsConfig, seed: int) -> tuple[dict, dict]:
    common = {"version": DIGITS_CACHE_VERSION, "seed": seed, "data": "sklearn_digits_split_0.2_0"}
    unet = {
        "name": "train_digits-unet",
        **common,
        **{
            k: getattr(ex, k)
            for k in "channels time_features steps batch_size learning_rate warmup_steps "
            "label_dropout t_min".split()
        },
    }
    classifier = {
        "name": "train_digits-classifier",
        **common,
        "channels": ex.classifier_channels,
        "time_features": ex.time_features,
        "steps": ex.classifier_steps,
        "batch_size": ex.batch_size,
        "learning_rate": ex.classifier_learning_rate,
        "warmup_steps": ex.warmup_steps,
        "clean_fraction": ex.clean_fraction,
        "t_min": ex.t_min,
    }
    return unet, classifier


def _train_array_model(model, loss_fn, data, steps, lr, ex, key, desc, checkpoint_dir):
    params = jax.jit(model.init_params)(jax.random.fold_in(key, 0))
    t0 = time.perf_counter()
    state, history = tr.train(
        loss_fn,
        tr.make_optimizer(lr, steps, ex.warmup_steps),
        params,
        tr.array_batch_fn(ex.batch_size),
        jax.random.fold_in(key, 1),
        steps,
        data=data,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=ex.checkpoint_every,
        log_every=50,
        steps_per_call=1,  # conv gradients run far slower inside an XLA loop on the CPU
        desc=desc,
    )
    return state.params, {"train_seconds": time.perf_counter() - t0, "history": history}


def trained_digits_models(
    ex: DigitsModelsConfig | Any | None = None, seed: int = 0, split=None, smoke: bool = False
) -> tuple[tuple[UNet, ImageClassifier], dict[str, tr.CachedModel]]:
    """The `train_digits` models and their parameters, from the model cache or trained.

    Returns ``((unet, classifier), {"unet": CachedModel, "classifier": CachedModel})``: the
    class-conditional ε-prediction UNet (linear VP schedule; label ``None`` or
    `DIGITS_NUM_CLASSES` is the null label) and the noise-aware classifier
    ``classifier.forward(params, x, t) -> logits``. `ex` defaults to `DigitsModelsConfig()`;
    ``smoke=True`` applies `DIGITS_SMOKE` (small, quickly trained models for smoke runs).
    """
    ex = model_config(DigitsModelsConfig, ex, smoke)
    split = load_digits_split() if split is None else split
    key = jax.random.key(seed)
    schedule = LinearSchedule()
    train_data = (jnp.asarray(split.x_train), jnp.asarray(split.y_train))
    unet, classifier = _digits_models(ex)
    unet_cfg, clf_cfg = _digits_defining_configs(ex, seed)
    unet_loss = tr.denoising_score_loss(
        unet.forward, schedule, DIGITS_NUM_CLASSES, ex.label_dropout, ex.t_min
    )
    clf_loss = tr.noisy_classifier_loss(classifier.forward, schedule, ex.t_min, ex.clean_fraction)
    jobs = {
        "unet": (unet_cfg, unet, unet_loss, ex.steps, ex.learning_rate),
        "classifier": (
            clf_cfg,
            classifier,
            clf_loss,
            ex.classifier_steps,
            ex.classifier_learning_rate,
        ),
    }
    cached = {}
    for i, (name, (defining, model, loss_fn, steps, lr)) in enumerate(jobs.items()):
        train_fn = functools.partial(
            _train_array_model,
            model,
            loss_fn,
            train_data,
            steps,
            lr,
            ex,
            jax.random.fold_in(key, i),
            name,
        )
        cached[name] = tr.cached_train(defining, train_fn, directory=ex.cache_dir)
    return (unet, classifier), cached


# ---------------------------------------------------------------------------------------------
# Byte-level language model
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LMConfig:
    """What defines the byte-level TransformerLM (corpus, architecture, training)."""

    cache_dir: str | None = None  # model cache (default $FEYNKIT_CACHE or ~/.cache/feynkit)
    max_corpus_bytes: int = 2_000_000
    split_fractions: list[float] = dataclasses.field(default_factory=lambda: [0.8, 0.1, 0.1])
    # model
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 344
    seq_len: int = 128
    max_len: int = 256  # longest full-sequence forward and default KV-cache length (≥ seq_len)
    # training
    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    checkpoint_every: int = 400


LM_SMOKE = dict(
    max_corpus_bytes=300_000,
    d_model=32,
    num_layers=1,
    num_heads=2,
    mlp_dim=64,
    seq_len=32,
    steps=100,
    batch_size=16,
    checkpoint_every=100,
)


def _lm_model(ex: LMConfig) -> TransformerLM:
    return TransformerLM(
        BYTE_VOCAB_SIZE,
        ex.d_model,
        ex.num_layers,
        ex.num_heads,
        mlp_dim=ex.mlp_dim,
        max_len=max(ex.seq_len, ex.max_len),
    )


def _lm_defining_config(ex: LMConfig, seed: int) -> dict:
    keep = (
        "max_corpus_bytes split_fractions d_model num_layers num_heads mlp_dim seq_len steps "
        "batch_size learning_rate warmup_steps weight_decay"
    ).split()
    return {
        "name": "train_lm-transformer",
        "version": LM_CACHE_VERSION,
        "seed": seed,
        "data": "stdlib_corpus",
        **{k: getattr(ex, k) for k in keep},
    }


def _train_lm(ex: LMConfig, model: TransformerLM, tokens: np.ndarray, key, checkpoint_dir):
    params = model.init_params(jax.random.fold_in(key, 0))
    optimizer = tr.make_optimizer(ex.learning_rate, ex.steps, ex.warmup_steps, ex.weight_decay)
    t0 = time.perf_counter()
    state, history = tr.train(
        tr.next_token_loss(model.forward),
        optimizer,
        params,
        tr.window_batch_fn(ex.batch_size, ex.seq_len),
        jax.random.fold_in(key, 1),
        ex.steps,
        data=jnp.asarray(tokens),
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=ex.checkpoint_every,
        log_every=20,
        steps_per_call=20,
        desc="lm",
    )
    seconds = time.perf_counter() - t0
    info = {"train_seconds": seconds, "history": history}
    if len(history) > 1:  # steady state: from the end of the first (compiling) chunk
        (s0, _, t_0), (s1, _, t_1) = history[0], history[-1]
        info["train_tokens_per_s"] = (s1 - s0) * ex.batch_size * ex.seq_len / (t_1 - t_0)
    return state.params, info


def lm_corpus(ex: LMConfig | Any | None = None, smoke: bool = False) -> TextCorpus:
    """The corpus (train/validation/test byte streams) the LM of `ex` is trained on."""
    ex = model_config(LMConfig, ex, smoke)
    return load_stdlib_corpus(max_bytes=ex.max_corpus_bytes, fractions=tuple(ex.split_fractions))


def trained_lm(
    ex: LMConfig | Any | None = None, seed: int = 0, corpus=None, smoke: bool = False
) -> tuple[TransformerLM, tr.CachedModel]:
    """The `train_lm` model and its parameters: from the model cache, or trained (and cached).

    Quantization, pruning and decoding replications share this one trained LM; `ex` defaults
    to `LMConfig()`; ``smoke=True`` applies `LM_SMOKE` (a small, quickly trained model). Pass
    `corpus` (from `lm_corpus`) to avoid loading it twice.
    """
    ex = model_config(LMConfig, ex, smoke)
    corpus = lm_corpus(ex) if corpus is None else corpus
    model = _lm_model(ex)
    key = jax.random.fold_in(jax.random.key(seed), 0)
    cached = tr.cached_train(
        _lm_defining_config(ex, seed),
        functools.partial(_train_lm, ex, model, corpus.train, key),
        directory=ex.cache_dir,
    )
    return model, cached


def trained_draft_lm(
    ex: LMConfig | Any | None = None,
    seed: int = 0,
    corpus=None,
    smoke: bool = False,
    *,
    d_model: int,
    num_layers: int,
    num_heads: int,
    mlp_dim: int,
) -> tuple[TransformerLM, tr.CachedModel]:
    """A smaller draft LM for speculative decoding: `trained_lm` with the architecture replaced
    (same corpus, vocabulary, training recipe and cache)."""
    ex = model_config(LMConfig, ex, smoke)
    arch = dict(d_model=d_model, num_layers=num_layers, num_heads=num_heads, mlp_dim=mlp_dim)
    return trained_lm(dataclasses.replace(ex, **arch), seed, corpus)


MEDUSA_CACHE_VERSION = 1


def trained_medusa_heads(
    ex: LMConfig,
    lm: TransformerLM,
    lm_params: Any,
    corpus: TextCorpus,
    *,
    num_heads: int,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> tuple[Any, tr.CachedModel]:
    """Medusa-1 heads (`feynkit.inference.decoding.MedusaHeads`) trained on the frozen `ex` LM
    (hidden states of training windows, loss `medusa_loss`), cached like the LM itself."""
    from feynkit.inference.decoding import MedusaHeads, medusa_loss

    heads = MedusaHeads(num_heads, lm.vocab_size)
    cfg = {
        "name": "medusa-heads",
        "version": MEDUSA_CACHE_VERSION,
        "lm": _lm_defining_config(ex, 0),
        "num_heads": num_heads,
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
    }
    key = jax.random.fold_in(jax.random.key(seed), 7)

    def loss(params, batch, k):
        inputs, targets = batch
        _, _, hidden = lm.apply({"params": lm_params}, inputs, return_hidden=True)
        tokens = jnp.concatenate([inputs, targets[:, -1:]], axis=1)
        return medusa_loss(heads, params, jax.lax.stop_gradient(hidden), tokens)

    def train_fn(checkpoint_dir):
        init = heads.init_from_lm(key, lm_params["lm_head"]["kernel"])
        opt = tr.make_optimizer(learning_rate, steps, min(50, steps // 10), 0.0)
        state, history = tr.train(
            loss,
            opt,
            init,
            tr.window_batch_fn(batch_size, ex.seq_len),
            jax.random.fold_in(key, 1),
            steps,
            data=jnp.asarray(corpus.train),
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=steps,
            log_every=20,
            steps_per_call=20,
            desc="medusa",
        )
        return state.params, {"history": history}

    return heads, tr.cached_train(cfg, train_fn, directory=ex.cache_dir)


def load_lm(ex) -> tuple[TransformerLM, Any, TextCorpus, LMConfig]:
    """(model, params, corpus, lm config) of the shared trained LM (seed 0) for a replication
    config with ``cache_dir`` and ``lm_smoke`` (True: the smoke model)."""
    lm_ex = model_config(LMConfig, LMConfig(cache_dir=ex.cache_dir), ex.lm_smoke)
    corpus = lm_corpus(lm_ex)
    model, cached = trained_lm(lm_ex, 0, corpus)
    return model, cached.params, corpus, lm_ex


# Fine-tunes of the byte LM on two disjoint groups of stdlib packages that the base corpus (the
# first files in sorted order) does not contain: the task vectors DARE and merging act on.
LM_FINETUNE_SUBSETS = {"net": ("email", "http", "urllib"), "gui": ("tkinter", "idlelib")}
LM_FINETUNE_CACHE_VERSION = 1


def package_corpus(packages: tuple[str, ...], max_bytes: int) -> TextCorpus:
    """The stdlib files of the top-level `packages` (sorted, capped at `max_bytes`), split by
    file hash 90/10 into train/validation (`split_files`; test empty)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    kept, total = [], 0
    for rel in stdlib_source_files(root):
        if rel.split("/")[0] in packages:
            size = (root / rel).stat().st_size
            if total + size <= max_bytes:
                kept.append(rel)
                total += size
    if not kept:
        raise ValueError(f"no stdlib source files under the packages {packages}.")
    files = split_files(kept, (0.9, 0.1, 0.0))

    def stream(rels):
        return np.frombuffer(b"".join((root / r).read_bytes() for r in rels), np.uint8).copy()

    return TextCorpus(stream(files["train"]), stream(files["validation"]), stream([]), files)


def finetuned_lms(
    ex: LMConfig | Any | None = None,
    seed: int = 0,
    smoke: bool = False,
    *,
    steps: int | None = None,
    learning_rate: float = 1e-3,
    max_bytes: int | None = None,
    subsets: Sequence[str] | None = None,
) -> tuple[TransformerLM, tr.CachedModel, dict[str, tuple[tr.CachedModel, TextCorpus]]]:
    """The `trained_lm` base and its fine-tunes on each `LM_FINETUNE_SUBSETS` corpus (cached).

    Each fine-tune starts from the base parameters and trains `steps` (default 300; smoke 40)
    AdamW steps without weight decay (so the delta is only what the task taught) at
    `learning_rate` on its subset's train split. `subsets` (names of `LM_FINETUNE_SUBSETS`;
    default all) limits which are fine-tuned (each keeps its own seed and cache entry).
    Returns (model, base, {name: (fine-tune, subset corpus)}).
    """
    unknown = sorted(set(subsets or ()) - set(LM_FINETUNE_SUBSETS))
    if unknown:
        raise ValueError(f"subsets {unknown} unknown; choose from {sorted(LM_FINETUNE_SUBSETS)}.")
    lm_ex = model_config(LMConfig, ex, smoke)
    model, base = trained_lm(lm_ex, seed)
    steps = (40 if smoke else 300) if steps is None else steps
    max_bytes = (200_000 if smoke else 600_000) if max_bytes is None else max_bytes
    ft_ex = dataclasses.replace(
        lm_ex,
        steps=steps,
        learning_rate=learning_rate,
        warmup_steps=min(20, steps),
        weight_decay=0.0,
        checkpoint_every=steps,
    )
    out = {}
    for i, (name, packages) in enumerate(LM_FINETUNE_SUBSETS.items()):
        if subsets is not None and name not in subsets:
            continue
        corpus = package_corpus(packages, max_bytes)
        defining = {
            "name": f"finetune_lm-{name}",
            "version": LM_FINETUNE_CACHE_VERSION,
            "base": _lm_defining_config(lm_ex, seed),
            "packages": list(packages),
            "max_bytes": max_bytes,
            "steps": steps,
            "learning_rate": learning_rate,
        }
        key = jax.random.fold_in(jax.random.key(seed), 100 + i)
        cached = tr.cached_train(
            defining,
            functools.partial(_finetune_lm, ft_ex, model, base.params, corpus.train, key),
            directory=lm_ex.cache_dir,
        )
        out[name] = (cached, corpus)
    return model, base, out


def _finetune_lm(ex: LMConfig, model, params, tokens, key, checkpoint_dir):
    optimizer = tr.make_optimizer(ex.learning_rate, ex.steps, ex.warmup_steps, ex.weight_decay)
    t0 = time.perf_counter()
    state, history = tr.train(
        tr.next_token_loss(model.forward),
        optimizer,
        params,
        tr.window_batch_fn(ex.batch_size, ex.seq_len),
        key,
        ex.steps,
        data=jnp.asarray(tokens),
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=ex.checkpoint_every,
        log_every=20,
        steps_per_call=20,
        desc="lm-finetune",
    )
    return state.params, {"train_seconds": time.perf_counter() - t0, "history": history}


# ---------------------------------------------------------------------------------------------
# VAE on binarised digits
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class VAEModelConfig:
    """What defines the Bernoulli VAE on binarised digits."""

    cache_dir: str | None = None  # model cache (default $FEYNKIT_CACHE or ~/.cache/feynkit)
    latent_dim: int = 8
    hidden: list[int] = dataclasses.field(default_factory=lambda: [256, 256])
    steps: int = 2500
    batch_size: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    checkpoint_every: int = 500
    beta: float = 1.0  # weight of the KL term (a β-VAE when != 1; part of the cache key then)


VAE_SMOKE = dict(hidden=[64], steps=300, checkpoint_every=300)


def binarize(x: np.ndarray) -> np.ndarray:
    """Digits on the [−1, 1] scale to {0, 1}: pixel value above 8 of 16."""
    return (np.asarray(x) > 0).astype(np.float32)


def _vae_defining_config(ex: VAEModelConfig, seed: int) -> dict:
    return {
        "name": "train_vae-vae",
        "version": VAE_CACHE_VERSION,
        "seed": seed,
        "data": "sklearn_digits_split_0.2_0_binarized_gt8",
        **{
            k: getattr(ex, k)
            for k in "latent_dim hidden steps batch_size learning_rate warmup_steps".split()
        },
        **({"beta": ex.beta} if ex.beta != 1.0 else {}),
    }


def _train_vae(ex: VAEModelConfig, model: VAE, x_train, key, checkpoint_dir):
    params = model.init_params(jax.random.fold_in(key, 0))
    t0 = time.perf_counter()
    loss = tr.negative_elbo_loss(model) if ex.beta == 1.0 else _beta_vae_loss(model, ex.beta)
    state, history = tr.train(
        loss,
        tr.make_optimizer(ex.learning_rate, ex.steps, ex.warmup_steps),
        params,
        tr.array_batch_fn(ex.batch_size),
        jax.random.fold_in(key, 1),
        ex.steps,
        data=jnp.asarray(x_train),
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=ex.checkpoint_every,
        log_every=100,
        steps_per_call=100,
        desc="vae",
    )
    return state.params, {"train_seconds": time.perf_counter() - t0, "history": history}


def _beta_vae_loss(model: VAE, beta: float):
    """Mean −(log p(x | z) − β KL(q(z | x) ‖ N(0, I))) over the batch (Higgins et al. 2017)."""

    def loss_fn(params, batch, key):
        out = model.forward(params, key, batch)
        rec = decoder_log_prob(batch, out, model.likelihood, len(model.data_shape))
        kl = 0.5 * jnp.sum(jnp.exp(out.logvar) + out.mean**2 - 1.0 - out.logvar, axis=-1)
        return -jnp.mean(rec - beta * kl)

    return loss_fn


def trained_vae(
    ex: VAEModelConfig | Any | None = None, seed: int = 0, split=None, smoke: bool = False
) -> tuple[VAE, tr.CachedModel]:
    """The `train_vae` Bernoulli VAE (8x8x1 binarised digits) and its parameters, from the
    model cache or trained; ``smoke=True`` applies `VAE_SMOKE`."""
    ex = model_config(VAEModelConfig, ex, smoke)
    split = load_digits_split() if split is None else split
    model = VAE(data_shape=(8, 8, 1), latent_dim=ex.latent_dim, hidden=tuple(ex.hidden))
    key = jax.random.fold_in(jax.random.key(seed), 0)
    cached = tr.cached_train(
        _vae_defining_config(ex, seed),
        functools.partial(_train_vae, ex, model, binarize(split.x_train), key),
        directory=ex.cache_dir,
    )
    return model, cached


_SMOKE = {
    ToyModelConfig: TOY_SMOKE,
    DigitsModelsConfig: DIGITS_SMOKE,
    LMConfig: LM_SMOKE,
    VAEModelConfig: VAE_SMOKE,
}
