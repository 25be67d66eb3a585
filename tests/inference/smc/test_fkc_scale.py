"""FKC at scale: sharded over a 4-device mesh, and resumed from an Orbax checkpoint."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np

from feynkit.core import LinearSchedule
from feynkit.inference import smc
from feynkit.models import GaussianMixture

SCHED = LinearSchedule()
P = GaussianMixture.create([0.3, 0.7], [[-1.5, 0.0], [1.0, 1.0]], scales=[0.5, 0.8])


def _sde():
    return smc.annealed_sde(
        lambda x, t: P.marginal(SCHED, t).score(x),
        SCHED,
        2.0,
        lambda x, t: P.marginal(SCHED, t).log_prob(x),
    )


def test_sharded_run_equals_single_device():
    """Run in a fresh process with 4 host devices (the flag must precede JAX's start)."""
    code = textwrap.dedent("""
        import json, jax, numpy as np
        from feynkit.core import LinearSchedule, particle_mesh
        from feynkit.inference import smc
        from feynkit.models import GaussianMixture
        assert jax.device_count() == 4, jax.devices()
        S = LinearSchedule()
        P = GaussianMixture.create([0.3, 0.7], [[-1.5, 0.0], [1.0, 1.0]], scales=[0.5, 0.8])
        sde = smc.annealed_sde(lambda x, t: P.marginal(S, t).score(x), S, 2.0,
                               lambda x, t: P.marginal(S, t).log_prob(x))
        run = lambda mesh: jax.jit(lambda k: smc.fkc_sample(k, sde, 512, 2, 50, mesh=mesh)[0])(
            jax.random.key(0))
        a, b = run(None), run(particle_mesh())
        spec = str(b.particles.sharding.spec)
        dx = np.abs(np.asarray(a.particles) - np.asarray(b.particles)).max()
        print(json.dumps({"dx": float(dx),
                          "dz": float(abs(a.log_normalizer - b.log_normalizer)),
                          "ndev": len(b.particles.sharding.device_set), "spec": spec}))
    """)
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ndev"] == 4 and "particles" in res["spec"]
    # Same keys, same arithmetic; only reduction order may differ across devices.
    assert res["dx"] < 1e-4 and res["dz"] < 1e-4


def test_checkpointed_run_resumes_to_the_same_numbers(tmp_path):
    sde = _sde()
    key_init, key_run = jax.random.split(jax.random.key(4))
    state0 = smc.fkc_init(key_init, sde, 256, 2)
    kernel = smc.fkc_kernel(sde, 60)
    full, _ = smc.run_checkpointed(key_run, kernel, state0, 60, tmp_path / "a", every=20)
    # "Killed" after 40 steps: a first process that only got that far ...
    part, _ = smc.run_checkpointed(key_run, kernel, state0, 40, tmp_path / "b", every=20)
    assert int(part.step) == 40
    # ... and a restart with the full config resumes from step 40 (one chunk of 20 runs).
    resumed, infos = smc.run_checkpointed(key_run, kernel, state0, 60, tmp_path / "b", every=20)
    assert len(infos) == 1 and int(resumed.step) == 60
    np.testing.assert_array_equal(np.asarray(resumed.particles), np.asarray(full.particles))
    np.testing.assert_array_equal(np.asarray(resumed.log_weights), np.asarray(full.log_weights))
    assert float(resumed.log_normalizer) == float(full.log_normalizer)
    # and equals the plain single-scan run
    plain, _ = jax.jit(lambda s: smc.run(key_run, kernel, s, 60))(state0)
    np.testing.assert_allclose(
        np.asarray(plain.particles), np.asarray(full.particles), rtol=1e-5, atol=1e-5
    )
