"""Fitting a variational family by stochastic gradient ascent on an objective, with Optax.

Step s draws its samples with ``fold_in(key, s)`` and applies one Optax update along the
estimator's gradient of ``−objective(key_s, log_joint, family, params, data)``; steps run in
compiled chunks through the shared resumable loop (`core.checkpoint.checkpointed_loop`), so a run
killed and restarted with the same `checkpoint_dir` resumes from its newest Orbax checkpoint and
draws the same numbers as an uninterrupted one. A tqdm bar shows progress when asked.

Model parameters can be fitted alongside: pass ``params = {"guide": φ, "model": θ}`` with
``split_params=True`` and a ``log_joint(z, data, θ)`` of three arguments.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from feynkit.core.checkpoint import checkpointed_loop
from feynkit.core.types import Array, Key, PyTree

__all__ = ["FitState", "fit"]


class FitState(NamedTuple):
    """What a checkpoint holds."""

    params: PyTree
    opt_state: PyTree
    step: Array


def fit(
    key: Key,
    objective: Callable[..., Array],
    log_joint: Callable[..., Array],
    family: Any,
    params: PyTree,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    data: Any = None,
    split_params: bool = False,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 500,
    progress: bool = False,
) -> tuple[PyTree, list[float]]:
    """Maximise `objective` over `params` for `num_steps` Optax steps.

    Args:
      key: the run's key (step s uses ``fold_in(key, s)``).
      objective: ``objective(key, log_joint, family, params, data)``, e.g. from
        `make_objective`.
      log_joint, family, params, data: as for the objective; with ``split_params`` `params`
        is ``{"guide": φ, "model": θ}`` and `log_joint` takes θ as a third argument.
      optimizer: an Optax transformation (it minimises the negated objective).
      num_steps: total number of steps (a resumed run counts those already taken).
      checkpoint_dir, checkpoint_every: Orbax checkpoints and resume (None: none).
      progress: a tqdm progress bar.

    Returns:
      (fitted params, the mean objective value of each chunk run in this call).
    """
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be an int >= 0, got {num_steps!r}.")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every!r}.")
    if split_params and not (isinstance(params, dict) and set(params) == {"guide", "model"}):
        raise ValueError("split_params=True needs params = {'guide': ..., 'model': ...}.")

    def loss(p, k):
        if split_params:
            lj = functools.partial(_with_model, log_joint, p["model"])
            return -objective(k, lj, family, p["guide"], data)
        return -objective(k, log_joint, family, p, data)

    # validate once, eagerly, outside the compiled loop (the objectives raise ValueErrors)
    jax.eval_shape(loss, params, key)

    @functools.partial(jax.jit, static_argnums=1)
    def run_chunk(state: FitState, length: int):
        def body(_, carry):
            s, total = carry
            value, grads = jax.value_and_grad(loss)(s.params, jax.random.fold_in(key, s.step))
            updates, opt_state = optimizer.update(grads, s.opt_state, s.params)
            params = optax.apply_updates(s.params, updates)
            return FitState(params, opt_state, s.step + 1), total - value

        state, total = jax.lax.fori_loop(0, length, body, (state, jnp.zeros((), jnp.float32)))
        return state, total / length

    state = FitState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
    state, values = checkpointed_loop(
        run_chunk,
        state,
        num_steps,
        lambda s: s.step,
        checkpoint_dir,
        every=checkpoint_every,
        progress=progress,
    )
    return state.params, [float(v) for v in values]


def _with_model(log_joint, model_params, z, data):
    return log_joint(z, data, model_params)
