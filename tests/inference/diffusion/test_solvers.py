"""Diffusion solvers on a Gaussian-mixture target with the exact score: convergence orders.

Deterministic solvers: the path-wise error |x_N − x_ref| from the same x_init against an
independent float64 reference (SciPy DOP853 at rtol 1e-12 on the velocity ODE with a NumPy
closed-form posterior mean) falls as N^−p: p ≈ 1 for DDIM(η=0), probability_flow and flow_euler,
p ≈ 2 for heun, probability_flow_heun, flow_heun and DPM-Solver++(2M). Stochastic solvers: the
error of the sample mean and covariance against the exact marginal moments (closed form) falls
with N (weak order 1). Every solver also runs under jit with guidance and vmap over keys.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from feynkit.core import CosineSchedule, LinearSchedule, RectifiedFlowSchedule
from feynkit.inference.diffusion import (
    Guidance,
    Prediction,
    as_denoiser,
    guided_predict_fn,
    sample,
    time_grid,
)
from feynkit.inference.diffusion.solvers import (
    DPMSolverState,
    ddim,
    ddpm,
    dpm_solver_pp_2m,
    euler_maruyama,
    flow_euler,
    flow_heun,
    heun,
    probability_flow,
    probability_flow_heun,
)
from feynkit.models import GaussianMixture

LIN, RF = LinearSchedule(), RectifiedFlowSchedule()
W = np.array([0.5, 0.3, 0.2])
MU = np.array([[-1.5, 0.5], [1.5, 1.0], [0.0, -1.5]])
SC = np.array([0.5, 0.7, 0.4])
T_MIN = 1e-2  # the data end of the ODE is stiff (σ' ~ 1/sqrt(t)); stop before it

# (constructor, model evaluations per step, order)
ONE_STEP = {
    "ddim": (ddim, 1, 1),
    "probability_flow": (probability_flow, 1, 1),
    "flow_euler": (flow_euler, 1, 1),
    "heun": (heun, 2, 2),
    "probability_flow_heun": (probability_flow_heun, 2, 2),
    "flow_heun": (flow_heun, 2, 2),
    "dpm_solver_pp_2m": (dpm_solver_pp_2m, 1, 2),
}
ALL = {**ONE_STEP, "ddpm": (ddpm, 1, 1), "euler_maruyama": (euler_maruyama, 1, 1)}


def gmm():
    return GaussianMixture.create(W, MU, scales=SC)


def eps_model(schedule):
    """The exact ε of the noised mixture, ε = −σ_t ∇log p_t(x)."""
    target = gmm()

    def model(x, t):
        return -schedule.sigma(t[0]) * target.marginal(schedule, t[0]).score(x)

    return model


def posterior_mean(schedule, x, t):
    """E[x₀ | x_t] of the isotropic mixture in closed form (finite at α = 0): component
    responsibilities under N(α μ_k, (α² s_k² + σ²) I), then the Gaussian posterior means."""
    a, s = schedule.alpha(t), schedule.sigma(t)
    var = jnp.asarray(SC**2, x.dtype)
    mu = jnp.asarray(MU, x.dtype)[None]
    marg = a * a * var + s * s  # (K,)
    diff = x[:, None] - a * mu  # (B, K, 2)
    logr = jnp.log(jnp.asarray(W, x.dtype) / marg)[None] - 0.5 * jnp.sum(diff**2, -1) / marg[None]
    r = jax.nn.softmax(logr, axis=-1)
    return jnp.sum(r[..., None] * (mu + (a * var / marg)[None, :, None] * diff), 1)


def x0_model(schedule):
    return lambda x, t: posterior_mean(schedule, x, t[0])


def velocity_model(schedule):
    """The exact velocity α' E[x₀|x_t] + σ' E[ε|x_t] (finite at α = 0, i.e. t = 1 on RF)."""

    def model(x, t):
        t = t[0]
        x0 = posterior_mean(schedule, x, t)
        eps = (x - schedule.alpha(t) * x0) / schedule.sigma(t)
        return schedule.dalpha_dt(t) * x0 + schedule.dsigma_dt(t) * eps

    return model


def numpy_coefs(schedule, t):
    """(α, σ, α', σ') in float64 NumPy, written out independently of `feynkit.core`."""
    if isinstance(schedule, RectifiedFlowSchedule):
        return 1.0 - t, t, -1.0, 1.0
    if isinstance(schedule, CosineSchedule):
        c, phi0 = np.pi / 2 / (1 + schedule.s), schedule.s / (1 + schedule.s) * np.pi / 2
        a = np.cos(c * t + phi0) / np.cos(phi0)
        da = -c * np.sin(c * t + phi0) / np.cos(phi0)
        s = np.sqrt(1.0 - a * a)
        return a, s, da, -a * da / s
    b0, b1 = schedule.beta_min, schedule.beta_max
    beta = b0 + t * (b1 - b0)
    a = np.exp(-0.5 * (b0 * t + 0.5 * (b1 - b0) * t * t))
    s = np.sqrt(1.0 - a * a)
    return a, s, -0.5 * beta * a, 0.5 * beta * a * a / s


@functools.cache
def reference(schedule, t_max, n=32):
    """(x_init, x at T_MIN) of dx/dt = α' x̂₀ + σ' (x − α x̂₀)/σ, x̂₀ the NumPy posterior mean
    (Tweedie for a mixture of isotropic Gaussians), by SciPy's DOP853 at rtol 1e-12."""

    def rhs(t, y):
        a, s, da, ds = numpy_coefs(schedule, t)
        x = y.reshape(-1, 2)
        marg = a * a * SC**2 + s * s  # (K,) component variances of x_t
        diff = x[:, None, :] - a * MU[None]  # (B, K, 2)
        logr = np.log(W) - 0.5 * (diff**2).sum(-1) / marg - np.log(marg)
        r = np.exp(logr - logr.max(1, keepdims=True))
        r /= r.sum(1, keepdims=True)
        x0 = (r[..., None] * (MU[None] + (a * SC**2 / marg)[None, :, None] * diff)).sum(1)
        return (da * x0 + ds * (x - a * x0) / s).reshape(-1)

    with jax.enable_x64(True):
        x_init = np.asarray(draw(gmm().marginal(schedule, t_max), jax.random.key(1), n))
    sol = solve_ivp(
        rhs, (t_max, T_MIN), x_init.reshape(-1), method="DOP853", rtol=1e-12, atol=1e-12
    )
    assert sol.success
    return x_init, sol.y[:, -1].reshape(-1, 2)


