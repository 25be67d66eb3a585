"""Smoke run of the `kv_cache` replication through the Hydra entry point."""

import json
from pathlib import Path

import numpy as np
import pytest

import feynkit


def _smoke_config():
    from hydra import compose, initialize_config_dir

    from feynkit.experiments.run import register_configs

    register_configs()
    config_dir = Path(feynkit.__file__).parent / "configs"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose("config", overrides=["experiment=kv_cache", "smoke=true"])


@pytest.mark.slow  # ~25 s of CPU: four compiled decoding loops
def test_kv_cache_smoke(tmp_path):
    from feynkit.experiments.run import run_experiment

    res = run_experiment(_smoke_config(), tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["experiment"] == "kv_cache" and written["config"]["smoke"] is True
    m = written["metrics"]
    assert all(np.isfinite(v) for v in m.values())
    for name in ("uniform2", "gear", "uniform3", "ems"):
        assert 0.0 <= m[f"agreement.{name}"] <= 1.0 and m[f"compression.{name}"] > 1.0
    # More bits, less compression; GEAR's extras cost bytes over plain 2-bit.
    assert m["compression.uniform2"] > m["compression.uniform3"]
    assert m["compression.uniform2"] > m["compression.gear"]
    assert written["claims"] and all(c["holds"] for c in written["claims"])
    assert res.figures and all((tmp_path / f).is_file() for f in res.figures)
