"""Replication: inference-time scaling of a flow model — SDE conversion and rollover budget forcing.

The pretrained model is the `train_toy` ScoreMLP's unconditional branch, turned into a
rectified-flow model (α = 1 − t, σ = t) by interpolant conversion; its deterministic sampler is
the Euler discretisation of the flow ODE (DDIM with η = 0 on the rectified-flow schedule is
exactly that Euler step). The reward asks for one of the eight modes, r(x) = −‖x − m‖². At
budgets of 1×, 2×, 4×, 8× the evaluations of one sampling run, per chain (a "prompt"):

  * best-of-N with the flow ODE (N = budget multiple),
  * best-of-N with the VP-SDE (the flow model converted back to the VP interpolant),
  * FK steering (SMC with the reward-difference potential) on the VP-SDE, N particles,
  * rollover budget forcing (RBF) on the VP-SDE.

Claims (Kim et al. 2025): the reward of RBF rises with the budget, and RBF beats best-of-N at
equal evaluations.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from omegaconf import MISSING

from feynkit.core import LinearSchedule
from feynkit.core.schedules import RectifiedFlowSchedule
from feynkit.experiments import harness
from feynkit.experiments import train as tr
from feynkit.experiments.data import circle_centers
from feynkit.experiments.zoo import ToyModelConfig, trained_toy_model
from feynkit.inference import diffusion as dif
from feynkit.inference import smc
from feynkit.inference.diffusion.scaling import convert_interpolant, rollover_budget_forcing


@dataclasses.dataclass
class FlowScalingConfig(harness.ReplicationConfig):
    """Schema of `configs/experiment/flow_scaling.yaml` (the values live there)."""

    num_chains: int = MISSING  # independent "prompts", each with its own budget
    num_steps: int = MISSING
    budgets: list[int] = MISSING  # × one run
    target_mode: int = MISSING
    t_min: float = MISSING

    def __post_init__(self):
        harness.require(
            bool(self.budgets) and min(self.budgets) >= 1,
            "budgets",
            f"are multiples of one run, ≥ 1; got {list(self.budgets)}.",
        )
        modes = ToyModelConfig.num_modes
        harness.require(
            0 <= self.target_mode < modes,
            "target_mode",
            f"names one of the toy model's {modes} modes, 0..{modes - 1}; got {self.target_mode}.",
        )
        harness.require(self.num_chains >= 1, "num_chains", f"must be ≥ 1, got {self.num_chains}.")
        harness.require(self.num_steps >= 1, "num_steps", f"must be ≥ 1, got {self.num_steps}.")


def _sampling(ex: FlowScalingConfig, eps_model, num_modes: int):
    vp, flow_schedule = LinearSchedule(), RectifiedFlowSchedule()
    flow_model = convert_interpolant(eps_model, "eps", vp, flow_schedule)
    vp_model = convert_interpolant(flow_model, "prediction", flow_schedule, vp)
    # The flow starts where its signal-to-noise ratio equals the VP model's at t = 1 (the
    # converted model knows nothing noisier): α/σ = (1 − t)/t there.
    snr_max = float(vp.alpha(1.0) / vp.sigma(1.0))
    t_flow_max = 1.0 / (1.0 + snr_max)
    ts_flow = dif.time_grid(ex.num_steps, t_flow_max, ex.t_min)
    ts_vp = dif.time_grid(ex.num_steps, 1.0, ex.t_min)
    target = jnp.asarray(circle_centers(num_modes, 4.0))[ex.target_mode]

    def reward(x):
        return -jnp.sum((x - target[None]) ** 2, -1)

    def run_all(key, n: int):
        """Rewards per chain of each method with a budget of n runs' evaluations."""
        b = ex.num_chains
        k_ode, k_sde, k_fk, k_rbf = jax.random.split(key, 4)
        # flow ODE from x ~ N(0, σ² I) at its first time (σ = t there); N runs per chain
        x1 = t_flow_max * jax.random.normal(k_ode, (n * b, 2))
        ode, _ = dif.sample(
            k_ode,
            dif.ddim(flow_schedule, 0.0),
            flow_model,
            x1,
            ts_flow,
            prediction="prediction",
            denoise_final=True,
        )
        x_vp = jax.random.normal(k_sde, (n * b, 2))
        sde, _ = dif.sample(
            k_sde,
            dif.ddim(vp, 1.0),
            vp_model,
            x_vp,
            ts_vp,
            prediction="prediction",
            denoise_final=True,
        )

        def best(x):
            return jnp.max(reward(x).reshape(n, b), axis=0)

        def steer(k):
            out = smc.fk_steering(
                k,
                dif.ddim(vp, 1.0),
                vp_model,
                jax.random.normal(k, (n, 2)),
                ts_vp,
                reward,
                prediction="prediction",
            )
            return out.rewards[jnp.argmax(out.log_weights)]

        fk = jax.lax.map(steer, jax.random.split(k_fk, b))
        rbf = rollover_budget_forcing(
            k_rbf,
            dif.ddim(vp, 1.0),
            vp_model,
            jax.random.normal(k_rbf, (b, 2)),
            ts_vp,
            reward,
            n * (ex.num_steps + 1),
            prediction="prediction",
        )
        return {
            "best_of_n_ode": best(ode),
            "best_of_n_sde": best(sde),
            "fk_steering_sde": fk,
            "rbf_sde": rbf.reward,
        }, rbf.nfe

    return jax.jit(run_all, static_argnums=1)


@harness.replication("flow_scaling", FlowScalingConfig)
def run(ex: FlowScalingConfig, ctx: harness.Context) -> None:
    tr.quiet_checkpoint_logging()
    model, cached = trained_toy_model(seed=ctx.seed, smoke=ctx.smoke)
    ctx.metric("cache_hit", float(cached.hit))
    null = model.num_classes

    def eps_model(x, t):
        return model.forward(cached.params, x, t, jnp.full((x.shape[0],), null, jnp.int32))

    run_all = _sampling(ex, eps_model, model.num_classes)
    key = ctx.key
    table = {}
    for n in ex.budgets:
        t0 = time.perf_counter()
        rewards, nfe = run_all(jax.random.fold_in(key, n), n)
        for method, r in rewards.items():
            table[method, n] = ctx.metric(f"{method}.reward.x{n}", float(jnp.mean(r)))
        ctx.metric(f"rbf_sde.mean_nfe.x{n}", float(jnp.mean(nfe)))
        ctx.metric(f"seconds.x{n}", time.perf_counter() - t0)
    lo, hi = ex.budgets[0], ex.budgets[-1]
    ctx.claim(
        f"RBF reward rises from {lo}x to {hi}x budget",
        table["rbf_sde", hi],
        table["rbf_sde", lo],
        ">",
    )
    ctx.claim(
        f"RBF beats best-of-N (flow ODE) at {hi}x budget",
        table["rbf_sde", hi],
        table["best_of_n_ode", hi],
        ">",
    )
    with ctx.figure("flow_scaling.png", figsize=(5, 3.5)) as (fig, axes):
        _draw(axes[0, 0], ex, table)


def _draw(ax, ex, table) -> None:
    for method in sorted({m for m, _ in table}):
        ax.plot(ex.budgets, [table[method, n] for n in ex.budgets], "o-", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluations per chain (× one sampling run)")
    ax.set_ylabel("mean reward −‖x − m‖²")
    ax.legend(fontsize=7)
