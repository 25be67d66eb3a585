"""Resumable loops: run a jitted chunk function and save the state with Orbax between chunks.

A long run (SMC with thousands of steps, a training loop) is `num_steps` applications of a step
function whose state records its own step count. `checkpointed_loop` runs it in chunks of
`every` steps, saves after each chunk, and on start restores the newest checkpoint in
`directory` so a killed run, restarted with the same arguments, continues where it stopped.
Randomness must be derived from the step count (e.g. `jax.random.fold_in(key, step)`), not
from a key carried between chunks, so that a resumed run draws the same numbers.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from feynkit.core.types import PyTree

__all__ = ["checkpointed_loop", "restore_latest", "save_checkpoint"]


def _manager(directory: str | Path, max_to_keep: int = 2) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )


def save_checkpoint(directory: str | Path, step: int, state: PyTree) -> None:
    """Save `state` as checkpoint `step` under `directory` (blocking)."""
    with _manager(directory) as mngr:
        mngr.save(step, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()


def restore_latest(directory: str | Path, like: PyTree) -> tuple[PyTree, int] | None:
    """Restore the newest checkpoint in `directory` with the structure of `like`, or None."""
    if not Path(directory).exists():
        return None
    with _manager(directory) as mngr:
        step = mngr.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return mngr.restore(step, args=ocp.args.StandardRestore(abstract)), step


def checkpointed_loop(
    run_chunk: Callable[[PyTree, int], tuple[PyTree, Any]],
    state: PyTree,
    num_steps: int,
    get_step: Callable[[PyTree], int],
    directory: str | Path | None = None,
    every: int = 100,
    on_chunk: Callable[[PyTree, Any], None] | None = None,
    progress: bool = False,
) -> tuple[PyTree, list[Any]]:
    """Run `run_chunk(state, length)` until `get_step(state) == num_steps`, saving as it goes.

    Args:
      run_chunk: advances the state by `length` steps (a static int) and returns
        `(state, info)`; jit it with `length` static so each chunk length compiles once.
      state: the initial state, used when `directory` holds no checkpoint, and as the
        structure to restore into.
      num_steps: total number of steps of the run.
      get_step: reads the step count from a state.
      directory: checkpoint directory; None runs without checkpoints.
      every: steps per chunk (and between checkpoints).
      on_chunk: called with `(state, info)` after each chunk (e.g. to validate weights).
      progress: show a tqdm progress bar.

    Returns:
      The final state and the list of per-chunk infos produced in this call (chunks run before
      a restart are not repeated, so their infos are not returned).
    """
    if every <= 0:
        raise ValueError(f"every must be a positive number of steps, got {every}.")
    if directory is not None:
        restored = restore_latest(directory, state)
        if restored is not None:
            state = restored[0]
    done = int(get_step(state))
    if done > num_steps:
        raise ValueError(
            f"the checkpoint in {directory} is at step {done}, past num_steps={num_steps}: "
            "use a fresh directory for a shorter run."
        )
    infos = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=done, unit="step")
    while done < num_steps:
        length = min(every, num_steps - done)
        state, info = run_chunk(state, length)
        done = int(get_step(state))
        infos.append(info)
        if on_chunk is not None:
            on_chunk(state, info)
        if directory is not None:
            save_checkpoint(directory, done, state)
        if bar is not None:
            bar.update(length)
    if bar is not None:
        bar.close()
    return state, infos