def stepper(solvers, model, kind):
    """Run several solvers side by side in a Python loop over one jitted step of all of them
    (compiled once, reused for every grid): the arithmetic of `sample` without recompiling its
    scan for each step count. Returns ``solve(key, x, ts) -> [(x_N, nfe) per solver]``."""
    predict = guided_predict_fn(as_denoiser(model, solvers[0].schedule, kind))

    @jax.jit
    def step(key, i, xs, states, carries, t, t_next):
        key = jax.random.fold_in(key, i)
        out = [
            sv.step(key, x, st, predict, c, t, t_next)
            for sv, x, st, c in zip(solvers, xs, states, carries, strict=True)
        ]
        return tuple(zip(*out, strict=True))

    def solve(key, x, ts):
        xs = (x,) * len(solvers)
        states = tuple(sv.init(x) for sv in solvers)
        carries = ((None, jnp.zeros((), jnp.int32)),) * len(solvers)
        for i in range(len(ts) - 1):
            xs, states, carries = step(key, i, xs, states, carries, ts[i], ts[i + 1])
        return [(x, int(c[1])) for x, c in zip(xs, carries, strict=True)]

    return solve


@functools.partial(jax.jit, static_argnums=2)
def draw(mixture, key, n):  # jitted: one compilation instead of one per eager op
    return mixture.sample(key, n)


