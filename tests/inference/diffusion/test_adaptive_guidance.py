"""Tests for Adaptive Guidance and LinearAG (inference/diffusion/adaptive_guidance.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.core import LinearSchedule
from feynkit.inference.diffusion import Guidance, Prediction, ddim, sample, time_grid
from feynkit.inference.diffusion.adaptive_guidance import (
    adaptive_guidance,
    cosine_similarity,
    fit_linear_ag,
    linear_ag,
    linear_ag_calibration,
    linear_ag_replaced,
)

SCHEDULE = LinearSchedule()
STEPS = 12
W = 3.0


MEANS = jnp.array([[2.0, 0.0], [-2.0, 1.0], [0.0, -2.5]])
SCALE = 0.5


def _mixture_eps(x, t, means):
    """Exact ε = −σ ∇ log p_t for an equal-weight isotropic Gaussian mixture (scale 0.5)."""
    a, s = SCHEDULE.alpha(t), SCHEDULE.sigma(t)
    v = a**2 * SCALE**2 + s**2
    diff = x[:, None, :] - a * means[None]  # (n, K, d)
    r = jax.nn.softmax(-0.5 * jnp.sum(diff**2, -1) / v, axis=1)
    return s * jnp.sum(r[..., None] * diff, axis=1) / v


def _exact_model():
    """Exact ε-model: label 1 = one Gaussian (the 'conditional'), label 0 = a 3-mode mixture."""

    def model_fn(x, t, label):
        e_c = _mixture_eps(x, t[0], MEANS[:1])
        e_u = _mixture_eps(x, t[0], MEANS)
        return jnp.where((label == 1)[:, None], e_c, e_u)

    return model_fn


def _cfg(scale):
    return Guidance(
        lambda x: None,
        lambda c, u, s, t: (jax.tree.map(lambda a, b: b + scale * (a - b), c, u), s),
    )


def _run(guidance, n=64, key=0, steps=STEPS):
    x0 = jax.random.normal(jax.random.key(key), (n, 2))
    kw = dict(cond={"label": jnp.ones(n, jnp.int32)}, uncond={"label": jnp.zeros(n, jnp.int32)})
    run = jax.jit(
        lambda x: sample(
            jax.random.key(1),
            ddim(SCHEDULE),
            _exact_model(),
            x,
            time_grid(steps),
            guidance=guidance,
            **kw,
        )
    )
    return run(x0)


def test_cosine_similarity_matches_numpy():
    a, b = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
    ref = np.sum(np.asarray(a) * np.asarray(b), axis=(1, 2)) / (
        np.linalg.norm(np.asarray(a).reshape(5, -1), axis=1)
        * np.linalg.norm(np.asarray(b).reshape(5, -1), axis=1)
    )
    np.testing.assert_allclose(cosine_similarity(a, b), ref, rtol=1e-5)


def test_ag_never_switching_is_cfg():
    x_cfg, info_cfg = _run(_cfg(W))
    x_ag, info_ag = _run(adaptive_guidance(W, threshold=1.1))
    np.testing.assert_allclose(x_ag, x_cfg, rtol=1e-5, atol=1e-6)
    assert int(info_ag.nfe) == int(info_cfg.nfe) == 2 * STEPS


def test_ag_switching_at_once_is_one_cfg_step_then_conditional():
    x_ag, info = _run(adaptive_guidance(W, threshold=-1.0))
    assert int(info.nfe) == 2 + (STEPS - 1)
    # Reference: one CFG step, then plain conditional DDIM from there.
    n = 64
    x0 = jax.random.normal(jax.random.key(0), (n, 2))
    ts = time_grid(STEPS)
    lab = {"label": jnp.ones(n, jnp.int32)}
    x1, _ = sample(
        jax.random.key(1),
        ddim(SCHEDULE),
        _exact_model(),
        x0,
        ts[:2],
        guidance=_cfg(W),
        cond=lab,
        uncond={"label": jnp.zeros(n, jnp.int32)},
    )
    x_ref, _ = sample(jax.random.key(1), ddim(SCHEDULE), _exact_model(), x1, ts[1:], cond=lab)
    np.testing.assert_allclose(x_ag, x_ref, rtol=1e-5, atol=1e-5)


def test_ag_state_switches_once_gamma_passes_and_batch_reduction():
    g_all = adaptive_guidance(W, threshold=0.9, reduce="all")
    g_mean = adaptive_guidance(W, threshold=0.9, reduce="mean")
    x = jnp.zeros((2, 3))
    c = Prediction(x, jnp.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    u = Prediction(x, jnp.array([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0]]))  # sims 1.0 and 0.447
    t = jnp.asarray(0.5)
    _, s_all = g_all.combine(c, u, g_all.init(x), t)
    _, s_mean = g_mean.combine(c, u, g_mean.init(x), t)
    assert bool(s_all.active) and np.isclose(float(s_all.gamma), 0.5 / np.sqrt(1.25), rtol=1e-5)
    assert bool(s_mean.active)  # mean 0.724 < 0.9
    out, s2 = g_all.combine(c, c, s_all, t)
    assert not bool(s2.active) and int(s2.guided) == 2
    np.testing.assert_allclose(out.eps, c.eps)  # CFG of (c, c) is c
    assert not bool(g_all.needs_uncond(s2, t))


def test_ag_skips_late_steps_and_stays_close_to_cfg():
    x_cfg, _ = _run(_cfg(W), n=256)
    x_ag, info = _run(adaptive_guidance(W, threshold=0.999, t_max_switch=0.6), n=256)
    x_cond, _ = _run(None, n=256)  # no guidance at all: the conditional model alone
    # γ_t (min over the batch) is ≥ 0.993 at the first step, then dips below 0, and exceeds
    # 0.999 again from t = 0.25 (step 9 of 12): AG guides 10 steps and skips 2.
    assert int(info.nfe) == 2 * STEPS - 2
    x_early, info_early = _run(adaptive_guidance(W, threshold=0.99), n=256)
    assert int(info_early.nfe) == STEPS + 1  # without t_max_switch it stops at once

    def rms(a, b):
        return float(jnp.sqrt(jnp.mean(jnp.sum((a - b) ** 2, -1))))

    # Same noise, same key: AG's late conditional-only steps change little of what CFG does.
    assert rms(x_ag, x_cfg) < 0.5 * rms(x_cond, x_cfg), (rms(x_ag, x_cfg), rms(x_cond, x_cfg))


def test_ag_jit_compiles_once():
    n = 16
    x0 = jax.random.normal(jax.random.key(0), (n, 2))
    g = adaptive_guidance(W, 0.99)
    traces = []

    @jax.jit
    def run(x):
        traces.append(1)
        return sample(
            jax.random.key(1),
            ddim(SCHEDULE),
            _exact_model(),
            x,
            time_grid(STEPS),
            guidance=g,
            cond={"label": jnp.ones(n, jnp.int32)},
            uncond={"label": jnp.zeros(n, jnp.int32)},
        )

    a, _ = run(x0)
    b, _ = run(x0 + 1.0)
    assert len(traces) == 1
    chex.assert_tree_all_finite((a, b))


def test_fit_linear_ag_recovers_exact_coefficients():
    key = jax.random.key(3)
    ec = jax.random.normal(key, (6, 8, 5))
    k2 = jax.random.fold_in(key, 1)
    eu0 = jax.random.normal(k2, (8, 5))
    beta = jnp.array([0.7, -0.3, 0.5])
    eu = [eu0]
    for i in range(1, 6):
        eu.append(beta[0] * ec[i] + beta[1] * ec[i - 1] + beta[2] * eu[-1])
    eu = jnp.stack(eu)
    coefs = fit_linear_ag(ec, eu, history=1, ridge=0.0)
    assert coefs.shape == (6, 3)
    np.testing.assert_allclose(coefs[1:], np.tile(beta, (5, 1)), atol=1e-4)
    # Step 0 has no history: the past coefficients are 0.
    np.testing.assert_allclose(coefs[0, 1:], 0.0, atol=1e-6)


def test_linear_ag_combine_uses_the_estimate():
    coefs = jnp.array([[0.0, 0.0, 0.0], [0.5, 0.25, 2.0]])
    g = linear_ag(2.0, coefs, SCHEDULE, start_step=1)
    x = jnp.ones((3, 2))
    t = jnp.asarray(0.4)
    a, s = SCHEDULE.alpha(t), SCHEDULE.sigma(t)

    def pred(e):
        return Prediction((x - s * e) / a, e)

    st = g.init(x)
    assert bool(g.needs_uncond(st, t))
    e_c0, e_u0 = jnp.full((3, 2), 1.0), jnp.full((3, 2), -1.0)
    _, st = g.combine(pred(e_c0), pred(e_u0), st, t)
    assert not bool(g.needs_uncond(st, t))
    e_c1 = jnp.full((3, 2), 2.0)
    out, st = g.combine(pred(e_c1), pred(e_c1), st, t)
    e_u_est = 0.5 * 2.0 + 0.25 * 1.0 + 2.0 * -1.0
    np.testing.assert_allclose(out.eps, e_u_est + 2.0 * (2.0 - e_u_est), rtol=1e-6)
    np.testing.assert_allclose(a * out.x0 + s * out.eps, x, rtol=1e-5)  # consistent pair
    np.testing.assert_allclose(st.eps_uncond[0], 0.0)  # the estimate is not fed back
    np.testing.assert_allclose(st.eps_cond[0], e_c1)
    assert bool(g.needs_uncond(st, t))  # past the coefficients' range: evaluate again


def test_ag_per_sample_switches_each_sample_as_if_run_alone():
    """reduce="sample": in a batch every sample follows its own switch — the same result and
    the same guided count as running that sample alone with a batch decision."""
    n, thr = 6, 0.999
    g = adaptive_guidance(W, thr, reduce="sample", t_max_switch=0.6)
    x_b, info_b = _run(g, n=n, key=3)
    x0 = jax.random.normal(jax.random.key(3), (n, 2))
    alone = adaptive_guidance(W, thr, reduce="all", t_max_switch=0.6)

    def one(x):
        return sample(
            jax.random.key(1),
            ddim(SCHEDULE),
            _exact_model(),
            x[None],
            time_grid(STEPS),
            guidance=alone,
            cond={"label": jnp.ones(1, jnp.int32)},
            uncond={"label": jnp.zeros(1, jnp.int32)},
        )

    x_a, info_a = jax.vmap(one)(x0)
    np.testing.assert_allclose(x_b, x_a[:, 0], rtol=1e-5, atol=1e-5)
    nfe = np.asarray(info_a.nfe)
    assert nfe.min() < nfe.max() or nfe.min() < 2 * STEPS  # some sample switched
    assert int(info_b.nfe) == nfe.max()  # the batch evaluates uncond while any sample guides
    # the state's per-sample guided count gives each sample's own evaluations
    st = g.init(x0)
    c = Prediction(x0, jnp.array([[1.0, 0.0]] * n))
    u = Prediction(x0, jnp.array([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3))
    _, st = g.combine(c, u, st, jnp.asarray(0.5))
    np.testing.assert_array_equal(st.active, [False] * 3 + [True] * 3)
    np.testing.assert_array_equal(st.guided, [1] * n)


def test_fit_linear_ag_drops_features_that_the_run_estimates():
    """With `replaced`, ε̂_u of an estimated step is not a feature of the next step: its
    coefficient is exactly 0, and the others are refit on what remains (here exactly)."""
    key = jax.random.key(4)
    ec = jax.random.normal(key, (6, 16, 5))
    eu = 0.8 * ec + 0.1 * jnp.roll(ec, 1, axis=0)
    rep = linear_ag_replaced(6, 1, 4, every=2)
    np.testing.assert_array_equal(rep, [False, True, False, True, False, False])
    coefs = fit_linear_ag(ec, eu, history=1, ridge=0.0, replaced=rep)
    np.testing.assert_allclose(coefs[[2, 4], 2], 0.0, atol=1e-7)
    np.testing.assert_allclose(coefs[2:, :2], np.tile([0.8, 0.1], (4, 1)), atol=1e-4)


def test_linear_ag_cond_only_from_is_cfg_then_conditional():
    k = 5
    ident = jnp.zeros((STEPS, 3)).at[:, 0].set(1.0)
    g = linear_ag(W, ident, SCHEDULE, start_step=0, end_step=0, cond_only_from=k)
    x_l, info = _run(g, n=32)
    assert int(info.nfe) == 2 * k + (STEPS - k)
    x0 = jax.random.normal(jax.random.key(0), (32, 2))
    ts = time_grid(STEPS)
    lab = {"label": jnp.ones(32, jnp.int32)}
    x1, _ = sample(
        jax.random.key(1),
        ddim(SCHEDULE),
        _exact_model(),
        x0,
        ts[: k + 1],
        guidance=_cfg(W),
        cond=lab,
        uncond={"label": jnp.zeros(32, jnp.int32)},
    )
    x_ref, _ = sample(jax.random.key(1), ddim(SCHEDULE), _exact_model(), x1, ts[k:], cond=lab)
    np.testing.assert_allclose(x_l, x_ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cond_only_from"):
        linear_ag(W, ident, SCHEDULE, start_step=0, cond_only_from=STEPS + 1)


def test_linear_ag_beats_dropping_guidance_on_the_same_steps():
    n = 256
    x0 = jax.random.normal(jax.random.key(5), (n, 2))
    kw = dict(cond={"label": jnp.ones(n, jnp.int32)}, uncond={"label": jnp.zeros(n, jnp.int32)})
    ec, eu = linear_ag_calibration(
        jax.random.key(9), ddim(SCHEDULE), _exact_model(), x0, time_grid(STEPS), W, **kw
    )
    assert ec.shape == (STEPS, n, 2)
    coefs = fit_linear_ag(ec, eu, history=1)
    x_cfg, _ = _run(_cfg(W), n=n, key=7)
    x_lin, info = _run(linear_ag(W, coefs, SCHEDULE, start_step=4, every=2), n=n, key=7)
    assert int(info.nfe) == 2 * STEPS - len(range(4, STEPS, 2))
    # The same steps without guidance (conditional prediction as the unconditional one).
    zero = jnp.zeros_like(coefs).at[:, 0].set(1.0)
    x_drop, _ = _run(linear_ag(W, zero, SCHEDULE, start_step=4, every=2), n=n, key=7)
    err_lin = float(jnp.sqrt(jnp.mean((x_lin - x_cfg) ** 2)))
    err_drop = float(jnp.sqrt(jnp.mean((x_drop - x_cfg) ** 2)))
    assert err_lin < err_drop, (err_lin, err_drop)


@pytest.mark.parametrize(
    "kwargs",
    [dict(start_step=5, end_step=3), dict(start_step=0, every=0), dict(start_step=0, end_step=99)],
)
def test_linear_ag_bad_ranges(kwargs):
    with pytest.raises(ValueError, match="start_step"):
        linear_ag(W, jnp.zeros((10, 3)), SCHEDULE, **kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="reduce"):
        adaptive_guidance(W, 0.9, reduce="max")
    with pytest.raises(ValueError, match="1 \\+ 2\\*history"):
        linear_ag(W, jnp.zeros((10, 2)), SCHEDULE, 0)
    with pytest.raises(ValueError, match="share a shape"):
        fit_linear_ag(jnp.zeros((3, 4)), jnp.zeros((3, 5)))
