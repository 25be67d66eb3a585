"""Training: an Optax loop, data-parallel over the device mesh, resumable and cached by config.

A run is `num_steps` applications of one update

    (params, opt_state) ← optimizer step on ∇ loss_fn(params, batch_s, key_s),
    key_s = fold_in(key, s),  batch_s = batch_fn(data, key_s', s),

so the step count alone fixes every random number: a run killed and restarted from its Orbax
checkpoint (`core.checkpoint.checkpointed_loop`) reproduces an uninterrupted one. The batch is
sharded over the one-axis `core.particle_mesh()` (its size must divide over the devices), the
parameters and optimizer state are replicated, and XLA inserts the gradient all-reduce. Batches
are drawn on the device inside the compiled step; `steps_per_call` steps can be fused into one
`fori_loop` so that small models are not dominated by Python dispatch.

Trained parameters are cached by a hash of the config that defines them (`cached_train`), under
`cache_dir()`: a config key, else ``$FEYNKIT_CACHE``, else ``~/.cache/feynkit``.

The losses live in `experiments.losses` (re-exported here).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from feynkit.core.checkpoint import checkpointed_loop, restore_latest, save_checkpoint
from feynkit.core.sharding import AXIS, check_divisible, particle_mesh
from feynkit.core.types import Array, Key, PyTree
from feynkit.experiments.losses import (
    LossFn,
    denoising_score_loss,
    negative_elbo_loss,
    next_token_loss,
    noisy_classifier_loss,
    vae_elbo,
)

__all__ = [
    "CACHE_ENV",
    "CachedModel",
    "TrainState",
    "array_batch_fn",
    "cache_dir",
    "cached_train",
    "config_hash",
    "quiet_checkpoint_logging",
    "denoising_score_loss",
    "experiment_config",
    "make_optimizer",
    "make_train_step",
    "negative_elbo_loss",
    "next_token_loss",
    "noisy_classifier_loss",
    "train",
    "vae_elbo",
    "window_batch_fn",
]

BatchFn = Callable[[PyTree, Key, Array], PyTree]


# ---------------------------------------------------------------------------------------------
# Batches as pure functions of (data, key, step)
# ---------------------------------------------------------------------------------------------


def array_batch_fn(batch_size: int) -> BatchFn:
    """Batches of `batch_size` examples drawn uniformly with replacement from a pytree of arrays
    sharing their leading axis (jit-compatible, so batches are drawn on the device)."""

    def batch_fn(data: PyTree, key: Key, step: Array) -> PyTree:
        del step
        n = jax.tree.leaves(data)[0].shape[0]
        idx = jax.random.randint(key, (batch_size,), 0, n)
        return jax.tree.map(lambda a: a[idx], data)

    return batch_fn


def window_batch_fn(batch_size: int, seq_len: int) -> BatchFn:
    """(inputs, targets) from `batch_size` uniformly placed windows of a token stream (the data)."""
    from feynkit.experiments.data import token_windows

    def batch_fn(data: Array, key: Key, step: Array) -> tuple[Array, Array]:
        del step
        return token_windows(key, data, batch_size, seq_len)

    return batch_fn


# ---------------------------------------------------------------------------------------------
# The train step and loop
# ---------------------------------------------------------------------------------------------


class TrainState(NamedTuple):
    """What a checkpoint holds: parameters, optimizer state and the number of steps taken."""

    params: PyTree
    opt_state: PyTree
    step: Array


def make_optimizer(
    learning_rate: float,
    num_steps: int,
    warmup_steps: int = 100,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay to 10% of `learning_rate`, after global-norm
    clipping."""
    warmup = max(0, min(warmup_steps, num_steps - 1))
    lr = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup, max(num_steps, warmup + 1), learning_rate / 10
    )
    parts = [] if clip_norm is None else [optax.clip_by_global_norm(clip_norm)]
    return optax.chain(*parts, optax.adamw(lr, weight_decay=weight_decay))


def _update(loss_fn, optimizer, params, opt_state, batch, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _check_batch(batch: PyTree, mesh: Mesh) -> None:
    leaves = jax.tree.leaves(batch)
    if not leaves or any(leaf.ndim == 0 for leaf in leaves):
        raise ValueError("every batch leaf needs a leading batch axis.")
    try:
        for leaf in leaves:
            check_divisible(leaf.shape[0], mesh)
    except ValueError as err:
        raise ValueError(f"batch size does not divide over the device mesh: {err}") from None


def make_train_step(
    loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh: Mesh | None = None
) -> Callable[[PyTree, PyTree, PyTree, Key], tuple[PyTree, PyTree, Array]]:
    """A jitted data-parallel step ``(params, opt_state, batch, key) -> (params, opt_state, loss)``.

    The batch's leading axis is sharded over ``mesh`` (default `particle_mesh()`, all devices),
    params, optimizer state and key are replicated; a batch whose size does not divide over the
    devices raises `ValueError`. On one device this is an ordinary jitted step.
    """
    mesh = particle_mesh() if mesh is None else mesh
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(AXIS))
    jitted = jax.jit(
        lambda p, o, b, k: _update(loss_fn, optimizer, p, o, b, k),
        in_shardings=(replicated, replicated, sharded, replicated),
        out_shardings=replicated,
    )

    def step(params, opt_state, batch, key):
        _check_batch(batch, mesh)
        params, opt_state, key = jax.device_put((params, opt_state, key), replicated)
        return jitted(params, opt_state, jax.device_put(batch, sharded), key)

    return step