@functools.cache
def grid(num, t_max, spacing, schedule):
    with jax.enable_x64(True):
        return np.asarray(
            jax.jit(time_grid, static_argnums=(0, 1, 2, 3, 4))(num, t_max, T_MIN, spacing, schedule)
        )


def exact_model(schedule):
    """(model_fn, prediction kind): the velocity on rectified flow (finite at t = 1), else ε."""
    if isinstance(schedule, RectifiedFlowSchedule):
        return velocity_model(schedule), "velocity"
    return eps_model(schedule), "eps"


def measured_orders(names, schedule, steps, t_max=1.0, spacing="log_snr", n=32, use_sample=False):
    """{name: (errors, slope)}: the path-wise errors max |x_N − x_ref| for each step count N and
    the least-squares slope p of log err = c − p log N. `use_sample` runs the `sample` loop
    itself (one compilation per solver and N) instead of `stepper`."""
    x_init, x_ref = reference(schedule, t_max, n)
    errs = {name: [] for name in names}
    with jax.enable_x64(True):
        x_init = jnp.asarray(x_init)
        model, kind = exact_model(schedule)
        solvers = [ALL[name][0](schedule) for name in names]
        solve = stepper(solvers, model, kind)
        for num in steps:
            ts = grid(num, t_max, spacing, schedule)
            if use_sample:

                def run(x, ts):
                    return [
                        sample(jax.random.key(0), sv, model, x, ts, prediction=kind)
                        for sv in solvers
                    ]

                outs = [(x, int(info.nfe)) for x, info in jax.jit(run)(x_init, ts)]
            else:
                outs = solve(jax.random.key(0), x_init, ts)
            for name, (x, nfe) in zip(names, outs, strict=True):
                assert x.dtype == jnp.float64
                assert nfe == ALL[name][1] * num
                errs[name].append(float(np.abs(np.asarray(x) - x_ref).max()))
    slope = lambda e: -np.polyfit(np.log(steps), np.log(e), 1)[0]  # noqa: E731
    return {name: (np.asarray(e), slope(e)) for name, e in errs.items()}


@pytest.fixture(scope="module")
def vp_orders():
    names = ("ddim", "probability_flow", "heun", "dpm_solver_pp_2m")
    return measured_orders(names, LIN, [32, 64, 128])


@pytest.mark.parametrize(
    ("name", "lo", "hi"),
    [
        ("ddim", 0.8, 1.3),
        ("probability_flow", 0.8, 1.3),
        ("heun", 1.7, 2.4),
        ("dpm_solver_pp_2m", 1.7, 2.4),
    ],
)
def test_deterministic_order_vp_fast(name, lo, hi, vp_orders):
    # Measured (float64, linear VP, log-SNR grid, t from 1 to 1e-2, 32 points, N = 32, 64, 128):
    # ddim 1.04, probability_flow 0.98, heun 2.05, dpm_solver_pp_2m 1.98. The slow sweep
    # checks every solver on three spacings and three schedules up to N = 256.
    errs, slope = vp_orders[name]
    assert np.all(np.diff(errs) < 0), errs
    assert lo < slope < hi, (errs, slope)


def test_flow_euler_order_rectified_flow_fast():
    # Starts at t = 1 (α = 0) with the exact velocity, uniform grid. Measured 0.99.
    out = measured_orders(["flow_euler"], RF, [32, 64, 128], spacing="uniform")
    errs, slope = out["flow_euler"]
    assert np.all(np.diff(errs) < 0), errs
    assert 0.8 < slope < 1.3, (errs, slope)


