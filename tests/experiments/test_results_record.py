"""results.json is strict JSON that validates against its schema and records what actually ran."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from feynkit.experiments import harness
from feynkit.experiments.results import RESULTS_SCHEMA, SCHEMA_VERSION, Results, strict_json


def _strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_values_are_null_and_named(tmp_path):
    r = Results("demo", 3, config={"experiment": {"tau": math.inf}}, overrides=["a.b=1"])
    r.metric("ok", 1.5)
    r.metric("fkc.error", float("nan"))
    r.metric("naive.error", -math.inf)
    r.claim("fkc below naive", float("nan"), 1.0)
    path = r.write(tmp_path)
    rec = _strict_loads(path.read_text())  # bare NaN/Infinity would raise here
    assert rec["metrics"] == {"ok": 1.5, "fkc.error": None, "naive.error": None}
    assert set(rec["non_finite"]) == {
        "metrics.fkc.error",
        "metrics.naive.error",
        "claims[0].value",
        "config.experiment.tau",
    }
    assert rec["claims"][0]["holds"] is False and rec["claims"][0]["value"] is None
    assert rec["schema_version"] == SCHEMA_VERSION and rec["overrides"] == ["a.b=1"]
    assert rec["git_commit"] == "unknown" or len(rec["git_commit"]) == 40
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(rec, json.loads(RESULTS_SCHEMA.read_text()))
    bad = dict(rec, metrics={"x": "1.0"})  # a string metric is not a number
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, json.loads(RESULTS_SCHEMA.read_text()))


def test_strict_json_paths():
    out, bad = strict_json({"a": [1.0, float("inf"), {"b": float("nan")}], "c": "nan"})
    assert out == {"a": [1.0, None, {"b": None}], "c": "nan"}
    assert bad == ["a[1]", "a[2].b"]


def _cfg(overrides):
    from feynkit.experiments.run import register_configs

    register_configs()
    with initialize_config_dir(str(harness.CONFIG_DIR), version_base=None):
        return compose("config", overrides=overrides)


def test_effective_config_applies_smoke_and_user_values_win():
    overrides = ["experiment=fkc_gmm", "smoke=true", "experiment.num_seeds=1"]
    cfg = _cfg(overrides)
    smoke = cfg.experiment.smoke_overrides
    ran = harness.effective_config(cfg, overrides)["experiment"]
    assert ran["num_steps"] == smoke.num_steps != cfg.experiment.num_steps  # smoke value ran
    assert ran["num_seeds"] == 1 != smoke.num_seeds  # the user's value beats the smoke value
    plain = harness.effective_config(_cfg(["experiment=fkc_gmm"]), [])
    assert plain["experiment"]["num_steps"] == cfg.experiment.num_steps


def test_cfg_job_shows_the_smoke_config(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "feynkit.experiments.run", "--cfg", "job", "smoke=true"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = _cfg(["smoke=true"])
    assert f"  num_steps: {cfg.experiment.smoke_overrides.num_steps}\n" in out.stdout
