"""flow_scaling: the smoke run end to end (small toy model trained once per session)."""

import pytest

from tests.experiments.smoke import smoke_run


@pytest.mark.slow
def test_smoke(tmp_path):
    m = smoke_run("flow_scaling", tmp_path)["metrics"]
    for n in (1, 2):
        assert m[f"rbf_sde.mean_nfe.x{n}"] <= n * 5  # budget: n runs of 4 steps + 1
        assert m[f"best_of_n_ode.reward.x{n}"] <= 0.0


def test_bad_config_is_a_clear_error(tmp_path):
    # The schema checks values before any model is loaded.
    with pytest.raises(ValueError, match=r"experiment.target_mode names one of"):
        smoke_run("flow_scaling", tmp_path, ("experiment.target_mode=8",))