# (schedule, t_max, spacing) for the slow sweep; RF from t = 1 only with solvers that need no
# f = −1/(1 − t) or 1/α there (flow_*, ddim, dpm_solver_pp_2m).
SWEEP = [
    (LIN, 1.0, "log_snr"),
    (LIN, 1.0, "uniform"),
    (LIN, 1.0, "edm"),
    (CosineSchedule(), 0.99, "log_snr"),
    (RF, 0.99, "log_snr"),
    (RF, 1.0, "uniform"),
]
SWEEP_IDS = ["linear-logsnr", "linear-uniform", "linear-edm", "cosine-logsnr", "rf-logsnr", "rf-1"]


@pytest.mark.slow
@pytest.mark.parametrize(("schedule", "t_max", "spacing"), SWEEP, ids=SWEEP_IDS)
@pytest.mark.parametrize("name", list(ONE_STEP))
def test_deterministic_order_sweep(name, schedule, t_max, spacing):
    if (
        t_max == 1.0
        and schedule is RF
        and name not in ("ddim", "flow_euler", "flow_heun", "dpm_solver_pp_2m")
    ):
        pytest.skip("needs α_t > 0 at the start")
    steps = [16, 32, 64, 128, 256]
    errs, _ = measured_orders([name], schedule, steps, t_max, spacing, use_sample=True)[name]
    order = ONE_STEP[name][2]
    slope = -np.polyfit(np.log(steps[2:]), np.log(errs[2:]), 1)[0]  # the asymptotic end
    print(f"{name} {spacing} {type(schedule).__name__}: errors {errs}, order {slope:.2f}")
    assert np.all(np.diff(errs) < 0), errs
    assert order - 0.3 < slope < order + 0.35, (errs, slope)


WEAK = ("euler_maruyama", "ddpm")


def weak_errors(steps, n, spacing="uniform"):
    """{name: errors (len(steps), 2)}: max |mean − m| and max |cov − C| of n samples at T_MIN
    against the exact marginal moments of the mixture (closed form), from exact samples at
    t = 1 (float32); and the Monte Carlo std of a mean entry and of a covariance entry."""
    a, s = numpy_coefs(LIN, T_MIN)[:2]  # x_t ~ Σ w_k N(a μ_k, (a² s_k² + s²) I)
    m = W @ (a * MU)
    c = (W * (a * a * SC**2 + s * s)).sum() * np.eye(2) + (W[:, None] * a * MU).T @ (a * MU)
    c = c - np.outer(m, m)
    x_init = draw(gmm().marginal(LIN, 1.0), jax.random.key(1), n)
    solve = stepper([ALL[name][0](LIN) for name in WEAK], x0_model(LIN), "x0")
    out = {name: [] for name in WEAK}
    for num in steps:
        ts = np.asarray(grid(num, 1.0, spacing, LIN), np.float32)
        for name, (x, _) in zip(WEAK, solve(jax.random.key(2), x_init, ts), strict=True):
            x = np.asarray(x, np.float64)
            out[name].append((np.abs(x.mean(0) - m).max(), np.abs(np.cov(x.T) - c).max()))
    mc_mean, mc_cov = np.sqrt(np.diag(c) / n).max(), np.sqrt(2.0 / n) * np.diag(c).max()
    return {name: np.asarray(e) for name, e in out.items()}, mc_mean, mc_cov


@pytest.fixture(scope="module")
def weak_fast():
    return weak_errors([4, 32], 20000)


@pytest.mark.parametrize("name", WEAK)
def test_stochastic_weak_error_falls_fast(name, weak_fast):
    # 20000 samples: the Monte Carlo std of a mean entry is ≤ 0.010 and of a covariance entry
    # ≤ sqrt(2/n) max C_ii ≈ 0.02. At N = 4 the covariance bias (measured 0.68 for EM, 1.13
    # for DDPM) is ≥ 8 MC std, so the fall to N = 32 (0.046, 0.19; weak order 1 predicts ÷8)
    # is not noise; the fixed seeds make the test deterministic.
    errs, mc_mean, mc_cov = weak_fast
    errs = errs[name]
    assert errs[0, 1] > 8 * mc_cov, errs
    assert errs[1, 1] < errs[0, 1] / 4, errs
    assert errs[1, 0] < 5 * mc_mean + errs[0, 0] / 4, errs


