"""fkc_cfg_digits: the smoke run end to end, and the weighted moments it scores with."""

import numpy as np
import pytest

from feynkit.experiments.replications.fkc_cfg_digits import weighted_moments
from tests.experiments.smoke import smoke_run


def test_weighted_moments_match_repetition():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(5, 3))
    counts = np.array([1, 3, 2, 1, 4])
    mu, cov = weighted_moments(f, counts.astype(float))
    rep = np.repeat(f, counts, axis=0)
    np.testing.assert_allclose(mu, rep.mean(0))
    # reliability-weights correction differs from np.cov's frequency weights; check against
    # the closed form with normalised weights w: Σ w (f − μ)(f − μ)ᵀ / (1 − Σ w²)
    w = counts / counts.sum()
    c = f - mu
    np.testing.assert_allclose(cov, (c * w[:, None]).T @ c / (1 - np.sum(w**2)))
    mu_u, cov_u = weighted_moments(f, np.ones(5))
    np.testing.assert_allclose(cov_u, np.cov(f, rowvar=False))


@pytest.mark.slow
def test_smoke(tmp_path):
    written = smoke_run("fkc_cfg_digits", tmp_path)
    m = written["metrics"]
    assert 0.0 <= m["w2.fkc.class_accuracy"] <= 1.0
    assert m["w2.fkc.fd_to_reference"] >= 0 and m["w2.naive_cfg.fd_to_reference"] >= 0


def test_bad_config_is_a_clear_error(tmp_path):
    # The schema checks values before any model is loaded.
    with pytest.raises(ValueError, match=r"experiment.resampler must be one of"):
        smoke_run("fkc_cfg_digits", tmp_path, ("experiment.resampler=bogus",))
