"""Kill tests: SIGKILL a training run and an SMC run mid-run, restart, get the same numbers.

Each run is `_kill_worker.py` in a fresh process, checkpointing with Orbax every few steps. The
parent waits until the run has written a checkpoint (and, when it can catch one, while Orbax
has a ``*.orbax-checkpoint-tmp*`` directory half written), kills it with SIGKILL, plants a
leftover temporary checkpoint directory as a kill during a save leaves one, restarts the
same command and compares its final numbers (and, for training, the loss history of the whole
run) with an uninterrupted run's. Slow: six processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("_kill_worker.py")
pytestmark = pytest.mark.slow


def _cmd(kind: str, directory: Path, out: Path) -> list[str]:
    return [sys.executable, str(WORKER), kind, str(directory), str(out)]


def _env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return env


def _finished_steps(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def _kill_mid_run(kind: str, directory: Path, out: Path, timeout: float = 300) -> dict:
    log = out.with_suffix(".stderr")
    with log.open("wb") as err:
        proc = subprocess.Popen(_cmd(kind, directory, out), env=_env(), stderr=err)
    deadline = time.monotonic() + timeout
    saw_tmp = False
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = log.read_text()[-2000:]
                pytest.fail(f"the {kind} run ended (rc {proc.returncode}) before it was killed: {err}")
            tmp = directory.is_dir() and any("tmp" in p.name for p in directory.iterdir())
            if _finished_steps(directory) and (tmp or len(_finished_steps(directory)) >= 2):
                saw_tmp = bool(tmp)
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        else:
            pytest.fail(f"the {kind} run wrote no checkpoint within {timeout} s")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    return {"killed_at": _finished_steps(directory)[-1], "caught_tmp": saw_tmp}


def _run(kind: str, directory: Path, out: Path) -> dict[str, np.ndarray]:
    res = subprocess.run(
        _cmd(kind, directory, out), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return dict(np.load(out))


@pytest.mark.parametrize("kind", ["train", "smc"])
def test_sigkill_then_restart_gives_the_uninterrupted_numbers(kind, tmp_path):
    full = _run(kind, tmp_path / "full", tmp_path / "full.npz")
    run_dir, out = tmp_path / "killed", tmp_path / "resumed.npz"
    info = _kill_mid_run(kind, run_dir, out)
    last = info["killed_at"]
    # A kill during a save leaves a temporary directory; plant one past the last finished step
    # (with a half-written file) whether or not the kill caught Orbax mid-save.
    junk = run_dir / f"{last + 1}.orbax-checkpoint-tmp-1234567890"
    junk.mkdir(exist_ok=True)
    (junk / "half_written").write_bytes(b"\0" * 100)
    resumed = _run(kind, run_dir, out)
    assert int(resumed["step"]) == int(full["step"]) > last
    assert set(resumed) == set(full)
    for name in full:
        if kind == "smc":  # the same kernel on the same keys: bitwise equal
            np.testing.assert_array_equal(resumed[name], full[name], err_msg=name)
        else:  # chunked compiled loops: as the resume test of train.py, to float32 rounding
            np.testing.assert_allclose(resumed[name], full[name], rtol=1e-6, atol=1e-7)
    assert _finished_steps(run_dir)[-1] == int(full["step"])
    if kind == "train":  # the history spans the kill: every chunk's entry, once
        np.testing.assert_array_equal(resumed["history_steps"], np.arange(1, 13) * 25)
