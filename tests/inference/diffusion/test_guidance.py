"""Tests for feynkit.inference.diffusion.guidance: CFG (+ interval), CFG++, APG, inversion."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.core import LinearSchedule
from feynkit.inference.diffusion.guidance import (
    APGState,
    apg,
    cfg,
    cfg_pp,
    cfg_pp_equivalent_scale,
    guided_ddim_inversion,
    project_onto,
)
from feynkit.inference.diffusion.prediction import Prediction, as_denoiser
from feynkit.inference.diffusion.sampler import sample, time_grid
from feynkit.inference.diffusion.solvers import ddim

SCHED = LinearSchedule()
T = jnp.asarray(0.4)

# A linear-Gaussian model: class 1 ~ N(MU_C, S_C² I), "unconditional" ~ N(MU_U, S_U² I); the
# exact ε of N(μ, s² I) noised to time t is (x − α μ) σ / (α² s² + σ²).
MU_C, S_C = jnp.array([2.0, -1.0]), 0.5
MU_U, S_U = jnp.array([0.0, 0.5]), 1.5


def _gauss_eps(x, t, mu, s):
    a, sg = SCHED.alpha(t)[:, None], SCHED.sigma(t)[:, None]
    return (x - a * mu[None]) * sg / (a * a * s * s + sg * sg)


def _model(x, t, label):
    c = (label == 1)[:, None]
    return jnp.where(c, _gauss_eps(x, t, MU_C, S_C), _gauss_eps(x, t, MU_U, S_U))


def _posterior_mean(x, t, mu, s):  # E[x0 | x_t] for x0 ~ N(μ, s² I)
    a, sg = SCHED.alpha(t), SCHED.sigma(t)
    return mu[None] + a * s * s / (a * a * s * s + sg * sg) * (x - a * mu[None])


def _preds(key, shape=(5, 3, 2)):
    k1, k2, k3 = jax.random.split(key, 3)
    x = jax.random.normal(k1, shape)
    den = as_denoiser(lambda x, t, e: e, SCHED, "eps")
    pc = den(x, T, e=jax.random.normal(k2, shape))
    pu = den(x, T, e=jax.random.normal(k3, shape))
    return x, pc, pu


def test_cfg_endpoints_and_linearity(key):
    x, pc, pu = _preds(key)
    comb = lambda w: cfg(w).combine(pc, pu, None, T)[0]  # noqa: E731
    chex.assert_trees_all_close(comb(1.0), pc, atol=1e-6)
    chex.assert_trees_all_close(comb(0.0), pu, atol=1e-6)
    p2, p3, p5 = comb(2.0), comb(3.0), comb(5.0)
    chex.assert_trees_all_close(
        jax.tree.map(lambda a, b: a + 2 * (b - a), p3, p5), comb(7.0), atol=1e-5
    )
    chex.assert_trees_all_close(
        jax.tree.map(lambda a, b: 0.5 * (a + b), p2, p3), comb(2.5), atol=1e-5
    )
    # affine in ε at fixed x: the guided pair stays consistent, x = α x̂₀ + σ ε̂
    np.testing.assert_allclose(SCHED.alpha(T) * p5.x0 + SCHED.sigma(T) * p5.eps, x, atol=1e-5)


def test_cfg_interval_switches_off_and_skips_uncond(key):
    lo, hi = 0.5, 3.0
    g = cfg(4.0, interval=(lo, hi), schedule=SCHED)
    ts = time_grid(40, 1.0, 1e-3, "uniform", SCHED)
    st = SCHED.sigma(ts[:-1]) / SCHED.alpha(ts[:-1])
    inside = (st > lo) & (st <= hi)
    assert 0 < int(inside.sum()) < 40
    np.testing.assert_array_equal(jax.vmap(lambda t: g.needs_uncond(None, t))(ts[:-1]), inside)
    _, pc, pu = _preds(key)
    t_out = ts[0]  # σ̃ ≫ hi: guidance off, conditional
    assert st[0] > hi
    chex.assert_trees_all_close(g.combine(pc, pu, None, t_out)[0], pc, atol=1e-5)
    t_in = ts[:-1][jnp.argmax(inside)]
    chex.assert_trees_all_close(
        g.combine(pc, pu, None, t_in)[0], cfg(4.0).combine(pc, pu, None, t_in)[0]
    )
    # the sampler counts one evaluation per step outside, two inside
    labels = jnp.ones(8, jnp.int32)
    kw = dict(guidance=g, cond={"label": labels}, uncond={"label": 0 * labels})
    run = jax.jit(lambda x: sample(key, ddim(SCHED), _model, x, ts, **kw)[1])
    info = run(jnp.zeros((8, 2)))
    assert int(info.nfe) == 40 + int(inside.sum())


def test_cfg_bad_interval():
    with pytest.raises(ValueError, match="sigma_lo < sigma_hi"):
        cfg(2.0, interval=(2.0, 1.0), schedule=SCHED)
    with pytest.raises(ValueError, match="needs the schedule"):
        cfg(2.0, interval=(0.1, 1.0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cfg_pp(1.5)


def test_cfg_pp_uses_unconditional_eps(key):
    _, pc, pu = _preds(key)
    out, _ = cfg_pp(0.3).combine(pc, pu, None, T)
    np.testing.assert_array_equal(out.eps, pu.eps)
    np.testing.assert_allclose(out.x0, pu.x0 + 0.3 * (pc.x0 - pu.x0), atol=1e-6)


def test_guided_x0_closed_form_on_linear_gaussian():
    x = jax.random.normal(jax.random.key(3), (6, 2)) * 2
    den = as_denoiser(_model, SCHED)
    pc = den(x, T, label=jnp.ones(6, jnp.int32))
    pu = den(x, T, label=jnp.zeros(6, jnp.int32))
    m_c, m_u = _posterior_mean(x, T, MU_C, S_C), _posterior_mean(x, T, MU_U, S_U)
    lam, w = 0.7, 3.0
    out, _ = cfg_pp(lam).combine(pc, pu, None, T)
    np.testing.assert_allclose(out.x0, m_u + lam * (m_c - m_u), atol=1e-5)
    out, _ = cfg(w).combine(pc, pu, None, T)
    np.testing.assert_allclose(out.x0, m_u + w * (m_c - m_u), atol=1e-4)


def test_cfg_pp_equals_cfg_with_equivalent_scale():
    """One DDIM step of CFG++(λ) equals one of CFG(ω_t) (the derived equivalence)."""
    x = jax.random.normal(jax.random.key(4), (6, 2)) * 3
    lab = jnp.ones(6, jnp.int32)
    ts = jnp.array([0.7, 0.55])
    omega = cfg_pp_equivalent_scale(SCHED, ts[0], ts[1], 0.6)
    kw = dict(cond={"label": lab}, uncond={"label": 0 * lab})
    a, _ = sample(jax.random.key(0), ddim(SCHED), _model, x, ts, guidance=cfg_pp(0.6), **kw)
    b, _ = sample(jax.random.key(0), ddim(SCHED), _model, x, ts, guidance=cfg(omega), **kw)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_apg_reduces_to_cfg_on_x0(key):
    _, pc, pu = _preds(key)
    g = apg(4.0, eta=1.0, momentum=0.0, norm_threshold=None, schedule=SCHED)
    out, _ = g.combine(pc, pu, g.init(pc.x0), T)
    chex.assert_trees_all_close(out, cfg(4.0).combine(pc, pu, None, T)[0], atol=1e-4)


@pytest.mark.parametrize("seed", range(3))
def test_project_onto_is_orthogonal_decomposition(seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    v = jax.random.normal(k1, (4, 3, 5))
    ref = jax.random.normal(k2, (4, 3, 5)) * jnp.arange(4.0)[:, None, None]  # sample 0: zero
    par, orth = project_onto(v, ref)
    np.testing.assert_allclose(par + orth, v, atol=1e-6)
    np.testing.assert_allclose(jnp.sum(par * orth, axis=(1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(jnp.sum(orth * ref, axis=(1, 2)), 0.0, atol=1e-4)
    np.testing.assert_array_equal(par[0], 0.0)
    # parallel part is a per-sample multiple of ref
    coef = jnp.sum(par[1:] * ref[1:], axis=(1, 2)) / jnp.sum(ref[1:] ** 2, axis=(1, 2))
    np.testing.assert_allclose(par[1:], coef[:, None, None] * ref[1:], atol=1e-5)


def test_apg_momentum_threshold_and_consistency(key):
    _, pc, pu = _preds(key)
    beta, r, w, eta = -0.5, 0.8, 5.0, 0.3
    g = apg(w, eta=eta, momentum=beta, norm_threshold=r, schedule=SCHED)
    state = g.init(pc.x0)
    assert isinstance(state, APGState)
    np.testing.assert_array_equal(state.running, 0.0)
    diffs = []
    for i in range(3):
        pci = Prediction(pc.x0 * (1 + 0.1 * i), pc.eps)
        out, state = g.combine(pci, pu, state, T)
        diffs.append(pci.x0 - pu.x0)
        expect = diffs[0]
        for d in diffs[1:]:
            expect = d + beta * expect
        np.testing.assert_allclose(state.running, expect, atol=1e-5)
    # reference computation of the last output in float64 NumPy
    d = np.asarray(expect, np.float64)
    nrm = np.sqrt((d**2).sum(axis=(1, 2), keepdims=True))
    d = d * np.minimum(1.0, r / nrm)
    c = np.asarray(pci.x0, np.float64)
    par = (d * c).sum(axis=(1, 2), keepdims=True) / (c * c).sum(axis=(1, 2), keepdims=True) * c
    x0 = c + (w - 1) * (d - par + eta * par)
    np.testing.assert_allclose(out.x0, x0, atol=1e-4)
    # the returned pair is consistent with x: α x̂₀ + σ ε̂ = α x̂₀_c + σ ε̂_c
    x = SCHED.alpha(T) * pci.x0 + SCHED.sigma(T) * pci.eps
    np.testing.assert_allclose(SCHED.alpha(T) * out.x0 + SCHED.sigma(T) * out.eps, x, atol=1e-4)


def _run(guidance, x, steps=8):
    key = jax.random.key(0)
    lab = jnp.ones(x.shape[0], jnp.int32)
    ts = time_grid(steps, 1.0, 1e-3, "uniform", SCHED)
    return sample(
        key,
        ddim(SCHED),
        _model,
        x,
        ts,
        guidance=guidance,
        cond={"label": lab},
        uncond={"label": 0 * lab},
    )[0]


@pytest.mark.parametrize(
    "make",
    [lambda: cfg(3.0), lambda: cfg_pp(0.5), lambda: apg(3.0, norm_threshold=1.0, schedule=SCHED)],
)
def test_jit_and_vmap(make):
    x = jax.random.normal(jax.random.key(1), (3, 4, 2))
    single = jax.jit(lambda xi: _run(make(), xi))
    eager = jnp.stack([single(xi) for xi in x])
    mapped = jax.jit(jax.vmap(lambda xi: _run(make(), xi)))(x)
    np.testing.assert_allclose(mapped, eager, atol=1e-4)
    assert bool(jnp.all(jnp.isfinite(mapped)))


def test_compile_once_over_traced_scales():
    traces = []

    @jax.jit
    def run(scale, lam, x):
        traces.append(1)
        return _run(cfg(scale), x), _run(cfg_pp(lam), x), _run(apg(scale, schedule=SCHED), x)

    x = jnp.ones((4, 2))
    for s, lam in ((2.0, 0.2), (5.0, 0.7), (9.0, 1.0)):
        outs = run(jnp.float32(s), jnp.float32(lam), x)
    assert len(traces) == 1
    assert all(bool(jnp.all(jnp.isfinite(o))) for o in outs)


@pytest.mark.slow
def test_ddim_inversion_round_trip_exact_model():
    """With exact ε (Gaussian branches), guided inversion → regeneration converges as the grid is
    refined, and inversion counts two evaluations per step."""
    x0 = MU_C[None] + S_C * jax.random.normal(jax.random.key(2), (64, 2))
    lab = jnp.ones(64, jnp.int32)
    kw = dict(cond={"label": lab}, uncond={"label": 0 * lab})
    errs = []
    for steps in (10, 40, 160):
        ts = time_grid(steps, 1.0, 1e-3, "log_snr", SCHED)
        xT, info = guided_ddim_inversion(_model, x0, ts, SCHED, guidance=cfg(2.0), **kw)
        assert int(info.nfe) == 2 * steps
        rec, _ = sample(jax.random.key(0), ddim(SCHED), _model, xT, ts, guidance=cfg(2.0), **kw)
        errs.append(float(jnp.sqrt(jnp.mean((rec - x0) ** 2))))
    assert errs[2] < errs[1] < errs[0]
    assert errs[2] < errs[0] / 4  # first order in the step size


def test_cfg_pp_inversion_inverts_one_step_exactly():
    """For a model constant in x the evaluation-point approximation is exact, so one CFG++
    inversion step followed by one CFG++ DDIM step returns the start point."""
    e_c, e_u = jnp.array([[0.3, -1.0]]), jnp.array([[-0.5, 0.2]])

    def model(x, t, label):
        return jnp.where((label == 1)[:, None], e_c, e_u) + 0.0 * x

    x0 = jnp.array([[1.0, 2.0]])
    ts = jnp.array([0.6, 0.2])
    kw = dict(cond={"label": jnp.ones(1, jnp.int32)}, uncond={"label": jnp.zeros(1, jnp.int32)})
    xT, _ = guided_ddim_inversion(model, x0, ts, SCHED, guidance=cfg_pp(0.4), **kw)
    rec, _ = sample(jax.random.key(0), ddim(SCHED), model, xT, ts, guidance=cfg_pp(0.4), **kw)
    np.testing.assert_allclose(rec, x0, atol=1e-5)
