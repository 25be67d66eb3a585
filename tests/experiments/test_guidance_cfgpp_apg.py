"""guidance_cfgpp and guidance_apg: smoke runs end to end (cached toy/digits models), config
validation, and the toy metrics on ground-truth samples."""

import math

import jax
import pytest

from feynkit.experiments.data import circle_centers
from feynkit.experiments.replications.guidance_cfgpp import toy_metrics
from tests.experiments.smoke import smoke_run


def test_toy_metrics_on_ground_truth():
    labels = jax.random.randint(jax.random.key(0), (4000,), 0, 8)
    c = circle_centers(8, 4.0)[labels]
    gt = c + 0.5 * jax.random.normal(jax.random.key(1), (4000, 2))
    m = toy_metrics(gt, labels, gt)
    assert m["energy_distance"] == pytest.approx(0.0, abs=1e-3)
    assert abs(m["radial_shift"]) < 0.03  # E⟨ε, c/|c|⟩ = 0; sd 0.5/sqrt(4000) ≈ 0.008
    assert m["mode_distance"] == pytest.approx(0.5 * math.sqrt(math.pi / 2), abs=0.03)
    pushed = toy_metrics(gt + 0.5 * c / 4.0, labels, gt)  # samples pushed outward by 0.5
    assert pushed["radial_shift"] == pytest.approx(0.5 + m["radial_shift"], abs=1e-4)
    assert pushed["energy_distance"] > 0.2


@pytest.mark.slow
def test_smoke_cfgpp(tmp_path):
    m = smoke_run("guidance_cfgpp", tmp_path)["metrics"]
    assert m["lambda0.6.cfgpp.scale"] == 0.6
    assert m["lambda0.6.cfg.scale"] == pytest.approx(0.6 * m["equivalent_omega_per_lambda"])
    assert m["lambda0.6.cfgpp.inversion_rmse"] >= 0


@pytest.mark.slow
def test_smoke_apg(tmp_path):
    m = smoke_run("guidance_apg", tmp_path)["metrics"]
    assert 0.0 <= m["digits.apg.saturated_fraction"] <= 1.0
    assert m["toy.apg_w10.energy_distance"] >= 0


@pytest.mark.parametrize(
    "name,override,message",
    [
        ("guidance_cfgpp", "experiment.nominal_slope=-1", "nominal_slope"),
        ("guidance_apg", "experiment.scale=0.5", "must be > 1"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, name, override, message):
    with pytest.raises(ValueError, match=message):
        smoke_run(name, tmp_path, (override,))