def train(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    params: PyTree,
    batch_fn: BatchFn,
    key: Key,
    num_steps: int,
    *,
    data: PyTree = None,
    mesh: Mesh | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1000,
    log_every: int = 100,
    steps_per_call: int = 1,
    progress: bool = True,
    desc: str = "train",
) -> tuple[TrainState, list[tuple[int, float, float]]]:
    """Train for `num_steps` steps, resuming from the newest checkpoint in `checkpoint_dir`.

    Step s draws ``batch_fn(data, k_batch, s)`` and differentiates ``loss_fn(params, batch,
    k_loss)`` with (k_batch, k_loss) = split(fold_in(key, s)). `data` (device arrays, e.g. the
    whole training set) is replicated and passed to the compiled loop as an argument, not baked
    in as a constant.

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> scalar``.
      optimizer: an Optax transformation.
      params: initial parameters (ignored when a checkpoint is restored, apart from structure).
      batch_fn: ``batch_fn(data, key, step) -> batch``, pure and jit-compatible; its leading
        axis must divide over the mesh's devices.
      key: the run's PRNG key.
      num_steps: total number of steps.
      data: the pytree handed to `batch_fn`.
      mesh: device mesh (default `particle_mesh()`).
      checkpoint_dir: where to save and resume (None: no checkpoints).
      checkpoint_every: steps between checkpoints.
      log_every: steps per progress-bar update and per history entry (the host syncs then).
      steps_per_call: steps fused into one compiled `fori_loop` (≤ log_every). Fusing saves
        Python dispatch for small models; keep 1 for conv nets on the CPU, whose gradients XLA
        runs ~15x slower inside a loop body.
      progress: show a tqdm bar with the running loss.
      desc: the bar's label.

    Returns:
      The final `TrainState` and the history [(step, mean loss of the chunk ending there,
      seconds of training up to there)] of the whole run: with `checkpoint_dir` it is kept
      beside the checkpoints (``history.json``), so a resumed run returns the entries of the
      steps run before the interruption too (seconds then count the training time of all
      the runs).
    """
    if num_steps < 0 or log_every <= 0 or steps_per_call <= 0:
        raise ValueError(
            f"need num_steps >= 0, log_every > 0 and steps_per_call > 0, got {num_steps}, "
            f"{log_every}, {steps_per_call}."
        )
    mesh = particle_mesh() if mesh is None else mesh
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(AXIS))
    data = jax.device_put(data, replicated)
    _check_batch(jax.eval_shape(batch_fn, data, key, jnp.zeros((), jnp.int32)), mesh)
    state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
    state = jax.device_put(state, replicated)

    @functools.partial(jax.jit, static_argnums=3)
    def run_steps(state: TrainState, data: PyTree, key: Key, length: int):
        def body(_, carry):
            s, total = carry
            k_batch, k_loss = jax.random.split(jax.random.fold_in(key, s.step))
            batch = batch_fn(data, k_batch, s.step)
            batch = jax.lax.with_sharding_constraint(batch, sharded)
            params, opt_state, loss = _update(
                loss_fn, optimizer, s.params, s.opt_state, batch, k_loss
            )
            return TrainState(params, opt_state, s.step + 1), total + loss

        carry = (state, jnp.zeros((), jnp.float32))
        if length == 1:
            return body(0, carry)
        return jax.lax.fori_loop(0, length, body, carry)

    history: list[tuple[int, float, float]] = []
    history_file = None if checkpoint_dir is None else Path(checkpoint_dir) / "history.json"
    t_start = time.perf_counter()
    bar = None
    resumed = False

    def resume_history(step: int) -> None:
        # Entries written before the interruption, up to the restored checkpoint (the file may
        # run one chunk ahead of it: it is written before the chunk's checkpoint is saved).
        nonlocal t_start, resumed
        resumed = True
        if history_file is not None and history_file.exists():
            earlier = [tuple(h) for h in json.loads(history_file.read_text()) if h[0] <= step]
            history.extend((int(s), float(loss), float(sec)) for s, loss, sec in earlier)
        if history:
            t_start -= history[-1][2]  # seconds continue from the earlier runs' total

    def save_history() -> None:
        if history_file is None:
            return
        history_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = history_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(history))
        os.replace(tmp, history_file)  # atomic: a kill leaves the old or the new file

    def run_chunk(state: TrainState, length: int):
        nonlocal bar
        if not resumed:
            resume_history(int(state.step))
        if progress and bar is None:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_steps, initial=int(state.step), unit="step", desc=desc)
        for start in range(0, length, log_every):
            n = min(log_every, length - start)
            totals = []
            for sub in range(0, n, steps_per_call):
                state, total = run_steps(state, data, key, min(steps_per_call, n - sub))
                totals.append(total)
            loss = float(np.sum(jax.device_get(totals))) / n
            if not math.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss is {loss} at step {int(state.step)}.")
            history.append((int(state.step), loss, time.perf_counter() - t_start))
            if bar is not None:
                bar.update(n)
                bar.set_postfix(loss=f"{loss:.4f}")
        save_history()
        return state, None

    try:
        state, _ = checkpointed_loop(
            run_chunk, state, num_steps, lambda s: s.step, checkpoint_dir, every=checkpoint_every
        )
    finally:
        if bar is not None:
            bar.close()
    if not resumed:  # restored at num_steps already: no chunk ran
        resume_history(int(state.step))
    return state, history


