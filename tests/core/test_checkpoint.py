"""Tests for feynkit.core.checkpoint: chunked runs resume from Orbax checkpoints."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.core import checkpointed_loop, restore_latest, save_checkpoint


class State(NamedTuple):
    x: jax.Array
    step: jax.Array


def _step(x, step):
    # Depends on the absolute step, as resumable randomness must.
    return 0.9 * x + jnp.sin(step.astype(jnp.float32) + x)


def _make_chunk():
    """A jitted chunk function and a log of (start step, length) for every call."""

    def chunk(state, length):
        def body(_, s):
            return State(_step(s.x, s.step), s.step + 1)

        new = jax.lax.fori_loop(0, length, body, state)
        return new, {"start": state.step, "x_norm": jnp.linalg.norm(new.x)}

    jitted = jax.jit(chunk, static_argnums=1)
    calls = []

    def run_chunk(state, length):
        calls.append((int(state.step), length))
        return jitted(state, length)

    return run_chunk, calls


def _init():
    return State(jnp.asarray([0.5, -1.0, 2.0], jnp.float32), jnp.asarray(0, jnp.int32))


def _reference(num_steps):
    x = np.asarray([0.5, -1.0, 2.0], np.float32)
    for k in range(num_steps):
        x = 0.9 * x + np.sin(np.float32(k) + x)
    return x


def _get_step(state):
    return state.step


def test_uninterrupted_run_matches_reference(tmp_path):
    run_chunk, calls = _make_chunk()
    chunks_seen = []
    state, infos = checkpointed_loop(
        run_chunk,
        _init(),
        10,
        _get_step,
        tmp_path / "ckpt",
        every=3,
        on_chunk=lambda s, i: chunks_seen.append(int(s.step)),
    )
    assert calls == [(0, 3), (3, 3), (6, 3), (9, 1)]
    assert chunks_seen == [3, 6, 9, 10]
    assert [int(i["start"]) for i in infos] == [0, 3, 6, 9]
    assert int(state.step) == 10
    np.testing.assert_allclose(state.x, _reference(10), rtol=1e-5)
    # The newest checkpoint holds the final state.
    restored, step = restore_latest(tmp_path / "ckpt", _init())
    assert step == 10
    np.testing.assert_array_equal(restored.x, state.x)
    assert int(restored.step) == 10


def test_resume_continues_from_checkpoint(tmp_path):
    full_chunk, _ = _make_chunk()
    full, _ = checkpointed_loop(full_chunk, _init(), 10, _get_step, tmp_path / "full", every=3)

    first_chunk, first_calls = _make_chunk()
    part, _ = checkpointed_loop(first_chunk, _init(), 6, _get_step, tmp_path / "run", every=3)
    assert first_calls == [(0, 3), (3, 3)]
    assert int(part.step) == 6

    # A restart with the same initial state and a longer run starts at step 6, not 0.
    second_chunk, second_calls = _make_chunk()
    resumed, infos = checkpointed_loop(
        second_chunk, _init(), 10, _get_step, tmp_path / "run", every=3
    )
    assert second_calls == [(6, 3), (9, 1)]
    assert [int(i["start"]) for i in infos] == [6, 9]
    assert int(resumed.step) == 10
    np.testing.assert_array_equal(resumed.x, full.x)
    assert resumed.x.dtype == jnp.float32 and resumed.step.dtype == jnp.int32

    # Asking again for 10 steps does nothing: the run is complete.
    third_chunk, third_calls = _make_chunk()
    again, infos = checkpointed_loop(third_chunk, _init(), 10, _get_step, tmp_path / "run")
    assert third_calls == [] and infos == []
    np.testing.assert_array_equal(again.x, full.x)


def test_checkpoint_past_num_steps_raises(tmp_path):
    save_checkpoint(tmp_path, 8, State(jnp.zeros(3, jnp.float32), jnp.asarray(8, jnp.int32)))
    run_chunk, calls = _make_chunk()
    with pytest.raises(ValueError, match=r"at step 8, past num_steps=5"):
        checkpointed_loop(run_chunk, _init(), 5, _get_step, tmp_path, every=2)
    assert calls == []


@pytest.mark.parametrize("every", [0, -3])
def test_nonpositive_every_raises(every, tmp_path):
    run_chunk, calls = _make_chunk()
    with pytest.raises(ValueError, match=rf"every must be a positive number of steps, got {every}"):
        checkpointed_loop(run_chunk, _init(), 5, _get_step, tmp_path, every=every)
    assert calls == []


def test_without_directory_and_missing_directory(tmp_path):
    assert restore_latest(tmp_path / "absent", _init()) is None
    run_chunk, calls = _make_chunk()
    state, _ = checkpointed_loop(run_chunk, _init(), 7, _get_step, None, every=4)
    assert calls == [(0, 4), (4, 3)]
    np.testing.assert_allclose(state.x, _reference(7), rtol=1e-5)
    assert list(tmp_path.iterdir()) == []
