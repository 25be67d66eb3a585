"""Two processes on localhost (CPU, gloo collectives) run an FKC-corrected sampler over
particles sharded across both, and give the numbers of the single-process run."""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from feynkit.experiments import distributed

SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from feynkit.experiments import distributed

    multi = distributed.maybe_initialize()
    import jax
    from feynkit.experiments.tasks.models import gaussian_mixture
    from feynkit.inference import diffusion, smc

    b = gaussian_mixture(
        dim=2, weights=[0.3, 0.7], means=[[-2.0, 0.0], [2.0, 1.0]], scales=[0.6, 0.9],
        classes=[[0], [1]], experts=[[0], [1]],
    )
    n = 64
    x0 = np.asarray(jax.random.normal(jax.random.key(0), (n, 2))) / np.sqrt(2.0)
    labels = np.full((n,), b.null_label, np.int32)
    x0, labels = distributed.shard_global((x0, labels))
    ts = diffusion.time_grid(25, 1.0, 1e-3)
    solver = diffusion.ddpm(b.schedule)
    corrector = smc.fkc_anneal_corrector(2.0, ess_threshold=0.5)

    @jax.jit
    def run(key, x, labels):
        x, info = diffusion.sample(
            key, solver, b.model_fn(), x, ts, cond={"label": labels}, corrector=corrector
        )
        return x, info.log_weights, info.log_normalizer

    x, lw, logz = distributed.gather(run(jax.random.key(1), x0, labels))
    if distributed.is_main_process():
        np.savez(
            sys.argv[1], x=x, lw=lw, logz=logz, processes=jax.process_count(),
            devices=jax.device_count(), multi=multi,
        )
    """
)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEYNKIT_")}
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_launch_spec_reads_the_environment():
    assert distributed.launch_spec({}) is None
    assert distributed.launch_spec({"FEYNKIT_NUM_PROCESSES": "1"}) is None
    spec = distributed.launch_spec(
        {
            "FEYNKIT_NUM_PROCESSES": "2",
            "FEYNKIT_PROCESS_ID": "1",
            "FEYNKIT_COORDINATOR": "localhost:1234",
        }
    )
    assert spec == {"coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 1}
    with pytest.raises(ValueError, match="FEYNKIT_COORDINATOR=host:port"):
        distributed.launch_spec({"FEYNKIT_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="FEYNKIT_PROCESS_ID=2 must be in 0..1"):
        distributed.launch_spec(
            {"FEYNKIT_NUM_PROCESSES": "2", "FEYNKIT_PROCESS_ID": "2", "FEYNKIT_COORDINATOR": "h:1"}
        )
    srun = {"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}
    assert distributed.launch_spec(srun) == {
        "coordinator_address": None,
        "num_processes": None,
        "process_id": None,
    }
    assert distributed.maybe_initialize({}) is False


def test_check_launcher_plugin_names_the_extra(monkeypatch):
    distributed.check_launcher_plugin(["task=sample"])  # nothing asked: no check
    monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_submitit_launcher", None)
    with pytest.raises(SystemExit, match=r'pip install "feynkit\[launch\]"'):
        distributed.check_launcher_plugin(["--multirun", "launcher=submitit_slurm"])


@pytest.mark.slow
def test_two_processes_give_the_single_process_numbers(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    single = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "single.npz")],
        env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "multi.npz")],
            env=_env(
                FEYNKIT_COORDINATOR=f"127.0.0.1:{port}",
                FEYNKIT_NUM_PROCESSES="2",
                FEYNKIT_PROCESS_ID=str(i),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    a, b = np.load(tmp_path / "single.npz"), np.load(tmp_path / "multi.npz")
    assert int(a["processes"]) == 1 and not a["multi"]
    assert int(b["processes"]) == 2 and int(b["devices"]) == 2 and b["multi"]
    assert np.all(np.isfinite(a["x"])) and np.isfinite(a["logz"])
    np.testing.assert_allclose(b["x"], a["x"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b["lw"], a["lw"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b["logz"], a["logz"], rtol=1e-5, atol=1e-5)
