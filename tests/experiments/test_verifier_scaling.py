"""verifier_scaling: the smoke run end to end (small digits models trained once per session)."""

import pytest

from tests.experiments.smoke import smoke_run


@pytest.mark.slow
def test_smoke(tmp_path):
    m = smoke_run("verifier_scaling", tmp_path)["metrics"]
    for k in (1, 4):
        assert 0.0 <= m[f"imperfect.accuracy.k{k}"] <= 1.0
    # one sample is one draw from the pool: its accuracy is the pool's p (closed form at k=1)
    assert m["imperfect.predicted.k1"] == pytest.approx(m["weak.single_sample_accuracy"], abs=1e-6)


def test_bad_config_is_a_clear_error(tmp_path):
    # The schema checks values before any model is loaded.
    with pytest.raises(ValueError, match=r"experiment.verifier_t must lie in"):
        smoke_run("verifier_scaling", tmp_path, ("experiment.verifier_t=1.5",))