@pytest.mark.slow
def test_stochastic_weak_order_slow():
    # 400000 samples: MC std of a covariance entry ≈ 0.005, below the bias up to N = 32.
    # Measured weak order of the covariance error over N = 8..64: EM 1.12, DDPM 0.87.
    steps = [8, 16, 32, 64]
    errs, _, mc_cov = weak_errors(steps, 400_000)
    for name in WEAK:
        e = errs[name]
        slope = -np.polyfit(np.log(steps), np.log(e[:, 1]), 1)[0]
        print(f"{name}: mean/cov errors {e.tolist()}, weak order (cov) {slope:.2f}")
        assert e[-2, 1] > 3 * mc_cov
        assert 0.7 < slope < 1.5, (name, e, slope)


# --- jit, vmap, guidance, nfe: a linear-Gaussian model compiles fast ---------------------------

MU_C, MU_U, S0 = jnp.array([2.0, -1.0]), jnp.array([0.0, 0.5]), 0.8


def gauss_model(schedule):
    """Exact ε of N(μ, S0² I) noised by `schedule`; μ = MU_C for label 1, else MU_U."""

    def model(x, t, label):
        a, s = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
        mu = jnp.where((label == 1)[:, None], MU_C[None], MU_U[None])
        return (x - a * mu) * s / (a * a * S0 * S0 + s * s)

    return model


def cfg2():
    def combine(pc, pu, state, t):
        return jax.tree.map(lambda c, u: u + 2.0 * (c - u), pc, pu), state

    return Guidance(lambda x: None, combine)


GUIDED_STEPS, GUIDED_BATCH = 3, 4


def _guided_run(key, names=tuple(ALL)):
    b = GUIDED_BATCH
    ts = time_grid(GUIDED_STEPS, 0.98, 0.05)
    x = jax.random.normal(jax.random.fold_in(key, 99), (b, 2))
    cond = {"label": jnp.ones((b,), jnp.int32)}
    uncond = {"label": jnp.zeros((b,), jnp.int32)}
    model = gauss_model(LIN)
    solvers = {name: ALL[name][0](LIN) for name in names}
    if "ddpm" in names:
        solvers["ddim_eta1"] = ddim(LIN, eta=1.0)
    return {
        name: sample(key, solver, model, x, ts, guidance=cfg2(), cond=cond, uncond=uncond)
        for name, solver in solvers.items()
    }


@pytest.fixture(scope="module")
def guided_runs():
    """Every solver under one jit(vmap over 3 keys) with guidance (one compilation)."""
    keys = jax.random.split(jax.random.key(3), 3)
    return keys, jax.jit(jax.vmap(_guided_run))(keys)


@pytest.mark.parametrize("name", list(ALL))
def test_jit_vmap_guidance_nfe(name, guided_runs):
    keys, runs = guided_runs
    xs, info = runs[name]
    evals = ALL[name][1]
    assert xs.shape == (3, GUIDED_BATCH, 2) and bool(jnp.all(jnp.isfinite(xs)))
    np.testing.assert_array_equal(info.nfe, 2 * evals * GUIDED_STEPS)  # cond + uncond
    assert float(jnp.abs(xs[0] - xs[1]).max()) > 1e-3
    if name == "ddpm":  # vmap over keys = one run per key
        x1, info1 = jax.jit(lambda k: _guided_run(k, (name,))[name])(keys[1])
        np.testing.assert_allclose(xs[1], x1, rtol=1e-5, atol=1e-5)
        assert int(info1.nfe) == 2 * evals * GUIDED_STEPS


def test_ddpm_equals_ddim_eta_one_same_key(guided_runs):
    # Same key, same (guided) predictions: the same draws, identical samples up to round-off.
    _, runs = guided_runs
    np.testing.assert_allclose(runs["ddpm"][0], runs["ddim_eta1"][0], rtol=1e-5, atol=1e-5)