# ---------------------------------------------------------------------------------------------
# The model cache
# ---------------------------------------------------------------------------------------------

CACHE_ENV = "FEYNKIT_CACHE"


def quiet_checkpoint_logging() -> None:
    """Raise the absl logger (Orbax's per-save INFO lines) to WARNING; Hydra's logging setup
    would otherwise print a dozen lines per checkpoint."""
    import logging

    logger = logging.getLogger("absl")
    if logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)


def cache_dir(override: str | Path | None = None) -> Path:
    """The model cache: `override` (a config key) if given, else ``$FEYNKIT_CACHE``, else
    ``~/.cache/feynkit``."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "feynkit"


def _plain(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return _plain(dataclasses.asdict(cfg))
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, DictConfig | ListConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra, a dependency
        pass
    if isinstance(cfg, Mapping):
        return {str(k): _plain(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [_plain(v) for v in cfg]
    return cfg


def config_hash(cfg: Mapping[str, Any]) -> str:
    """16 hex digits of SHA-256 over the canonical JSON (sorted keys) of `cfg`."""
    text = json.dumps(_plain(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class CachedModel(NamedTuple):
    """What `cached_train` returns: parameters, the training info stored with them, whether they
    came from the cache, and the cache entry's directory."""

    params: PyTree
    info: dict[str, Any]
    hit: bool
    path: Path


def _restore_params(directory: Path, like: PyTree | None) -> PyTree | None:
    if like is not None:
        restored = restore_latest(directory, like)
        return None if restored is None else restored[0]
    if not directory.exists():
        return None
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(directory.absolute()) as mngr:
        step = mngr.latest_step()
        return None if step is None else mngr.restore(step, args=ocp.args.StandardRestore())


def cached_train(
    cfg_dict: Mapping[str, Any],
    train_fn: Callable[[Path], PyTree | tuple[PyTree, dict[str, Any]]],
    *,
    like: PyTree | None = None,
    directory: str | Path | None = None,
    verbose: bool = True,
) -> CachedModel:
    """Parameters for the model `cfg_dict` defines: from the cache, or trained and stored.

    The entry ``cache_dir(directory) / f"{cfg_dict['name']}-{config_hash(cfg_dict)}"`` holds the
    parameters as an Orbax checkpoint (``params/``), ``config.json`` and ``info.json``. On a miss
    ``train_fn(checkpoint_dir)`` trains, checkpointing into ``checkpoint_dir`` inside the entry so
    that an interrupted run resumes; it returns params, or (params, info) with info a JSON-able
    dict (losses, wall time) that later hits return too.

    Args:
      cfg_dict: everything that defines the trained model (architecture, data, training
        hyperparameters, seed); nothing that does not (evaluation settings).
      train_fn: trains on a miss.
      like: a pytree with the parameters' structure to restore into (default: as saved, which
        for Flax parameters is the same nested dicts).
      directory: overrides `cache_dir()`.
      verbose: print where the cache entry lives.
    """
    name = str(cfg_dict.get("name", "model"))
    entry = cache_dir(directory) / f"{name}-{config_hash(cfg_dict)}"
    params_dir = entry / "params"
    params = _restore_params(params_dir, like)
    if params is not None:
        info_path = entry / "info.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        if verbose:
            print(f"model cache: hit {entry}")
        return CachedModel(params, info, True, entry)
    if verbose:
        print(f"model cache: miss, training into {entry}")
    out = train_fn(entry / "training")
    has_info = isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)
    params, info = out if has_info else (out, {})
    entry.mkdir(parents=True, exist_ok=True)
    (entry / "config.json").write_text(json.dumps(_plain(cfg_dict), indent=2, sort_keys=True))
    (entry / "info.json").write_text(json.dumps(_plain(info), indent=2))
    # Written last: a complete params checkpoint marks a complete entry (Orbax renames into place).
    save_checkpoint(params_dir, 0, params)
    shutil.rmtree(entry / "training", ignore_errors=True)
    return CachedModel(params, dict(info), False, entry)


def experiment_config(cfg: Any, cls: type, smoke: Mapping[str, Any] | None = None) -> Any:
    """The experiment node of a run config as a `cls` instance, with `smoke` applied when the run
    has ``smoke=true`` (the smoke values replace the configured ones)."""
    from omegaconf import OmegaConf

    ex = cls(**OmegaConf.to_container(cfg.experiment, resolve=True))
    return dataclasses.replace(ex, **smoke) if cfg.smoke and smoke else ex
