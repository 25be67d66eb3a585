"""Watchdog: the FKC configuration that hung XLA:CPU (issue 16) runs to the end in fresh processes.

`fkc_sample` on the product of a 3- and a 4-component 2-D mixture with 32768 particles hung in 2
of 8 fresh processes (0% CPU, waiting on XLA) when the resamplers held a `lax.cond` nested inside
the SMC loop's adaptive-resampling `lax.cond`; the resamplers now contain no conditional. Each
child compiles and runs the configuration with every comb/multinomial resampler and prints a
checksum; a child that does not finish within the timeout fails the test (a hang), one that
crashes fails it with its stderr.
"""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp
    from feynkit.core import LinearSchedule, get_resampler
    from feynkit.inference import smc
    from feynkit.models import GaussianMixture

    steps = int(sys.argv[1])
    sched = LinearSchedule()
    p3 = GaussianMixture.create([0.2, 0.5, 0.3], [[-2.0, 0.0], [0.0, 1.5], [2.0, -1.0]],
                                scales=[0.6, 0.7, 0.5])
    p4 = GaussianMixture.create([0.25, 0.25, 0.25, 0.25],
                                [[-1.5, -1.5], [-1.5, 1.5], [1.5, -1.5], [1.5, 1.5]],
                                scales=[0.8, 0.8, 0.8, 0.8])
    fns = [(lambda x, t, g=g: g.marginal(sched, t).score(x),
            lambda x, t, g=g: g.marginal(sched, t).log_prob(x)) for g in (p3, p4)]
    sde = smc.product_sde([f[0] for f in fns], sched, [f[1] for f in fns])
    for name in ("systematic", "stratified", "multinomial"):
        run = jax.jit(lambda k, fn=get_resampler(name): smc.fkc_sample(
            k, sde, 32768, 2, steps, t_min=1e-2, resample_fn=fn)[0])
        state = run(jax.random.key(0))
        print(name, float(state.log_normalizer), float(jnp.mean(state.particles)), flush=True)
    print("done", flush=True)
    """
)


def _run_children(num_procs: int, steps: int, timeout: float) -> None:
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", ""), PYTHONWARNINGS="ignore")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(steps)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(num_procs)
    ]
    hung, failed = [], []
    for i, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            hung.append((i, out))
            continue
        if p.returncode != 0 or "done" not in out:
            failed.append((i, p.returncode, err[-2000:]))
    return hung, failed


def test_fkc_product_mixture_does_not_hang():
    # One fresh process, a short run: the hang showed at the first run after compiling (with
    # the lax.cond in adaptive_resample it hung 3 of 3 fresh processes on a loaded 2-core CPU).
    hung, failed = _run_children(num_procs=1, steps=20, timeout=240)
    assert not failed, f"child crashed: {failed}"
    assert not hung, f"the fresh process hung (> 240 s): {hung}"


@pytest.mark.slow
def test_fkc_product_mixture_does_not_hang_many_processes():
    hung, failed = _run_children(num_procs=8, steps=100, timeout=600)
    assert not failed, f"children crashed: {failed}"
    assert not hung, f"{len(hung)} of 8 fresh processes hung (> 600 s): {hung}"
