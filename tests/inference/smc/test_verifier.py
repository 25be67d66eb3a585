"""Resample-until-accepted: closed form against simulation, the ceiling, bad input."""

import jax
import numpy as np
import pytest

from feynkit.inference.smc.verifier import (
    resample_until_accepted,
    verifier_accuracy,
    verifier_ceiling,
)


def _pools(rng, p, tpr, fpr, problems, pool):
    correct = rng.random((problems, pool)) < p[:, None]
    accept_p = np.where(correct, tpr[:, None], fpr[:, None])
    accepted = rng.random((problems, pool)) < accept_p
    return correct, accepted


@pytest.mark.parametrize("abstain", [False, True])
def test_closed_form_matches_simulation(abstain):
    rng = np.random.default_rng(0)
    p = np.array([0.1, 0.3, 0.6])
    tpr = np.array([0.9, 0.8, 1.0])
    fpr = np.array([0.05, 0.2, 0.1])
    # Large pools so that the empirical rates equal p, tpr, fpr to ~0.005.
    correct, accepted = _pools(rng, p, tpr, fpr, 3, 20000)
    p_hat = correct.mean(1)
    tpr_hat = (correct & accepted).sum(1) / correct.sum(1)
    fpr_hat = (~correct & accepted).sum(1) / (~correct).sum(1)
    budgets = [1, 2, 4, 16, 64]
    sim = resample_until_accepted(
        jax.random.key(0), correct, accepted, budgets, num_trials=4000, abstain=abstain
    )
    exact = [
        float(np.mean(verifier_accuracy(p_hat, tpr_hat, fpr_hat, k, abstain=abstain)))
        for k in budgets
    ]
    # 3 problems × 4000 trials: binomial std ≤ 0.005; 4 std.
    np.testing.assert_allclose(sim, exact, atol=0.02)


def test_ceiling_and_limits():
    p, tpr, fpr = 0.2, 0.9, 0.1
    ceiling = float(verifier_ceiling(p, tpr, fpr))
    assert ceiling == pytest.approx(0.18 / (0.18 + 0.08))
    assert float(verifier_accuracy(p, tpr, fpr, 10_000)) == pytest.approx(ceiling, abs=1e-9)
    assert float(verifier_accuracy(p, tpr, fpr, 1)) == pytest.approx(p)  # one sample: p
    assert float(verifier_ceiling(p, tpr, 0.0)) == 1.0  # a perfect verifier has no ceiling
    curve = np.asarray(verifier_accuracy(p, tpr, fpr, np.arange(1, 50)))
    assert np.all(np.diff(curve) >= -1e-12) and curve[-1] < ceiling + 1e-9


def test_bad_input():
    with pytest.raises(ValueError, match="shape"):
        resample_until_accepted(jax.random.key(0), np.ones((2, 3), bool), np.ones((3,), bool), [1])
    with pytest.raises(ValueError, match="budgets"):
        resample_until_accepted(
            jax.random.key(0), np.ones((2, 3), bool), np.ones((2, 3), bool), [0]
        )