def _fixed(pred):
    return lambda x, t, carry: (pred, carry)


def _pred(key, shape=(8, 2)):
    k1, k2 = jax.random.split(key)
    return Prediction(jax.random.normal(k1, shape), jax.random.normal(k2, shape))


@pytest.mark.parametrize(
    "name", ["ddim", "ddpm", "euler_maruyama", "probability_flow", "flow_euler", "dpm_solver_pp_2m"]
)
def test_one_evaluation_solvers_use_the_pair_not_x(name):
    # Pair form: given the prediction, the step does not read x (CFG++'s inconsistent pair acts).
    solver = ALL[name][0](LIN)
    pred = _pred(jax.random.key(7))
    t, s = jnp.asarray(0.6), jnp.asarray(0.5)
    outs = [
        solver.step(jax.random.key(8), x, solver.init(x), _fixed(pred), (None, 0), t, s)[0]
        for x in (jnp.zeros((8, 2)), jnp.full((8, 2), 5.0))
    ]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6)


def _consistent_step(solver, x, t, s, state=None, key=None):
    model = as_denoiser(gauss_model(solver.schedule), solver.schedule, "eps")
    predict = guided_predict_fn(model, cond={"label": jnp.ones((x.shape[0],), jnp.int32)})
    state = solver.init(x) if state is None else state
    key = jax.random.key(0) if key is None else key
    return solver.step(key, x, state, predict, (None, jnp.zeros((), jnp.int32)), t, s)


@jax.jit
def _euler_steps(x, t, s):
    out = {
        name: _consistent_step(make(sched), x, t, s, key=jax.random.key(1))[0]
        for name, make, sched in [
            ("pf", probability_flow, LIN),
            ("fe", flow_euler, LIN),
            ("em", euler_maruyama, LIN),
            ("rf_fe", flow_euler, RF),
            ("rf_ddim", ddim, RF),
        ]
    }
    eps = gauss_model(LIN)(x, jnp.full((16,), t), jnp.ones((16,), jnp.int32))
    f, g2, sig = LIN.drift_coef(t), LIN.beta(t), LIN.sigma(t)
    # textbook Euler on dx/dt = f x + ½ g² ε̂ / σ at x itself
    out["want_pf"] = x + (s - t) * (f * x + 0.5 * g2 * eps / sig)
    # Euler–Maruyama: twice the score term, and g sqrt(t − s) z with the step's key
    z = jax.random.normal(jax.random.key(1), x.shape)
    out["want_em"] = x + (s - t) * (f * x + g2 * eps / sig) + jnp.sqrt(g2 * (t - s)) * z
    return out


