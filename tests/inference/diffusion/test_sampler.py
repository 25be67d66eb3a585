"""The one sampling loop: nfe counting, guidance skipped by lax.cond, trajectory, time grids,
compile-once under jit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.core import CosineSchedule, LinearSchedule, RectifiedFlowSchedule
from feynkit.inference.diffusion import Guidance, Prediction, sample, time_grid
from feynkit.inference.diffusion.solvers import ddim, dpm_solver_pp_2m, heun

LIN = LinearSchedule()
MU_C, MU_U, S0 = jnp.array([2.0, -1.0]), jnp.array([0.0, 0.5]), 0.8
B = 4


def model(x, t, label):
    """Exact ε of N(μ, S0² I) noised by LIN; μ = MU_C for label 1, MU_U otherwise."""
    a, s = LIN.alpha(t)[:, None], LIN.sigma(t)[:, None]
    mu = jnp.where((label == 1)[:, None], MU_C[None], MU_U[None])
    return (x - a * mu) * s / (a * a * S0 * S0 + s * s)


COND = {"label": jnp.ones((B,), jnp.int32)}
UNCOND = {"label": jnp.zeros((B,), jnp.int32)}


def cfg(w, t_switch=None):
    """CFG with scale w; with t_switch, the unconditional branch is used only for t > t_switch."""

    def combine(pc, pu, state, t):
        return jax.tree.map(lambda c, u: u + w * (c - u), pc, pu), state

    needs = None if t_switch is None else (lambda state, t: t > t_switch)
    return Guidance(lambda x: None, combine, needs)


def pred_model(x, t, label):
    """The same model returning a `Prediction` (t a scalar)."""
    eps = model(x, jnp.full((x.shape[0],), t), label)
    return Prediction((x - LIN.sigma(t) * eps) / LIN.alpha(t), eps)


def x_init(key=0):
    return jax.random.normal(jax.random.key(key), (B, 2))


@pytest.fixture(scope="module")
def nfe_runs():
    """nfe of several configurations, in one compilation."""
    ts = time_grid(8, 1.0, 0.02)

    def run(x):
        def go(solver, m=model, **kw):
            return sample(jax.random.key(0), solver, m, x, ts, cond=COND, **kw)

        guided = {"uncond": UNCOND, "guidance": cfg(3.0)}
        interval = {"uncond": UNCOND, "guidance": cfg(3.0, 0.5)}
        out = {
            "plain": go(ddim(LIN)),
            "heun": go(heun(LIN)),
            "final": go(ddim(LIN), denoise_final=True),
            "cfg": go(ddim(LIN), **guided),
            "cfg_sep": go(ddim(LIN), batch_branches=False, **guided),
            "interval": go(ddim(LIN), **interval),
            "heun_interval": go(heun(LIN), **interval),
            "given_pred": go(ddim(LIN), pred_model, prediction="prediction"),
        }
        return {k: (v[0], v[1].nfe) for k, v in out.items()}

    return ts, jax.jit(run)(x_init())


def test_nfe_counts(nfe_runs):
    ts, out = nfe_runs
    n = 8
    assert int(out["plain"][1]) == n
    assert int(out["heun"][1]) == 2 * n
    assert int(out["final"][1]) == n + 1
    assert int(out["cfg"][1]) == 2 * n  # a conditional and an unconditional evaluation
    assert int(out["cfg_sep"][1]) == 2 * n
    on = int(jnp.sum(ts[:-1] > 0.5))  # steps whose time needs the unconditional branch
    assert 0 < on < n
    assert int(out["interval"][1]) == n + on
    # Heun evaluates at t and t_next: the second evaluation of step i is at ts[i + 1].
    on2 = int(jnp.sum(ts[1:] > 0.5))
    assert int(out["heun_interval"][1]) == 2 * n + on + on2


def test_batched_and_separate_branches_agree(nfe_runs):
    _, out = nfe_runs
    np.testing.assert_allclose(out["cfg"][0], out["cfg_sep"][0], rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(out["cfg"][0] - out["plain"][0]).max()) > 0.1


def test_guidance_skip_does_not_evaluate_uncond():
    """With needs_uncond false the unconditional model is never called (lax.cond, not a
    select), and combine receives the conditional prediction twice."""
    calls = []

    def counting_model(x, t, label):
        jax.debug.callback(lambda lab: calls.append(int(np.asarray(lab)[0])), label)
        return model(x, t, label)

    seen = []

    def combine(pc, pu, state, t):
        jax.debug.callback(lambda d: seen.append(float(d)), jnp.abs(pc.eps - pu.eps).max())
        return pc, state

    never = Guidance(lambda x: None, combine, lambda state, t: t > 2.0)
    ts = time_grid(5, 1.0, 0.02)
    run = jax.jit(
        lambda x: sample(
            jax.random.key(0),
            ddim(LIN),
            counting_model,
            x,
            ts,
            guidance=never,
            cond=COND,
            uncond=UNCOND,
            batch_branches=False,
        )
    )
    x, info = run(x_init())
    jax.effects_barrier()
    assert int(info.nfe) == 5
    assert calls == [1] * 5  # only conditional calls
    assert seen == [0.0] * 5
    plain, _ = sample(jax.random.key(0), ddim(LIN), model, x_init(), ts, cond=COND)
    np.testing.assert_allclose(x, plain, rtol=1e-5, atol=1e-6)
    assert "cond" in str(jax.make_jaxpr(run)(x_init()))


def test_trajectory_prefixes():
    ts = time_grid(6, 1.0, 0.02)
    solver = dpm_solver_pp_2m(LIN)  # a solver with state: the prefix property needs it kept
    x, info = sample(
        jax.random.key(1), solver, model, x_init(), ts, cond=COND, return_trajectory=True
    )
    traj = info.trajectory
    assert traj.shape == (7, B, 2)
    np.testing.assert_array_equal(traj[0], x_init())
    np.testing.assert_array_equal(traj[-1], x)
    x3, info3 = sample(jax.random.key(1), solver, model, x_init(), ts[:4], cond=COND)
    np.testing.assert_allclose(traj[3], x3, rtol=1e-6, atol=1e-6)
    assert info3.trajectory is None and int(info3.nfe) == 3


def test_denoise_final_returns_x0(nfe_runs):
    ts, out = nfe_runs
    x, x0 = (np.asarray(out[k][0], np.float64) for k in ("plain", "final"))
    a = np.exp(-0.5 * (0.1 * 0.02 + 0.5 * 19.9 * 0.02**2))  # α, σ of LIN at t = 0.02
    s = np.sqrt(1 - a * a)
    eps = (x - a * np.asarray(MU_C)) * s / (a * a * S0 * S0 + s * s)
    np.testing.assert_allclose(x0, (x - s * eps) / a, rtol=1e-4, atol=1e-4)


def test_sample_with_prediction_kind_prediction(nfe_runs):
    _, out = nfe_runs
    np.testing.assert_allclose(out["given_pred"][0], out["plain"][0], rtol=1e-6, atol=1e-6)


def test_jit_compiles_once():
    ts = time_grid(5, 1.0, 0.02)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(key, x):
        return sample(
            key, ddim(LIN, eta=0.5), model, x, ts, guidance=cfg(2.0, 0.5), cond=COND, uncond=UNCOND
        )

    a, _ = run(jax.random.key(0), x_init(0))
    b, _ = run(jax.random.key(1), x_init(1))  # new values, same shapes: no retrace
    assert not np.allclose(a, b)


def test_sample_rejects_bad_grid():
    with pytest.raises(ValueError, match="1-D grid of ≥ 2 times"):
        sample(jax.random.key(0), ddim(LIN), model, x_init(), jnp.array([1.0]), cond=COND)


SCHEDULES = [LIN, CosineSchedule(), RectifiedFlowSchedule()]
SCHED_IDS = ["linear", "cosine", "rectified_flow"]


@pytest.mark.parametrize("spacing", ["uniform", "log_snr", "edm"])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=SCHED_IDS)
def test_time_grid_monotone_and_exact_ends(schedule, spacing):
    t_max, t_min = 0.99, 1e-3
    ts = np.asarray(
        jax.jit(time_grid, static_argnums=(0, 1, 2, 3, 4))(16, t_max, t_min, spacing, schedule)
    )
    assert ts.shape == (17,)
    assert ts[0] == np.float32(t_max) and ts[-1] == np.float32(t_min)  # exact endpoints
    assert np.all(np.diff(ts) < 0)
    lam = np.asarray(schedule.log_snr(jnp.asarray(ts)), np.float64)
    if spacing == "log_snr":  # equal steps in λ
        np.testing.assert_allclose(np.diff(lam), (lam[-1] - lam[0]) / 16, rtol=2e-3)
    if spacing == "edm":  # σ̃ = exp(−λ/2) on Karras et al.'s ρ = 7 grid
        st = np.exp(-0.5 * lam)
        u = np.linspace(0, 1, 17)
        want = (st[0] ** (1 / 7) + u * (st[-1] ** (1 / 7) - st[0] ** (1 / 7))) ** 7
        np.testing.assert_allclose(st, want, rtol=2e-3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_steps": 0}, "num_steps must be ≥ 1"),
        ({"t_max": 0.1, "t_min": 0.2}, "need t_max > t_min"),
        ({"spacing": "cubic"}, "unknown spacing 'cubic'"),
        ({"spacing": "log_snr"}, "needs the schedule"),
    ],
)
def test_time_grid_errors(kwargs, match):
    args = {"num_steps": 4, "t_max": 1.0, "t_min": 1e-3} | kwargs
    with pytest.raises(ValueError, match=match):
        time_grid(**args)
