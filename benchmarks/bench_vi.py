"""Gradient-estimator variance and time per step against K for feynkit's VI objectives.

    python benchmarks/bench_vi.py
    PYTHONPATH=/tmp/extras_vi python benchmarks/bench_vi.py --ks 1 8 64 --dim 10

Model: z ~ N(0, I_d), x_n ~ N(z, I) (N = 20), q a mean-field Gaussian away from the posterior.
For each K and estimator (IWAE bound; ELBO for K = 1): the trace of the covariance of the
φ-gradient over `--draws` independent estimates, and the seconds per jitted value-and-gradient
step. Baseline timed in the same run: the reparameterised ELBO with one sample, written directly
in jnp (ratios are feynkit time / baseline time). When NumPyro is importable, one
`Trace_ELBO(num_particles=K)` loss-and-gradient step on the same model is timed beside it.
"""

import argparse
import math

import jax
import jax.numpy as jnp
from _timing import machine_line, time_fn  # noqa: E402 (sibling module of the scripts)

from feynkit.inference import vi


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--dim", type=int, default=5)
    parser.add_argument("--num-data", type=int, default=20)
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.05)
    args = parser.parse_args()
    print(machine_line())
    d, n = args.dim, args.num_data
    x = jax.random.normal(jax.random.key(0), (n, d)) + 1.0

    def log_joint(z, x):
        lik = -0.5 * jnp.sum((x - jnp.broadcast_to(z, x.shape)) ** 2)
        return lik - 0.5 * jnp.sum(z**2) - 0.5 * (n + 1) * d * math.log(2 * math.pi)

    fam = vi.MeanFieldGaussian(d)
    params = fam.init(0.5, 0.5)

    def baseline(key, p):
        def f(p):
            eps = jax.random.normal(key, (d,))
            z = p["loc"] + jnp.exp(p["log_scale"]) * eps
            lq = -0.5 * jnp.sum(eps**2) - jnp.sum(p["log_scale"])
            return log_joint(z, x) - lq - 0.5 * d * math.log(2 * math.pi)

        return jax.value_and_grad(f)(p)

    base = time_fn(jax.jit(baseline), (jax.random.key(1), params), args.repeats, args.min_time)
    print(f"baseline (hand-written 1-sample reparam ELBO step): {base * 1e6:.1f} us")

    try:
        import numpyro
        import numpyro.distributions as dist
        from numpyro.infer import Trace_ELBO
    except ImportError:
        numpyro = None
        print("numpyro not importable: its Trace_ELBO column is left out")

    print(f"{'K':>5} {'estimator':>9} {'grad var':>12} {'us/step':>10} {'ratio':>7}")
    for k in args.ks:
        ests = (
            ["reparam", "stl", "score", "vimco"]
            if k == 1
            else ["reparam", "score", "vimco", "dreg"]
        )
        for est in ests:
            if est == "vimco" and k < 2:
                continue
            obj = vi.elbo if k == 1 else vi.iwae
            kw = {"num_samples": k, "estimator": est}

            def step(key, p, obj=obj, kw=kw):
                return jax.value_and_grad(
                    lambda q: obj(key, log_joint, fam, q, x, validate=False, **kw)
                )(p)

            def grad_vec(key, obj=obj, kw=kw):
                g = jax.grad(lambda q: obj(key, log_joint, fam, q, x, validate=False, **kw))(params)
                return jnp.concatenate([a.reshape(-1) for a in jax.tree.leaves(g)])

            keys = jax.random.split(jax.random.key(k), args.draws)
            var = float(jnp.sum(jnp.var(jax.jit(jax.vmap(grad_vec))(keys), 0)))
            t = time_fn(jax.jit(step), (jax.random.key(2), params), args.repeats, args.min_time)
            print(f"{k:>5} {est:>9} {var:>12.4g} {t * 1e6:>10.1f} {t / base:>7.2f}")
        if numpyro is not None:

            def model():
                z = numpyro.sample("z", dist.Normal(jnp.zeros(d), 1.0).to_event(1))
                numpyro.sample(
                    "x", dist.Normal(jnp.broadcast_to(z, x.shape), 1.0).to_event(2), obs=x
                )

            def guide():
                loc = numpyro.param("loc", params["loc"])
                ls = numpyro.param("log_scale", params["log_scale"])
                numpyro.sample("z", dist.Normal(loc, jnp.exp(ls)).to_event(1))

            loss = Trace_ELBO(num_particles=k)

            def np_step(key, p, loss=loss):
                return jax.value_and_grad(lambda q: loss.loss(key, q, model, guide))(p)

            t = time_fn(
                jax.jit(np_step), (jax.random.key(3), dict(params)), args.repeats, args.min_time
            )
            print(f"{k:>5} {'numpyro':>9} {'(ELBO, K)':>12} {t * 1e6:>10.1f} {t / base:>7.2f}")


if __name__ == "__main__":
    main()
