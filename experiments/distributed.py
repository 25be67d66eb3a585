"""Several processes, one JAX runtime: `maybe_initialize` and sharding over the global mesh.

feynkit writes no scheduler of its own. A run launched as several processes — by Hydra's
submitit launcher (``launcher=submitit_slurm hydra.launcher.tasks_per_node=4``), by ``srun``, or
by hand on one machine — calls `maybe_initialize` first (the entry point does), which joins the
processes with `jax.distributed.initialize`:

- ``FEYNKIT_NUM_PROCESSES`` > 1 (with ``FEYNKIT_COORDINATOR=host:port`` and
  ``FEYNKIT_PROCESS_ID``): an explicit launch, e.g. two processes on localhost;
- a submitit job with several tasks: rank, task count and the first host from submitit's job
  environment (port ``FEYNKIT_COORDINATOR_PORT``, default 12355 + job id mod 1000);
- a SLURM step with several tasks (``srun``): JAX's own SLURM detection.

On the CPU the processes exchange data through gloo collectives. Particles, samples and batches
then shard over every device of every process (`global_mesh`, `shard_global`), XLA partitions
the jitted computation, and `gather` brings the result back to every process.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from feynkit.core.sharding import check_divisible, particle_mesh, particle_sharding
from feynkit.core.types import PyTree

__all__ = [
    "ENV_COORDINATOR",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "check_launcher_plugin",
    "gather",
    "global_mesh",
    "is_main_process",
    "launch_spec",
    "maybe_initialize",
    "shard_global",
]

ENV_COORDINATOR = "FEYNKIT_COORDINATOR"
ENV_NUM_PROCESSES = "FEYNKIT_NUM_PROCESSES"
ENV_PROCESS_ID = "FEYNKIT_PROCESS_ID"
ENV_PORT = "FEYNKIT_COORDINATOR_PORT"

_INITIALIZED: list[dict[str, Any]] = []


def launch_spec(environ: dict[str, str] | None = None) -> dict[str, Any] | None:
    """How this process was launched: ``{"coordinator_address", "num_processes",
    "process_id"}`` (None entries: JAX detects them), or None for a single process."""
    env = os.environ if environ is None else environ
    if ENV_NUM_PROCESSES in env:
        n = int(env[ENV_NUM_PROCESSES])
        if n <= 1:
            return None
        if ENV_COORDINATOR not in env or ENV_PROCESS_ID not in env:
            raise ValueError(
                f"{ENV_NUM_PROCESSES}={n} needs {ENV_COORDINATOR}=host:port and "
                f"{ENV_PROCESS_ID}=0..{n - 1} in the environment of every process."
            )
        pid = int(env[ENV_PROCESS_ID])
        if not 0 <= pid < n:
            raise ValueError(f"{ENV_PROCESS_ID}={pid} must be in 0..{n - 1}.")
        return {"coordinator_address": env[ENV_COORDINATOR], "num_processes": n, "process_id": pid}
    if "SUBMITIT_EXECUTOR" in env:
        import submitit

        job = submitit.JobEnvironment()
        if job.num_tasks <= 1:
            return None
        port = int(env.get(ENV_PORT, 12355 + int(str(job.job_id).split("_")[0]) % 1000))
        return {
            "coordinator_address": f"{job.hostnames[0]}:{port}",
            "num_processes": job.num_tasks,
            "process_id": job.global_rank,
        }
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
        return {"coordinator_address": None, "num_processes": None, "process_id": None}
    return None


def maybe_initialize(environ: dict[str, str] | None = None) -> bool:
    """Join the processes of a multi-process launch into one JAX runtime (idempotent).

    Returns True when running as several processes. Call it before any other JAX work (the
    entry point does, before composing the task): the CPU collectives are chosen here.
    """
    if _INITIALIZED:
        return True
    spec = launch_spec(environ)
    if spec is None:
        return False
    platforms = (os.environ.get("JAX_PLATFORMS") or "").lower()
    if platforms in ("", "cpu") or "cpu" in platforms.split(","):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**{k: v for k, v in spec.items() if v is not None})
    _INITIALIZED.append(spec)
    return True


def is_main_process() -> bool:
    """True on process 0 (the one that writes results and figures)."""
    return jax.process_index() == 0


def global_mesh() -> Mesh:
    """The one-axis particle mesh over every device of every process."""
    return particle_mesh(jax.devices())


def shard_global(tree: PyTree, mesh: Mesh | None = None) -> PyTree:
    """Global arrays whose leading axis is split over `mesh` (default `global_mesh`).

    Every process passes the same full host values (e.g. drawn from the same key); each keeps
    only the rows of its own devices. With one process this is `core.shard_particles`.
    """
    mesh = global_mesh() if mesh is None else mesh
    sharding = particle_sharding(mesh)

    def one(x):
        x = np.asarray(x)
        check_divisible(x.shape[0], mesh)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(one, tree)


def gather(tree: PyTree) -> PyTree:
    """The full values of (possibly sharded, multi-process) arrays, as NumPy on every process."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(
        lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree
    )


def check_launcher_plugin(argv: list[str]) -> None:
    """A clear error for ``launcher=submitit_*`` without Hydra's submitit plugin installed
    (call before Hydra parses `argv`)."""
    wants = [a for a in argv if a.lstrip("+").startswith("launcher=") and "submitit" in a]
    wants += [a for a in argv if a.startswith("launcher=local_parallel")]
    if not wants:
        return
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        raise SystemExit(
            f"{wants[0]} needs Hydra's submitit launcher plugin: "
            'pip install "feynkit[launch]" (hydra-submitit-launcher).'
        ) from None
