"""fkc_cfg_digits and fkc_gmm: the exact 64-D reference, the per-mode masses the floors are
measured in, the smoke run end to end, and config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.core import LinearSchedule
from feynkit.experiments.replications.fkc_cfg_digits import digits_mixture, log_posterior
from feynkit.experiments.replications.fkc_gmm import make_targets, mode_masses, mode_mixture
from tests.experiments.smoke import smoke_run


def test_digits_mixture_posterior_is_exact_and_normalised():
    p = digits_mixture(0.5)
    assert p.dim == 64 and p.num_components == 10
    x, lab = p.sample_with_labels(jax.random.key(0), 2000)
    post = jnp.stack([log_posterior(x, p, c) for c in range(10)], -1)
    np.testing.assert_allclose(jnp.sum(jnp.exp(post), -1), 1.0, rtol=1e-4)
    # Bayes-optimal accuracy on draws of the mixture itself: well above chance
    assert float(jnp.mean(jnp.argmax(post, -1) == lab)) > 0.9


def test_mode_masses_match_brute_force():
    class Cfg:
        t_min = 1e-3

    sched = LinearSchedule()
    targets = make_targets("product", 2)
    modes = mode_mixture("product", targets, Cfg, sched)
    assert modes.num_components == 4  # the 2 × 2 product components
    x = jax.random.normal(jax.random.key(1), (500, 2)) * 2.0
    w = jax.random.uniform(jax.random.key(2), (500,))
    m = mode_masses(modes, x, w)
    lp = np.asarray(modes.component_log_probs(x))
    ref = np.array([np.sum(np.asarray(w)[lp.argmax(1) == k]) for k in range(4)]) / float(w.sum())
    np.testing.assert_allclose(m, ref, rtol=1e-5)
    np.testing.assert_allclose(mode_masses(modes, x).sum(), 1.0, rtol=1e-6)


@pytest.mark.slow
def test_smoke(tmp_path):
    m = smoke_run("fkc_cfg_digits", tmp_path)["metrics"]
    assert 0.0 < m["w3.class3.reference_acceptance"] <= 1.0
    assert m["w3.fkc.energy_distance"] >= 0 and m["w3.naive.energy_distance"] >= 0
    assert m["w3.floor.energy_distance"] > 0


def test_bad_config_is_a_clear_error(tmp_path):
    # The schema checks values before any JAX work.
    with pytest.raises(ValueError, match=r"experiment.resampler must be one of"):
        smoke_run("fkc_cfg_digits", tmp_path, ("experiment.resampler=bogus",))


def test_class_shrink_scales_every_mean_gap_exactly():
    # pulling means toward their centroid by s multiplies every pairwise gap by (1 - s)
    m0 = np.asarray(digits_mixture(0.5).means)
    m1 = np.asarray(digits_mixture(0.5, 0.7).means)
    g0 = np.linalg.norm(m0[:, None] - m0[None], axis=-1)
    g1 = np.linalg.norm(m1[:, None] - m1[None], axis=-1)
    np.testing.assert_allclose(g1, 0.3 * g0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m1.mean(0), m0.mean(0), atol=1e-6)
