"""Time feynkit's resamplers against a plain-jnp inverse-CDF baseline measured in the same run.

    python benchmarks/bench_resampling.py
    python benchmarks/bench_resampling.py --sizes 1e3 1e6 --repeats 9 --schemes systematic

Each function is jitted with num_samples = n static, warmed up once, then timed with
`block_until_ready`; a timing is the median over `--repeats` measurements, each the mean of
enough back-to-back calls to last at least `--min-time` seconds. The baseline is multinomial
resampling written directly in jnp: `jnp.searchsorted(jnp.cumsum(w), u)` on n i.i.d. uniforms
(`jax.random.categorical` draws n samples from n classes via an (n, n) Gumbel array, which is
infeasible beyond ~1e4). Ratios are feynkit time / baseline time (lower is faster). When
BlackJAX is importable (e.g. `PYTHONPATH=/tmp/extras_smc`), a column per scheme times
`blackjax.smc.resampling.<scheme>(key, weights, n)` on the same (normalised) weights and gives
feynkit time / BlackJAX time.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from _timing import machine_line, time_fn  # noqa: E402 (sibling module of the scripts)

import feynkit as fk


def baseline_resample(key, log_weights, num_samples):
    """Multinomial resampling in plain jnp: inverse CDF of i.i.d. uniforms."""
    w = jnp.exp(log_weights - jnp.max(log_weights))
    cdf = jnp.cumsum(w)
    u = jax.random.uniform(key, (num_samples,)) * cdf[-1]
    idx = jnp.searchsorted(cdf, u, side="right")
    return jnp.minimum(idx, log_weights.shape[0] - 1).astype(jnp.int32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e3, 1e4, 1e5, 1e6])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per measurement")
    parser.add_argument("--schemes", nargs="+", default=sorted(fk.core.RESAMPLERS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        import blackjax.smc.resampling as bj
    except ImportError:
        bj = None
        print("BlackJAX not importable: no BlackJAX column.")
    bj_schemes = [s for s in args.schemes if bj is not None and hasattr(bj, s)]

    print(f"# Resampling, n particles -> n ancestors\n\n{machine_line()}\n")
    header = "| n | baseline (ms) | " + " | ".join(f"{s} (ms, ×)" for s in args.schemes)
    header += "".join(f" | BlackJAX {s} (ms; feynkit/BlackJAX)" for s in bj_schemes) + " |"
    print(header)
    print("|" + "---|" * (2 + len(args.schemes) + len(bj_schemes)))
    rng = np.random.default_rng(args.seed)
    key = jax.random.key(args.seed)
    for size in args.sizes:
        n = int(size)
        lw = jnp.asarray(2.0 * rng.standard_normal(n), jnp.float32)
        base = jax.jit(baseline_resample, static_argnums=2)
        t_base = time_fn(lambda k, w: base(k, w, n), (key, lw), args.repeats, args.min_time)
        cells, times = [], {}
        for name in args.schemes:
            fn = jax.jit(fk.core.get_resampler(name), static_argnums=2)
            t = time_fn(lambda k, w, fn=fn: fn(k, w, n), (key, lw), args.repeats, args.min_time)
            times[name] = t
            cells.append(f"{1e3 * t:.3f} ({t / t_base:.2f}×)")
        w = jnp.exp(lw - jax.scipy.special.logsumexp(lw))
        for name in bj_schemes:
            fn = jax.jit(getattr(bj, name), static_argnums=2)
            t = time_fn(lambda k, w, fn=fn: fn(k, w, n), (key, w), args.repeats, args.min_time)
            cells.append(f"{1e3 * t:.3f} ({times[name] / t:.2f}×)")
        print(f"| {n:,} | {1e3 * t_base:.3f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
