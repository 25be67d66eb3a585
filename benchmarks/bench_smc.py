"""Time one SMC step of `fk.inference.smc.build_kernel` against the same step in plain jnp.

    python benchmarks/bench_smc.py
    python benchmarks/bench_smc.py --sizes 1e3 1e5 --repeats 9 --resampler multinomial

The model: d = 2 particles x ~ N(0, I), a Gaussian random-walk move x' = x + s ε and the log
potential G(x') = −|x'|² / (2 τ²). One step is move → reweight → log Ẑ increment → ESS →
adaptive resampling (systematic by default, threshold 0.5). τ is small enough that every timed
step resamples, so both implementations run the resampling branch; the table says so.

The baseline is that step written inline here with jnp and `lax.cond` (systematic resampling as
`searchsorted` of a cumsum), timed in the same run. Each step function is jitted, warmed up, and
timed with `block_until_ready`; a timing is the median of `--repeats` measurements, each the
mean of enough back-to-back calls to last `--min-time` seconds. Ratio = feynkit / baseline.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from _timing import machine_line, time_fn  # noqa: E402 (sibling module of the scripts)
from jax.scipy.special import logsumexp

import feynkit as fk

DIM = 2


def make_propagate(step_size, tau):
    def propagate(key, x, step):
        del step
        x = x + step_size * jax.random.normal(key, x.shape, x.dtype)
        return x, -0.5 * jnp.sum(x**2, axis=-1) / tau**2

    return propagate


def make_inline_step(step_size, tau, ess_threshold):
    """The same SMC step in plain jnp: (key, x, log_w, log_z) -> (x, log_w, log_z, resampled)."""

    def step(key, x, log_w, log_z):
        n = x.shape[0]
        k_move, k_res = jax.random.split(key)
        x = x + step_size * jax.random.normal(k_move, x.shape, x.dtype)
        unnorm = log_w - 0.5 * jnp.sum(x**2, axis=-1) / tau**2
        inc = logsumexp(unnorm)
        log_w = unnorm - inc
        ess = jnp.exp(-logsumexp(2.0 * log_w))
        resample = ess < ess_threshold * n

        def do(_):
            w = jnp.exp(log_w)
            cdf = jnp.cumsum(w)
            u = (jnp.arange(n) + jax.random.uniform(k_res, ())) / n * cdf[-1]
            idx = jnp.minimum(jnp.searchsorted(cdf, u, side="right"), n - 1)
            return x[idx], jnp.full_like(log_w, -jnp.log(n))

        x, log_w = jax.lax.cond(resample, do, lambda _: (x, log_w), None)
        return x, log_w, log_z + inc, resample

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e3, 1e4, 1e5, 1e6])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per measurement")
    parser.add_argument("--resampler", default="systematic", choices=sorted(fk.core.RESAMPLERS))
    parser.add_argument("--ess-threshold", type=float, default=0.5)
    parser.add_argument("--step-size", type=float, default=0.1)
    parser.add_argument("--tau", type=float, default=0.3, help="width of the Gaussian potential")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    smc = fk.inference.smc
    kernel = jax.jit(
        smc.build_kernel(
            make_propagate(args.step_size, args.tau),
            fk.core.get_resampler(args.resampler),
            args.ess_threshold,
        )
    )
    inline = jax.jit(make_inline_step(args.step_size, args.tau, args.ess_threshold))

    print(
        f"# One SMC step (d={DIM}, random walk + Gaussian potential, {args.resampler} resampling,"
        f" ESS threshold {args.ess_threshold})\n\n{machine_line()}\n"
    )
    print("| n | inline jnp (ms) | fk build_kernel (ms) | ratio | resampled |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(args.seed)
    key = jax.random.key(args.seed)
    for size in args.sizes:
        n = int(size)
        x = jnp.asarray(rng.standard_normal((n, DIM)), jnp.float32)
        state = smc.init(x)
        t_inline = time_fn(
            inline, (key, x, state.log_weights, state.log_normalizer), args.repeats, args.min_time
        )
        t_fk = time_fn(kernel, (key, state), args.repeats, args.min_time)
        new_state, info = kernel(key, state)
        x_in, _, log_z_in, resampled_in = inline(key, x, state.log_weights, state.log_normalizer)
        # Same keys, same arithmetic: the two implementations agree on the decision and on log Ẑ.
        assert bool(info.resampled) == bool(resampled_in)
        np.testing.assert_allclose(new_state.log_normalizer, log_z_in, rtol=1e-4, atol=1e-4)
        print(
            f"| {n:,} | {1e3 * t_inline:.3f} | {1e3 * t_fk:.3f} | {t_fk / t_inline:.2f}× "
            f"| {'yes' if bool(info.resampled) else 'no'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
