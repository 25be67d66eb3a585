"""MCMC moves: invariance of a Gaussian, the MALA Hastings ratio against NumPy, acceptance."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.inference.smc import moves

MU = jnp.asarray([1.0, -2.0])
SCALE = jnp.asarray([0.5, 1.5])


def _logdensity(x):
    return -0.5 * jnp.sum(((x - MU) / SCALE) ** 2)


MOVES = {
    "random_walk": moves.random_walk(0.8),
    "mala": moves.mala(0.2),
    "hmc": moves.hmc(0.2, 3),  # L·ε = 0.6: off the half-period πσ of either axis
}


@pytest.mark.parametrize("name", sorted(MOVES))
def test_moves_keep_the_target_and_report_acceptance(name):
    # Exact draws stay exact: mean and variance after 20 moves within 5 s.e. (n = 4000).
    n = 4000
    x0 = MU[None] + SCALE[None] * jax.random.normal(jax.random.key(0), (n, 2))
    run = jax.jit(lambda k, x: moves.mutate(k, MOVES[name], x, _logdensity, 20))
    x, acc = run(jax.random.key(1), x0)
    x = np.asarray(x, np.float64)
    se_mean = np.asarray(SCALE) / np.sqrt(n)
    np.testing.assert_array_less(np.abs(x.mean(0) - np.asarray(MU)), 5 * se_mean)
    np.testing.assert_allclose(x.var(0), np.asarray(SCALE) ** 2, rtol=0.1)
    assert 0.3 < float(acc) <= 1.0
    assert not np.allclose(x, np.asarray(x0))  # it moved


def test_far_start_converges():
    x0 = jnp.full((2000, 2), 3.0)
    x, _ = jax.jit(lambda k: moves.mutate(k, MOVES["hmc"], x0, _logdensity, 100))(jax.random.key(2))
    np.testing.assert_allclose(np.mean(x, 0), MU, atol=0.1)


def test_mala_hastings_ratio_matches_numpy():
    rng = np.random.default_rng(3)
    x, xp, gx, gp = (rng.standard_normal((5, 3)) for _ in range(4))
    h = 0.37

    def logq(to, frm, g):  # log N(to; frm + h g, 2h I) up to the shared constant
        return -np.sum((to - frm - h * g) ** 2, axis=1) / (4 * h)

    ref = logq(x, xp, gp) - logq(xp, x, gx)
    got = moves.mala_log_proposal_ratio(*(jnp.asarray(a) for a in (x, xp, gx, gp)), h, True)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_tiny_step_accepts_almost_always():
    x0 = MU[None] + SCALE[None] * jax.random.normal(jax.random.key(4), (500, 2))
    _, acc = moves.mutate(jax.random.key(5), moves.random_walk(1e-3), x0, _logdensity, 2)
    assert float(acc) > 0.99


def test_bad_parameters():
    with pytest.raises(ValueError, match="step_size must be > 0"):
        moves.mala(0.0)
    with pytest.raises(ValueError, match="num_leapfrog"):
        moves.hmc(0.1, 0)
    with pytest.raises(ValueError, match="num_steps"):
        moves.mutate(jax.random.key(0), MOVES["mala"], jnp.zeros((3, 2)), _logdensity, 0)


def test_blackjax_kernel_as_move():
    blackjax = pytest.importorskip("blackjax")
    n = 4000
    x0 = MU[None] + SCALE[None] * jax.random.normal(jax.random.key(6), (n, 2))
    bj = functools.partial(blackjax.mala.build_kernel(), step_size=0.2)
    x_bj, acc_bj = jax.jit(
        lambda k: moves.mutate(k, bj, x0, _logdensity, 20, init_fn=blackjax.mala.init)
    )(jax.random.key(7))
    x_fk, acc_fk = jax.jit(lambda k: moves.mutate(k, MOVES["mala"], x0, _logdensity, 20))(
        jax.random.key(7)
    )
    # same algorithm, same target: the acceptance rates agree within Monte Carlo error
    np.testing.assert_allclose(float(acc_bj), float(acc_fk), atol=0.02)
    np.testing.assert_allclose(np.var(x_bj, 0), SCALE**2, rtol=0.1)
