"""Interpolant conversion against the exact denoiser; rollover budget forcing's accounting and
its gain over best-of-N on a mixture with a known reward optimum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.core import CosineSchedule, LinearSchedule
from feynkit.inference import diffusion as dif
from feynkit.inference.diffusion.scaling import (
    convert_interpolant,
    matching_time,
    rollover_budget_forcing,
)
from feynkit.models import GaussianMixture

LINEAR, COSINE = LinearSchedule(), CosineSchedule()
ANGLES = np.arange(8) * np.pi / 4
GMM = GaussianMixture.create(
    np.ones(8) / 8, 4.0 * np.stack([np.cos(ANGLES), np.sin(ANGLES)], 1), scales=0.5
)
TARGET = jnp.array([0.0, 4.0])


def exact_eps(schedule):
    def model(x, t):
        return -schedule.sigma(t[0]) * GMM.marginal(schedule, t[0]).score(x)

    return model


def reward(x):
    return -jnp.sum((x - TARGET[None]) ** 2, -1)


def test_matching_time_inverts_snr():
    t = jnp.array([0.05, 0.3, 0.7, 0.95])
    ratio = COSINE.alpha(t) / COSINE.sigma(t)
    t_lin = matching_time(LINEAR, ratio, 1e-6, 1 - 1e-6)
    np.testing.assert_allclose(LINEAR.alpha(t_lin) / LINEAR.sigma(t_lin), ratio, rtol=1e-4)


def test_conversion_gives_the_exact_denoiser_of_the_other_schedule():
    converted = convert_interpolant(exact_eps(LINEAR), "eps", LINEAR, COSINE)
    x = jax.random.normal(jax.random.key(0), (16, 2)) * 3
    for s in (0.1, 0.5, 0.9):
        pred = converted(x, jnp.full((16,), s))
        ref = dif.to_prediction("eps", exact_eps(COSINE)(x, jnp.full((16,), s)), x, COSINE, s)
        np.testing.assert_allclose(pred.x0, ref.x0, rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(pred.eps, ref.eps, rtol=2e-3, atol=2e-3)


@pytest.fixture(scope="module")
def rbf_runs():
    x0 = jax.random.normal(jax.random.key(1), (128, 2))
    ts = dif.time_grid(10, 1.0, 1e-3)
    solver = dif.ddim(LINEAR, 1.0)
    run = jax.jit(
        lambda budget: rollover_budget_forcing(
            jax.random.key(2), solver, exact_eps(LINEAR), x0, ts, reward, budget
        ),
        static_argnums=0,
    )
    return {b: run(b) for b in (11, 41)}, x0, ts, solver


def test_rbf_respects_the_budget(rbf_runs):
    runs, *_ = rbf_runs
    for budget, res in runs.items():
        assert int(res.nfe.max()) <= budget
        assert res.accepted.shape == (10, 128)


def test_rbf_with_one_proposal_per_step_is_plain_sampling(rbf_runs):
    runs, x0, ts, solver = rbf_runs
    res = runs[11]  # share 1: every step takes its only proposal
    assert int(res.nfe.min()) == 11
    plain, _ = dif.sample(jax.random.key(3), solver, exact_eps(LINEAR), x0, ts, denoise_final=True)
    # same law, different noise: the mean reward agrees within Monte Carlo error (std ≈ 1.5)
    assert abs(float(res.reward.mean()) - float(reward(plain).mean())) < 6.0


def test_rbf_beats_best_of_n_at_equal_evaluations(rbf_runs):
    runs, x0, ts, solver = rbf_runs
    n = 41 // 11  # full runs that fit the same budget
    rewards = []
    for i in range(n):
        xi = jax.random.normal(jax.random.key(10 + i), x0.shape)
        x, _ = dif.sample(
            jax.random.key(20 + i), solver, exact_eps(LINEAR), xi, ts, denoise_final=True
        )
        rewards.append(reward(x))
    best_of_n = float(jnp.max(jnp.stack(rewards), 0).mean())
    assert float(runs[41].reward.mean()) > best_of_n


def test_budget_too_small():
    with pytest.raises(ValueError, match="budget"):
        rollover_budget_forcing(
            jax.random.key(0),
            dif.ddim(LINEAR, 1.0),
            exact_eps(LINEAR),
            jnp.zeros((4, 2)),
            dif.time_grid(10),
            reward,
            10,
        )


def test_rbf_is_an_smc_kernel_that_checkpoints_resume(tmp_path):
    """RBF runs on `smc.base`'s kernel: `run_checkpointed` split in two equals one run."""
    from feynkit.inference import smc

    ts = dif.time_grid(6, 1.0, 1e-3)
    loop = dif.rbf_sampler(dif.ddim(LINEAR, 1.0), exact_eps(LINEAR), ts, reward, 19)
    state0 = loop.init(jax.random.normal(jax.random.key(1), (16, 2)))
    key = jax.random.key(2)
    full, _ = smc.run_checkpointed(key, loop.kernel, state0, 6, tmp_path / "a", every=3)
    smc.run_checkpointed(key, loop.kernel, state0, 3, tmp_path / "b", every=3)
    resumed, infos = smc.run_checkpointed(key, loop.kernel, state0, 6, tmp_path / "b", every=3)
    assert len(infos) == 1
    a, b = loop.output(full), loop.output(resumed)
    np.testing.assert_array_equal(a.x0, b.x0)
    np.testing.assert_array_equal(a.nfe, b.nfe)
    assert int(a.nfe.max()) <= 19 and a.accepted.shape == (6, 16)
    ref = rollover_budget_forcing(
        key, dif.ddim(LINEAR, 1.0), exact_eps(LINEAR), state0.particles.x, ts, reward, 19
    )
    np.testing.assert_allclose(ref.x0, a.x0, rtol=1e-5, atol=1e-5)
