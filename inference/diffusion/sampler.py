"""One sampling loop for every solver and every guidance method.

A sampling run integrates from t_max (noise) down to t_min (data) over a decreasing time grid,
in one `lax.scan`. Three pieces combine:

- the **model**: ``model_fn(x, t, **cond) -> output`` (a Flax model's ``forward`` with its
  parameters bound, an analytic score, a quantized model — anything), whose output kind
  ("eps", "x0", "v", "score", "velocity") `as_denoiser` turns into a `Prediction` (x̂₀, ε̂);
- the **guidance**: a `Guidance` (init, combine, needs_uncond) that merges the conditional and
  unconditional predictions, ``combine(cond, uncond, state, t) -> (prediction, state)``, with
  a state for methods that have one (APG's momentum, Adaptive Guidance's switch). When
  ``needs_uncond(state, t)`` is false the unconditional branch is *not evaluated* (`lax.cond`)
  and ``combine`` receives the conditional prediction twice: the saving is in wall time, not
  only in counted evaluations;
- the **solver**: a `Solver` (init, step) that advances x from t to t_next given a
  ``predict(x, t, carry) -> (Prediction, carry)`` it may call once or several times per step
  (Heun calls it twice). The carry threads the guidance state and the evaluation count.

A fourth, optional piece makes the run a particle method: a **corrector**
(`feynkit.inference.smc.Corrector`: Feynman–Kac correctors, FK steering) turns the predictions
the loop makes into log-weight increments and resamples adaptively. ``sample(...,
corrector=...)`` then runs the same solver step inside `feynkit.inference.smc.base`'s SMC kernel
(`feynkit.inference.smc.corrector`; imported lazily here because `smc` imports this module).

`SampleInfo.nfe` counts network evaluations per sample (a conditional and an unconditional
evaluation count two, even when batched together).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from feynkit.core.types import Array, ArrayLike, Key
from feynkit.core.validation import check_finite, check_time_grid
from feynkit.inference.diffusion.prediction import Prediction, as_denoiser

__all__ = [
    "Guidance",
    "PredictFn",
    "SampleInfo",
    "Solver",
    "checked_model",
    "guided_branches_fn",
    "guided_predict_fn",
    "reuse_first_prediction",
    "sample",
    "time_grid",
]

# predict(x, t, carry) -> (Prediction, carry)
PredictFn = Callable[[Array, Array, Any], tuple[Prediction, Any]]


class Guidance(NamedTuple):
    """A guidance method: ``combine(cond, uncond, state, t) -> (prediction, state)``.

    Attributes:
      init: ``init(x) -> state`` (``None`` for stateless methods).
      combine: merges the conditional and unconditional `Prediction` at time t.
      needs_uncond: ``needs_uncond(state, t) -> bool`` (traced); ``None`` means always. When
        false, the unconditional branch is skipped and ``combine`` gets the conditional
        prediction as both arguments.
      name: what the method is ("cfg", "apg", ...), for correctors that accept only some.
      params: its parameters (e.g. ``{"scale": w, "interval": None}``), for the same checks.
      uses_uncond: False when ``combine`` never reads the unconditional branch; the loop then
        evaluates the conditional branch alone (statically, no `lax.cond`).
      state_axes: ``state_axes(state) -> pytree`` of the state's shape giving, per leaf, the
        axis that runs over samples (None: a per-run leaf). Particle methods resample the
        per-sample leaves with the particles and keep the per-run ones once. None: a leaf whose
        leading axis has the batch size is per-sample, any other is per-run.
    """

    init: Callable[[Array], Any]
    combine: Callable[[Prediction, Prediction, Any, Array], tuple[Prediction, Any]]
    needs_uncond: Callable[[Any, Array], Array] | None = None
    name: str = "custom"
    params: dict[str, Any] | None = None
    uses_uncond: bool = True
    state_axes: Callable[[Any], Any] | None = None


class Solver(NamedTuple):
    """A diffusion solver: ``init(x) -> state``;
    ``step(key, x, state, predict, carry, t, t_next) -> (x_next, state, carry)``.

    `schedule` gives α_t, σ_t (and the SDE coefficients) the solver integrates. `name` says
    which solver it is and `stochastic` whether its step draws noise (None: unknown), for the
    correctors whose weights hold only for some solvers. Per-sample leaves of the state (those
    whose leading axis has the batch size) follow the particles when a corrector resamples.
    """

    init: Callable[[Array], Any]
    step: Callable[..., tuple[Array, Any, Any]]
    schedule: Any
    name: str = "custom"
    stochastic: bool | None = None


class SampleInfo(NamedTuple):
    """Diagnostics of a run: network evaluations per sample, and the trajectory if asked for
    (x at every grid time, t_max first).

    With a corrector also: the final normalised ``log_weights`` (n,), ``log_normalizer``
    (log Ẑ), the ESS after each step's reweighting ``ess`` (steps,), the ``resampled`` flags
    (steps,), the ``ancestors`` (steps, n) when ``keep_ancestry``, and the mean acceptance rate
    of the rejuvenation moves ``acceptance`` (when the corrector rejuvenates).
    """

    nfe: Array
    trajectory: Array | None = None
    log_weights: Array | None = None
    log_normalizer: Array | None = None
    ess: Array | None = None
    resampled: Array | None = None
    ancestors: Array | None = None
    acceptance: Array | None = None


def _concat(a: Any, b: Any) -> Any:
    return jax.tree.map(lambda u, v: jnp.concatenate([jnp.asarray(u), jnp.asarray(v)]), a, b)


def checked_model(model_fn: Callable[..., Any], prediction: str) -> Callable[..., Any]:
    """`model_fn` with a trace-time check that its output matches the declared kind: a
    `Prediction` for ``prediction="prediction"``, otherwise one array shaped like x."""

    def checked(x: Array, t: Array, **cond: Any) -> Any:
        out = model_fn(x, t, **cond)
        if prediction == "prediction":
            if not isinstance(out, Prediction):
                raise ValueError(
                    f"prediction='prediction' needs model_fn to return a Prediction(x0, eps), "
                    f"got {type(out).__name__}; pass the kind of its output instead "
                    "('eps', 'x0', 'v', 'score' or 'velocity')."
                )
            shapes = [jnp.shape(out.x0), jnp.shape(out.eps)]
        else:
            if isinstance(out, tuple):
                raise ValueError(
                    f"model_fn returned a {type(out).__name__}, not an array of kind "
                    f"{prediction!r}; a model returning a Prediction needs "
                    "prediction='prediction'."
                )
            shapes = [jnp.shape(out)]
        for shape in shapes:
            if tuple(shape) != tuple(x.shape):
                raise ValueError(
                    f"model_fn returned an output of shape {tuple(shape)} for x of shape "
                    f"{tuple(x.shape)}; a model of kind {prediction!r} must return one value per "
                    "entry of x (reshape its output, or check the prediction kind)."
                )
        return out

    return checked


def guided_branches_fn(
    denoise: Callable[..., Prediction],
    guidance: Guidance | None = None,
    cond: dict[str, Any] | None = None,
    uncond: dict[str, Any] | None = None,
    batch_branches: bool = True,
) -> Callable[[Array, Array, Any], tuple[tuple[Prediction, Prediction], Any]]:
    """``branches(x, t, (guidance_state, nfe)) -> ((cond_pred, uncond_pred), (state, nfe))``.

    The model's conditional (``cond``) and unconditional (``uncond``) predictions, evaluated as
    `guided_predict_fn` evaluates them (the unconditional branch skipped, and the conditional
    one returned twice, when there is no guidance, when ``guidance.uses_uncond`` is false or
    when ``guidance.needs_uncond`` says so). The guidance state is read, not advanced.
    """
    cond = {} if cond is None else cond
    uncond = {} if uncond is None else uncond

    def branches(x: Array, t: Array, carry: Any) -> tuple[tuple[Prediction, Prediction], Any]:
        gstate, nfe = carry
        if guidance is None or not guidance.uses_uncond:
            p = denoise(x, t, **cond)
            return (p, p), (gstate, nfe + 1)

        def both(x):
            if batch_branches:
                p = denoise(jnp.concatenate([x, x]), t, **_concat(cond, uncond))
                b = x.shape[0]
                return jax.tree.map(lambda u: u[:b], p), jax.tree.map(lambda u: u[b:], p)
            return denoise(x, t, **cond), denoise(x, t, **uncond)

        def cond_only(x):
            p = denoise(x, t, **cond)
            return p, p

        if guidance.needs_uncond is None:
            pc, pu = both(x)
            used = jnp.asarray(1, nfe.dtype)
        else:
            use = jnp.asarray(guidance.needs_uncond(gstate, t), bool)
            pc, pu = jax.lax.cond(use, both, cond_only, x)
            used = use.astype(nfe.dtype)
        return (pc, pu), (gstate, nfe + 1 + used)

    return branches


def guided_predict_fn(
    denoise: Callable[..., Prediction],
    guidance: Guidance | None = None,
    cond: dict[str, Any] | None = None,
    uncond: dict[str, Any] | None = None,
    batch_branches: bool = True,
) -> PredictFn:
    """``predict(x, t, (guidance_state, nfe)) -> (Prediction, (guidance_state, nfe))``.

    Without guidance the model is evaluated once, with ``cond``. With guidance, the conditional
    (``cond``) and unconditional (``uncond``) branches are evaluated — as one batch of 2B when
    `batch_branches` — unless ``guidance.needs_uncond`` says otherwise (`guided_branches_fn`),
    and ``guidance.combine`` merges them.
    """
    branches = guided_branches_fn(denoise, guidance, cond, uncond, batch_branches)

    def predict(x: Array, t: Array, carry: Any) -> tuple[Prediction, Any]:
        (pc, pu), (gstate, nfe) = branches(x, t, carry)
        if guidance is None:
            return pc, (gstate, nfe)
        out, gstate = guidance.combine(pc, pu, gstate, t)
        return out, (gstate, nfe)

    return predict


def reuse_first_prediction(predict: PredictFn, pred: Prediction) -> PredictFn:
    """`predict` whose first call returns `pred` (known to be the prediction at the point and
    time the solver step starts from) without evaluating the model; later calls evaluate.

    Particle methods (FK steering, rollover budget forcing) evaluate the model at each new
    point to score it, and hand that prediction to the next solver step through this wrapper,
    so a step costs no more evaluations than in a plain run.
    """
    used = []

    def cached(x: Array, t: Array, carry: Any) -> tuple[Prediction, Any]:
        if not used:  # trace-time bookkeeping: a solver step calls predict in a fixed order
            used.append(True)
            return pred, carry
        return predict(x, t, carry)

    return cached


def sample(
    key: Key,
    solver: Solver,
    model_fn: Callable[..., Array],
    x_init: ArrayLike,
    timesteps: ArrayLike,
    *,
    prediction: str = "eps",
    guidance: Guidance | None = None,
    cond: dict[str, Any] | None = None,
    uncond: dict[str, Any] | None = None,
    corrector: Any = None,
    denoise_final: bool = False,
    return_trajectory: bool = False,
    batch_branches: bool = True,
    keep_ancestry: bool = False,
) -> tuple[Array, SampleInfo]:
    """Integrate from ``timesteps[0]`` to ``timesteps[-1]`` with `solver`, in one `lax.scan`.

    Args:
      key: PRNG key; step i uses ``fold_in(key, i)``.
      solver: e.g. ``ddim(schedule, eta=0.0)``.
      model_fn: ``model_fn(x, t, **cond) -> output`` with t of shape (batch,).
      x_init: the starting point at ``timesteps[0]`` (e.g. N(0, σ_max² I) noise), (batch, ...).
      timesteps: decreasing times, shape (num_steps + 1,), e.g. `time_grid`. A deterministic
        solver (``solver.stochastic`` not True: DDIM η = 0, DPM-Solver++, Heun, BDIA) also runs
        an increasing grid, which inverts it (data to noise, e.g. DDIM inversion).
      prediction: the model's output kind (see `feynkit.inference.diffusion.prediction`), or
        "prediction" when ``model_fn`` already returns a `Prediction`.
      guidance: a `Guidance`, or None for a plain conditional (or unconditional) run.
      cond, uncond: keyword arguments of the conditional and unconditional model calls, e.g.
        ``{"label": y}`` and ``{"label": jnp.full_like(y, num_classes)}``. With a corrector
        they must not vary over the batch (resampling permutes samples, not conditioning).
      corrector: a `feynkit.inference.smc.Corrector` (``smc.fkc_cfg_corrector(w)``,
        ``smc.fk_steering_corrector(reward)``, ...): the batch becomes weighted particles that
        are reweighted from the predictions the loop makes and resampled adaptively (see
        `feynkit.inference.smc.corrector`). None: a plain run.
      denoise_final: return x̂₀ at the last time instead of x (one more evaluation, unless the
        corrector already evaluated the model there).
      return_trajectory: also return x at every grid time in ``SampleInfo.trajectory`` (with
        a corrector: the particles after each step's resampling, not genealogies).
      batch_branches: evaluate conditional and unconditional branches as one batch.
      keep_ancestry: with a corrector, return every step's ancestor indices (steps × n
        integers) in ``SampleInfo.ancestors``.

    Returns:
      (x, SampleInfo) with x of the shape of x_init. With a corrector, x are the final
      particles and ``SampleInfo`` carries their log-weights, log Ẑ, ESS and resampling flags.

    Raises:
      ValueError: while tracing (so also under ``jit``): a grid that is not 1-D with ≥ 2
        times, a model output whose shape differs from x (`checked_model`). Data checks —
        a grid that leaves [0, 1], is not strictly monotonic, or increases under a stochastic
        solver (Euler–Maruyama, DDPM, DDIM η > 0), and x becoming NaN/Inf
        (reported with the first step at which it did, e.g. a model returning NaN) — raise
        at once on concrete input and, under ``jit``, stop the compiled run with a
        JaxRuntimeError carrying the message (`feynkit.core.validation.fail_if`).
    """
    stochastic = solver.stochastic is True  # an SDE step cannot run backwards in time
    check_time_grid(timesteps, decreasing=stochastic, monotonic=not stochastic, domain=(0, 1))
    if corrector is not None:
        from feynkit.inference.smc.corrector import corrected_sample  # smc imports this module

        out = corrected_sample(
            key,
            solver,
            model_fn,
            x_init,
            timesteps,
            corrector,
            prediction=prediction,
            guidance=guidance,
            cond=cond,
            uncond=uncond,
            denoise_final=denoise_final,
            return_trajectory=return_trajectory,
            batch_branches=batch_branches,
            keep_ancestry=keep_ancestry,
        )
        check_finite(out[0], "the samples x", _NON_FINITE_HINT)
        return out
    x = jnp.asarray(x_init)
    ts = check_time_grid(timesteps, x.dtype)
    denoise = as_denoiser(checked_model(model_fn, prediction), solver.schedule, prediction)
    predict = guided_predict_fn(denoise, guidance, cond, uncond, batch_branches)
    gstate = None if guidance is None else guidance.init(x)
    carry0 = (gstate, jnp.zeros((), jnp.int32))
    num_steps = ts.shape[0] - 1

    def body(state, inputs):
        x, sstate, carry, first_bad = state
        i, t, t_next = inputs
        x, sstate, carry = solver.step(
            jax.random.fold_in(key, i), x, sstate, predict, carry, t, t_next
        )
        bad_now = (first_bad < 0) & ~jnp.all(jnp.isfinite(x))
        first_bad = jnp.where(bad_now, i.astype(first_bad.dtype), first_bad)
        return (x, sstate, carry, first_bad), (x if return_trajectory else None)

    steps = (jnp.arange(num_steps), ts[:-1], ts[1:])
    init = (x, solver.init(x), carry0, jnp.asarray(-1, jnp.int32))
    (x_out, _, carry, first_bad), traj = jax.lax.scan(body, init, steps)
    if denoise_final:
        pred, carry = predict(x_out, ts[-1], carry)
        x_out = pred.x0
        first_bad = jnp.where((first_bad < 0) & ~jnp.all(jnp.isfinite(x_out)), num_steps, first_bad)
    _report_non_finite(first_bad)
    if return_trajectory:
        traj = jnp.concatenate([x[None], traj])
    return x_out, SampleInfo(carry[1], traj)


_NON_FINITE_HINT = (
    "check model_fn's output for NaN/Inf (and that the grid fits the solver: a step too long "
    "for the schedule's noise rate can overflow)"
)


def _raise_non_finite(first_bad: Any) -> None:
    first = int(first_bad)
    if first >= 0:
        raise ValueError(
            f"diffusion.sample: x became NaN or Inf at step {first} (counting from 0 at "
            f"timesteps[0]); {_NON_FINITE_HINT}."
        )


def _report_non_finite(first_bad: Array) -> None:
    """Raise (eagerly, or at run time under jit) when the loop produced NaN/Inf."""
    if isinstance(first_bad, jax.core.Tracer):
        jax.debug.callback(_raise_non_finite, first_bad)
    else:
        _raise_non_finite(first_bad)


def time_grid(
    num_steps: int,
    t_max: float = 1.0,
    t_min: float = 1e-3,
    spacing: str = "uniform",
    schedule: Any = None,
    rho: float = 7.0,
) -> Array:
    """A decreasing grid of ``num_steps + 1`` times from t_max to t_min.

    spacing:
      "uniform": equal steps in t.
      "log_snr": equal steps in λ_t = log(α_t²/σ_t²) (needs `schedule`).
      "edm": Karras et al. (2022) eq. 5 in σ̃ = σ/α: σ̃_i = (σ̃_max^{1/ρ} + i/N (σ̃_min^{1/ρ} −
        σ̃_max^{1/ρ}))^ρ (needs `schedule`).
    The last two invert t ↦ λ_t by bisection (λ_t decreases in t).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be ≥ 1, got {num_steps}.")
    if not t_max > t_min:
        raise ValueError(f"need t_max > t_min, got t_max={t_max}, t_min={t_min}.")
    u = jnp.linspace(0.0, 1.0, num_steps + 1)
    if spacing == "uniform":  # this form hits both ends exactly in float32
        return (1.0 - u) * t_max + u * t_min
    if spacing not in ("log_snr", "edm"):
        raise ValueError(f"unknown spacing {spacing!r}; choose uniform, log_snr or edm.")
    if schedule is None:
        raise ValueError(f"spacing={spacing!r} needs the schedule.")
    lam_max, lam_min = schedule.log_snr(t_min), schedule.log_snr(t_max)
    if spacing == "log_snr":
        lam = lam_min + u * (lam_max - lam_min)
    else:  # σ̃ = exp(−λ/2)
        s_max, s_min = jnp.exp(-0.5 * lam_min), jnp.exp(-0.5 * lam_max)
        s = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        lam = -2.0 * jnp.log(s)
    return _invert_log_snr(schedule, lam, t_min, t_max)


def _invert_log_snr(schedule: Any, lam: Array, t_min: float, t_max: float) -> Array:
    lo = jnp.full_like(lam, t_min)
    hi = jnp.full_like(lam, t_max)

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        above = schedule.log_snr(mid) > lam  # λ decreasing: the root lies later
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo, hi = jax.lax.fori_loop(0, 60, body, (lo, hi))
    t = 0.5 * (lo + hi)
    return t.at[0].set(t_max).at[-1].set(t_min)