def test_euler_solvers_coincide():
    x = jax.random.normal(jax.random.key(9), (16, 2))
    out = _euler_steps(x, jnp.asarray(0.7), jnp.asarray(0.55))
    np.testing.assert_allclose(out["pf"], out["fe"], rtol=2e-5, atol=1e-6)  # f, g² vs α', σ'
    np.testing.assert_allclose(out["pf"], out["want_pf"], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(out["em"], out["want_em"], rtol=2e-5, atol=1e-5)
    # On rectified flow, Euler on the velocity ODE is DDIM.
    np.testing.assert_allclose(out["rf_fe"], out["rf_ddim"], rtol=1e-5, atol=1e-6)


LAB16 = {"label": jnp.ones((16,), jnp.int32)}


@jax.jit
def _dpm_two_steps(x):
    """Two DPM-Solver++(2M) steps, and the textbook Alg. 2 updates computed from x itself."""
    solver = dpm_solver_pp_2m(LIN)
    t0, t1, t2 = jnp.asarray(0.8), jnp.asarray(0.6), jnp.asarray(0.45)
    lam = lambda t: 0.5 * LIN.log_snr(t)  # noqa: E731  λ = log(α/σ)
    den = as_denoiser(gauss_model(LIN), LIN, "eps")
    x1, state, _ = _consistent_step(solver, x, t0, t1)
    x2, _, _ = _consistent_step(solver, x1, t1, t2, state=state)
    d0, d1 = den(x, t0, **LAB16).x0, den(x1, t1, **LAB16).x0
    h1, h2 = lam(t1) - lam(t0), lam(t2) - lam(t1)
    want1 = LIN.sigma(t1) / LIN.sigma(t0) * x - LIN.alpha(t1) * jnp.expm1(-h1) * d0
    r = h1 / h2
    big_d = (1 + 1 / (2 * r)) * d1 - 1 / (2 * r) * d0
    want2 = LIN.sigma(t2) / LIN.sigma(t1) * x1 - LIN.alpha(t2) * jnp.expm1(-h2) * big_d
    ddim1 = _consistent_step(ddim(LIN), x, t0, t1)[0]
    return x1, x2, state, want1, want2, ddim1, d0, h1


def test_dpm_solver_pp_2m_matches_lu_et_al_alg2():
    x = jax.random.normal(jax.random.key(10), (16, 2))
    x1, x2, state, want1, want2, ddim1, d0, h1 = _dpm_two_steps(x)
    np.testing.assert_allclose(x1, want1, rtol=1e-5, atol=1e-5)  # first step: first order
    np.testing.assert_allclose(x1, ddim1, rtol=1e-5, atol=1e-6)  # ... which is DDIM
    assert isinstance(state, DPMSolverState) and bool(state.has_prev)
    np.testing.assert_allclose(state.x0_prev, d0, rtol=1e-6)
    np.testing.assert_allclose(state.h_prev, h1, rtol=1e-6)
    np.testing.assert_allclose(x2, want2, rtol=1e-5, atol=1e-5)  # D = (1 + 1/2r) x̂₀ − ...


@jax.jit
def _heun_steps(x):
    t, s = jnp.asarray(0.7), jnp.asarray(0.5)
    den = as_denoiser(gauss_model(LIN), LIN, "eps")
    # EDM Alg. 1 in x̃ = x/α, σ̃ = σ/α, D(x̃; σ̃) = x̂₀ at x = α x̃.
    st = lambda u: LIN.sigma(u) / LIN.alpha(u)  # noqa: E731
    xt = x / LIN.alpha(t)
    d1 = (xt - den(x, t, **LAB16).x0) / st(t)
    xe = xt + (st(s) - st(t)) * d1
    d2 = (xe - den(LIN.alpha(s) * xe, s, **LAB16).x0) / st(s)
    want = LIN.alpha(s) * (xt + (st(s) - st(t)) * 0.5 * (d1 + d2))
    got, _, carry = _consistent_step(heun(LIN), x, t, s)
    last, _, carry_last = _consistent_step(heun(LIN), x, t, jnp.asarray(0.0))
    ts = time_grid(4, 1.0, 0.0)
    _, info = sample(jax.random.key(0), heun(LIN), gauss_model(LIN), x, ts, cond=LAB16)
    return got, want, carry[1], last, den(x, t, **LAB16).x0, carry_last[1], info.nfe


def test_heun_matches_edm_alg1_and_ends_with_euler():
    x = jax.random.normal(jax.random.key(11), (16, 2))
    got, want, nfe, last, x0, nfe_last, nfe_run = _heun_steps(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert int(nfe) == 2
    # A step to σ = 0 (t = 0) is an Euler step: one evaluation, x = α_0 x̂₀ = x̂₀.
    np.testing.assert_allclose(last, x0, rtol=1e-5, atol=1e-5)
    assert int(nfe_last) == 1
    assert int(nfe_run) == 2 * 4 - 1


def test_ddim_rejects_negative_eta():
    with pytest.raises(ValueError, match="eta ≥ 0"):
        ddim(LIN, eta=-0.1)
