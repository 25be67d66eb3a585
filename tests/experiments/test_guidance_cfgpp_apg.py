"""guidance_cfgpp and guidance_apg: smoke runs end to end (cached toy/digits models), config
validation, and the toy metrics on ground-truth samples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.core import LinearSchedule
from feynkit.experiments.replications.guidance_cfgpp import (
    COND,
    UNCOND,
    posterior,
    precision_recall,
)
from tests.experiments.smoke import smoke_run


def test_posterior_and_precision_recall_on_exact_samples():
    sched = LinearSchedule()
    x, lab = UNCOND.sample_with_labels(jax.random.key(0), 4000)
    # exact p(c | x) is calibrated: its mean over p(x) is p(c) = 1/2, and it tracks the labels
    p = posterior(x, sched, 1e-3)
    assert float(jnp.mean(p)) == pytest.approx(0.5, abs=0.02)  # sd ≈ 0.4/sqrt(4000)
    in_c = np.asarray(lab) <= 1
    assert float(jnp.mean(p[in_c])) > 0.8 and float(jnp.mean(p[~in_c])) < 0.2
    a, b = COND.sample(jax.random.key(1), 800), COND.sample(jax.random.key(2), 800)
    prec, rec = precision_recall(a, b, 3)
    assert prec > 0.85 and rec > 0.85  # same law: both near 1 (k-NN balls, k = 3)
    prec_s, rec_s = precision_recall(a + 6.0, b, 3)  # shifted far away: neither covers
    assert prec_s < 0.3 and rec_s < 0.3
    mode = COND.means[0][None] + 0.01 * a  # collapsed onto one point
    prec_c, rec_c = precision_recall(mode, b, 3)
    assert rec_c < 0.2  # a collapsed sample loses recall


@pytest.mark.slow
def test_smoke_cfgpp(tmp_path):
    m = smoke_run("guidance_cfgpp", tmp_path)["metrics"]
    for w in (1, 2, 4.5, 12.5):  # CFG adherence rises with ω, recall falls
        assert 0 <= m[f"cfg.omega{w:g}.adherence"] <= 1
    assert m["cfg.omega12.5.recall"] < m["cfg.omega1.recall"]
    assert m["cfgpp.lambda0.6.adherence"] > m["cfgpp.lambda0.2.adherence"]


@pytest.mark.slow
def test_smoke_apg(tmp_path):
    m = smoke_run("guidance_apg", tmp_path)["metrics"]
    assert 0.0 <= m["digits.apg.saturated_fraction"] <= 1.0
    assert m["toy.apg_w10.energy_distance"] >= 0


@pytest.mark.parametrize(
    "name,override,message",
    [
        ("guidance_cfgpp", "experiment.recall_k=0", "recall_k"),
        ("guidance_apg", "experiment.scale=0.5", "must be > 1"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, name, override, message):
    with pytest.raises(ValueError, match=message):
        smoke_run(name, tmp_path, (override,))
