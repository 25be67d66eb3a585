"""guidance_adaptive and guidance_classifier: smoke runs end to end (cached models) and config
validation."""

import pytest

from feynkit.experiments.run import run_experiment
from tests.experiments.smoke import smoke_config, smoke_run


@pytest.mark.slow
def test_smoke_guidance_adaptive(tmp_path):
    m = smoke_run("guidance_adaptive", tmp_path)["metrics"]
    steps = 10  # SMOKE num_steps
    assert m["cfg.nfe"] == 2 * steps and m["unguided.nfe"] == steps
    assert steps <= m["ag.nfe"] <= 2 * steps
    # LinearAG: steps 1 and 3 estimated, steps 5..9 conditional-only
    assert m["linear_ag.nfe"] == m["cond_only.nfe"] == 3 * 2 + 2 + 5
    assert m["cfg_equal_nfe_linear_ag.nfe"] >= m["linear_ag.nfe"]
    assert m["cfg_equal_nfe_ag.nfe"] >= m["ag.nfe"]
    assert -1 <= m["gamma.step0"] <= 1


@pytest.mark.slow
def test_smoke_guidance_classifier(tmp_path):
    m = smoke_run("guidance_classifier", tmp_path)["metrics"]
    assert m["temperature"] > 0
    assert 0 <= m["ece.x0_hat.calibrated"] <= 1
    for name in ("naive", "x0", "x0_temperature", "calibrated", "noise_aware"):
        assert 0 <= m[f"{name}.best.class_accuracy"] <= 1


@pytest.mark.parametrize(
    "name,override,message",
    [
        ("guidance_adaptive", "experiment.guidance_weight=-1", "guidance_weight"),
        ("guidance_classifier", "experiment.sine_gamma=-0.5", "sine_gamma"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, name, override, message):
    # Checked before any model is loaded (keys the smoke settings do not replace).
    with pytest.raises(ValueError, match=message):
        run_experiment(smoke_config(name, (override,)), tmp_path)
