"""Smoke runs of the `tweedie` and `bdia_inversion` replications through `run_experiment`."""

import pytest

from tests.experiments.smoke import smoke_run


def _smoke(name, tmp_path, monkeypatch):
    """The shared smoke check; returns (metrics, claims by name)."""
    written = smoke_run(name, tmp_path / "run")
    return written["metrics"], {c["name"]: c for c in written["claims"]}


@pytest.mark.slow
def test_tweedie_smoke(tmp_path, monkeypatch):
    metrics, claims = _smoke("tweedie", tmp_path, monkeypatch)
    # exact-score Tweedie moments hold even at smoke scale
    for t in ("0.2", "0.5"):
        assert metrics[f"2d.t{t}.mean_rel_error"] < 1e-3
        assert metrics[f"2d.t{t}.cov_rel_error"] < 1e-3
        assert metrics[f"2d.t{t}.kl_second_order"] < metrics[f"2d.t{t}.kl_first_order_isotropic"]
    for noise in ("gaussian", "poisson"):
        assert metrics[f"noise2score.{noise}.mse_noisy"] > 0


@pytest.mark.slow
def test_bdia_inversion_smoke(tmp_path, monkeypatch):
    metrics, claims = _smoke("bdia_inversion", tmp_path, monkeypatch)
    assert metrics["toy.bdia.recon.max_error"] < 1e-3
    assert metrics["toy.bdia.sample_invert.max_error"] < 1e-3
    assert metrics["toy.ddim.recon.max_error"] > 10 * metrics["toy.bdia.recon.max_error"]
