"""Shared smoke-run check for replications: compose `experiment=<name> smoke=true`, run it
in-process, and check what it wrote (results.json shape, finite metrics, figures)."""

import json
import math
from pathlib import Path

import feynkit


def smoke_config(name: str, overrides: tuple[str, ...] = ()):
    from hydra import compose, initialize_config_dir

    from feynkit.experiments.run import register_configs

    register_configs()
    config_dir = Path(feynkit.__file__).parent / "configs"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose("config", overrides=[f"experiment={name}", "smoke=true", *overrides])


def smoke_run(name: str, out: Path, overrides: tuple[str, ...] = ()) -> dict:
    """Run a replication's smoke configuration; returns the written results.json."""
    from feynkit.experiments.run import run_experiment

    res = run_experiment(smoke_config(name, overrides), out)
    written = json.loads((Path(out) / "results.json").read_text())
    assert written["experiment"] == name and written["config"]["smoke"] is True
    assert written["metrics"] and all(math.isfinite(v) for v in written["metrics"].values())
    assert written["claims"], "a replication states at least one claim"
    for c in written["claims"]:
        assert set(c) >= {"name", "holds", "value", "bound"}
    assert all((Path(out) / f).is_file() for f in res.figures)
    return written
