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
    assert m["linear_ag.nfe"] == 2 * steps - 5  # estimates from step 5 on
    assert m["ag.rms_to_cfg"] >= 0 and m["ag.wall_ratio"] > 0


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


def test_yaml_claim_bounds_follow_the_smoke_settings():
    # guidance_adaptive states its bounded claims in the YAML with the bounds interpolated from
    # its keys, so smoke_overrides (and command-line overrides) reach them.
    from feynkit.experiments import harness
    from feynkit.experiments.replications.guidance_adaptive import GuidanceAdaptiveConfig

    cfg = smoke_config("guidance_adaptive", ("experiment.max_wall_ratio=0.5",))
    for smoke, rms, wall in ((True, 1e6, 1e6), (False, 0.15, 0.5)):
        cfg.smoke = smoke
        ex = harness.experiment_node(cfg, GuidanceAdaptiveConfig)
        bounds = {c.name: c.bound for c in ex.claims}
        assert ex.max_rms_to_cfg == bounds["AG RMS distance to CFG < bound"] == rms
        assert ex.max_wall_ratio == bounds["AG wall time / CFG wall time < bound"] == wall
