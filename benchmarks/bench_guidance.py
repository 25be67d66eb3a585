"""Guided sampling on the digits UNet: network evaluations and wall time relative to CFG + DDIM.

One run = `feynkit.inference.diffusion.sample` over a 50-step grid for a batch of 256 8×8
digits (labels 0..9 cycling), jitted, warmed up, then timed: ``--repeats`` rounds that call
every configuration once in turn, keeping each one's best wall and process-CPU time (a call
takes seconds on a CPU), or `_timing.time_fn` (median) with ``--min-time > 0``.
Rows: every guidance method with DDIM (η = 0), then every solver
that exists in `feynkit.inference.diffusion.solvers` with CFG and with Adaptive Guidance.
The baseline is CFG (w = 3) with DDIM, measured in the same run; "NFE" counts network
evaluations per sample (a conditional and an unconditional evaluation count two; classifier
guidance's classifier forward/backward pass is not counted, its time is).

    python benchmarks/bench_guidance.py                      # batch 256, 50 steps
    python benchmarks/bench_guidance.py --batch 64 --repeats 3 --min-time 0.5  # on a GPU
"""

import argparse
import time

import jax
import jax.numpy as jnp
from _timing import machine_line, time_fn

from feynkit.core import LinearSchedule
from feynkit.experiments.zoo import DIGITS_NUM_CLASSES as NUM_CLASSES
from feynkit.experiments.zoo import trained_digits_models
from feynkit.inference.diffusion import as_denoiser, sample, solvers, time_grid
from feynkit.inference.diffusion.adaptive_guidance import (
    adaptive_guidance,
    fit_linear_ag,
    linear_ag,
    linear_ag_calibration,
)
from feynkit.inference.diffusion.classifier_guidance import classifier_guided_model

W = 3.0
SOLVERS = ("ddim", "ddpm", "euler_maruyama", "heun", "dpm_solver_pp_2m", "probability_flow")


def _solver(name, schedule):
    if name == "ddim":
        return solvers.ddim(schedule, eta=0.0)
    fn = getattr(solvers, name, None)
    return None if fn is None else fn(schedule)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--min-time",
        type=float,
        default=0.0,
        help="> 0: `_timing.time_fn` (median of repeats, each ≥ this long); 0: min of repeats",
    )
    ap.add_argument("--threshold", type=float, default=0.93, help="AG's γ̄ (mean cos of x̂₀)")
    args = ap.parse_args()

    from feynkit.inference.diffusion import guidance as gd

    schedule = LinearSchedule()
    (unet, classifier), cached = trained_digits_models()
    params, clf_params = cached["unet"].params, cached["classifier"].params

    def model_fn(x, t, label):
        return unet.forward(params, x, t, label)

    n = args.batch
    lab = jnp.arange(n) % NUM_CLASSES
    cond, uncond = {"label": lab}, {"label": jnp.full_like(lab, NUM_CLASSES)}
    x_init = jax.random.normal(jax.random.key(0), (n, 8, 8, 1))
    ts = time_grid(args.steps)
    ddim = solvers.ddim(schedule)

    # LinearAG coefficients from a small calibration run (their values do not change timing).
    m = 32
    ec, eu = jax.jit(
        lambda x: linear_ag_calibration(
            jax.random.key(1),
            ddim,
            model_fn,
            x,
            ts,
            W,
            cond={"label": lab[:m]},
            uncond={"label": uncond["label"][:m]},
        )
    )(x_init[:m])
    coefs = fit_linear_ag(ec, eu)

    ag_name = f"adaptive (γ̄ = {args.threshold:g} on x̂₀)"
    guidances = {
        "cfg": gd.cfg(W),
        "cfg (interval σ̃ ∈ (0.28, 5.42])": gd.cfg(W, interval=(0.28, 5.42), schedule=schedule),
        "cfg_pp (λ = 0.6)": gd.cfg_pp(0.6) if hasattr(gd, "cfg_pp") else None,
        "apg (η = 0)": gd.apg(W, schedule=schedule) if hasattr(gd, "apg") else None,
        ag_name: adaptive_guidance(W, args.threshold, reduce="mean", on="x0"),
        f"linear_ag (estimate from step {args.steps // 2})": linear_ag(
            W, coefs, schedule, args.steps // 2
        ),
    }

    def run_fn(solver, guidance):
        return jax.jit(
            lambda x: sample(
                jax.random.key(2),
                solver,
                model_fn,
                x,
                ts,
                guidance=guidance,
                cond=cond,
                uncond=uncond,
            )
        )

    guided_cg = classifier_guided_model(
        as_denoiser(
            lambda x, t, label: model_fn(x, t, jnp.full_like(label, NUM_CLASSES)), schedule
        ),
        lambda x, t: classifier.forward(clf_params, x, t),
        1.0,
        schedule=schedule,
    )
    cg_fn = jax.jit(
        lambda x: sample(
            jax.random.key(2), ddim, guided_cg, x, ts, prediction="prediction", cond=cond
        )
    )

    configs = []  # (solver, guidance, jitted run)
    for gname, g in guidances.items():
        if g is not None:
            configs.append(("ddim", gname, run_fn(ddim, g)))
    configs.append(("ddim", "classifier guidance (noise-aware, s = 1)", cg_fn))
    for sname in SOLVERS[1:]:
        solver = _solver(sname, schedule)
        if solver is None:
            print(f"  {sname}: not in feynkit.inference.diffusion.solvers, skipped")
            continue
        for gname in ("cfg", ag_name):
            configs.append((sname, gname, run_fn(solver, guidances[gname])))

    print(machine_line())
    print(f"batch {n}, {args.steps} steps, w = {W:g}, repeats {args.repeats}")
    nfes = []
    for sname, gname, fn in configs:  # compile and warm up
        t0 = time.perf_counter()
        _, info = jax.block_until_ready(fn(x_init))
        nfes.append(int(info.nfe))
        print(f"  compiled {sname} / {gname}: {time.perf_counter() - t0:.1f} s", flush=True)
    if args.min_time > 0:
        wall = [time_fn(fn, (x_init,), args.repeats, args.min_time) for _, _, fn in configs]
        cpu = [float("nan")] * len(configs)
    else:
        # One call lasts seconds on a CPU. Rounds visit every configuration in turn (so a
        # change of machine load hits all of them), and each keeps its best round; process
        # CPU time (all threads) is reported too, being less sensitive to other jobs.
        wall = [float("inf")] * len(configs)
        cpu = [float("inf")] * len(configs)
        for _ in range(args.repeats):
            for i, (_, _, fn) in enumerate(configs):
                t0, c0 = time.perf_counter(), time.process_time()
                jax.block_until_ready(fn(x_init))
                wall[i] = min(wall[i], time.perf_counter() - t0)
                cpu[i] = min(cpu[i], time.process_time() - c0)
    rows = list(zip(configs, nfes, wall, cpu, strict=True))
    (_, _, _), base_nfe, base_t, base_c = rows[0]
    print()
    print("| solver | guidance | NFE / sample | NFE ratio | wall (s) | wall ratio | CPU ratio |")
    print("|---|---|---|---|---|---|---|")
    for (sname, gname, _), nfe, secs, cpu_s in rows:
        print(
            f"| {sname} | {gname} | {nfe} | {nfe / base_nfe:.2f} | {secs:.3f} | "
            f"{secs / base_t:.2f} | {cpu_s / base_c:.2f} |"
        )


if __name__ == "__main__":
    main()
