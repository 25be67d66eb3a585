"""Smoke runs of the `tweedie` and `bdia_inversion` replications through `run_experiment`."""

import json
from pathlib import Path

import numpy as np

import feynkit


def _smoke(name, tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from feynkit.experiments import train as tr
    from feynkit.experiments.run import register_configs, run_experiment

    monkeypatch.setenv(tr.CACHE_ENV, str(tmp_path / "cache"))
    register_configs()
    config_dir = Path(feynkit.__file__).parent / "configs"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        cfg = compose("config", overrides=[f"experiment={name}", "smoke=true"])
    out = tmp_path / "run"
    res = run_experiment(cfg, out)
    written = json.loads((out / "results.json").read_text())
    assert written["experiment"] == name and written["config"]["smoke"] is True
    assert all(np.isfinite(v) for v in written["metrics"].values())
    assert written["claims"] and res.figures and all((out / f).is_file() for f in res.figures)
    return written["metrics"], {c["name"]: c for c in written["claims"]}


def test_tweedie_smoke(tmp_path, monkeypatch):
    metrics, claims = _smoke("tweedie", tmp_path, monkeypatch)
    # exact-score Tweedie moments hold even at smoke scale
    for t in ("0.2", "0.5"):
        assert metrics[f"2d.t{t}.mean_rel_error"] < 1e-3
        assert metrics[f"2d.t{t}.cov_rel_error"] < 1e-3
        assert metrics[f"2d.t{t}.kl_second_order"] < metrics[f"2d.t{t}.kl_first_order_isotropic"]
    for noise in ("gaussian", "poisson"):
        assert metrics[f"noise2score.{noise}.mse_noisy"] > 0


def test_bdia_inversion_smoke(tmp_path, monkeypatch):
    metrics, claims = _smoke("bdia_inversion", tmp_path, monkeypatch)
    assert metrics["toy.bdia.recon.max_error"] < 1e-3
    assert metrics["toy.bdia.sample_invert.max_error"] < 1e-3
    assert metrics["toy.ddim.recon.max_error"] > 10 * metrics["toy.bdia.recon.max_error"]
