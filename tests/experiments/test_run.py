"""The Hydra entry point, end to end in a subprocess: results.json, figures, config errors."""

import json
import os
import subprocess
import sys

import pytest


def _run(*args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "feynkit.experiments.run", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_smoke_run_writes_results(tmp_path):
    out = _run("smoke=true", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(res) >= {
        "experiment",
        "seed",
        "config",
        "metrics",
        "claims",
        "versions",
        "wall_seconds",
    }
    assert res["experiment"] == "fkc_gmm" and res["config"]["smoke"] is True
    for v in ("product", "cfg"):  # the smoke run's variants: FKC beats the naive SDE on both
        assert res["metrics"][f"{v}.2d.fkc_error"] < res["metrics"][f"{v}.2d.naive_error"]
    assert all(set(c) >= {"name", "holds", "value", "bound"} for c in res["claims"])
    assert (tmp_path / "run" / "fkc_gmm.png").stat().st_size > 1000
    assert "| claim |" in out.stdout


@pytest.mark.parametrize(
    "override,message",
    [
        ("experiment=nope", "fkc_gmm"),  # Hydra lists the available experiments
        ("experiment.bogus=1", "bogus"),  # unknown key in the structured config
        ("experiment.num_steps=many", "num_steps"),  # wrong type
        ("experiment.beta=-1", "must be > 0"),
        ("experiment.particles=[100,50]", "increasing"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, override, message):
    out = _run(override, "smoke=true", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert out.returncode != 0
    assert message in out.stderr + out.stdout, out.stderr[-2000:]
