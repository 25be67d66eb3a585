"""Hydra entry point: ``python -m feynkit.experiments.run [task=...] [experiment=...] [k=v ...]``.

`task=replication` (the default) runs the paper replication `experiment` (default `fkc_gmm`)
through `feynkit.experiments.harness`; `task=sample`, `task=compress`, `task=train` run the
generic tasks of `feynkit.experiments.tasks` over the config groups. Each run writes
`results.json` (metrics, claim checks, config, versions, seed, wall time), its figures and
checkpoints into Hydra's run directory, prints a table, and exits non-zero when a claim fails
(for `--multirun` sweeps: at the end, when a claim of any job failed). Smoke runs
(``smoke=true``) record their claims without enforcing them.

Everything the run reports goes through `logging` (logger ``feynkit``), so Hydra's
``<run dir>/run.log`` holds the run's story as well as the console; results.json records the
configuration that actually ran (smoke values applied, command-line values winning over them)
and ``--cfg job`` with ``smoke=true`` prints that configuration too.
"""

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import MISSING, DictConfig, OmegaConf

from feynkit.experiments import harness
from feynkit.experiments.results import Results

__all__ = ["RunConfig", "main", "register_configs", "run_experiment"]

log = logging.getLogger("feynkit.experiments.run")


def _quiet_backend_probe() -> None:
    """JAX logs a WARNING for every accelerator backend it probes and cannot start (the TPU
    one on any CPU machine); that is noise in run.log, not part of a run's story."""
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)


_quiet_backend_probe()


@dataclasses.dataclass
class RunConfig:
    """The top-level keys of every run: the task and the groups it composes."""

    task: Any = MISSING
    experiment: Any = None
    model: Any = None
    data: Any = None
    solver: Any = None
    guidance: Any = None
    corrector: Any = None
    quant: Any = None
    prune: Any = None
    decoder: Any = None
    launcher: Any = None
    seed: int = 0
    smoke: bool = False  # shrink the run for CI and quick checks; claims are not enforced


def register_configs() -> None:
    """Store the structured-config schemas: the run's, every replication's and every group
    option's (`feynkit.experiments.tasks.register_schemas`, where the tasks define them)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="schema/experiment", name="composite", node=harness.ReplicationConfig)
    for name, rep in harness.discover().items():
        cs.store(group="schema/experiment", name=name, node=rep.schema)
    try:
        from feynkit.experiments import tasks
    except ImportError:  # the generic tasks are optional for the replication harness
        return
    if hasattr(tasks, "register_schemas"):
        tasks.register_schemas()


def _run_name(cfg: DictConfig) -> str:
    if cfg.task.name == "replication":
        return str(cfg.experiment.name)
    return str(cfg.task.name)


def run_experiment(
    cfg: DictConfig, out_dir: str | Path, overrides: list[str] | None = None
) -> Results:
    """Run the task of `cfg` and write its results into `out_dir` (``overrides``: the command
    line, recorded in results.json; default: the current Hydra run's)."""
    if overrides is None:
        overrides = harness.command_line_overrides()
    results = Results(_run_name(cfg), cfg.seed, overrides=overrides)
    log.info("running %s (seed %s%s)", results.experiment, cfg.seed, ", smoke" if cfg.smoke else "")
    if cfg.task.name == "replication":
        harness.run_replication(cfg, harness.Context(results, cfg.seed, cfg.smoke, out_dir))
    else:
        from feynkit.experiments.tasks import TASKS

        if cfg.task.name not in TASKS:
            raise ValueError(f"unknown task {cfg.task.name!r}; known: {sorted(TASKS)}.")
        ctx = harness.Context(results, cfg.seed, cfg.smoke, out_dir, smoke_claims=True)
        TASKS[cfg.task.name](cfg, ctx)
        harness.check_finite(ctx)
    results.config = harness.effective_config(cfg, overrides)
    if _is_main_process():  # a multi-process run writes its record once
        path = results.write(out_dir)
        log.info("\n%s\n\nresults: %s", results.table(), path)
    return results


def _is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


_FAILED: list[str] = []


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def _main(cfg: DictConfig) -> None:
    try:
        from feynkit.experiments.distributed import maybe_initialize
    except ImportError:
        pass
    else:
        maybe_initialize()
    _quiet_backend_probe()  # again: Hydra's logging configuration ran in between
    hc = HydraConfig.get()
    try:
        results = run_experiment(cfg, hc.runtime.output_dir)
    finally:
        # A --multirun sweep runs its jobs in this one process: free each job's compiled XLA
        # executables, or their memory mappings pile up (see tests/conftest.py).
        import jax

        jax.clear_caches()
    if cfg.smoke:
        log.info("smoke run: only the claims marked (smoke) are enforced at this scale.")
    failed = [c.name for c in results.failed(smoke=cfg.smoke)]
    if failed:
        msg = f"claims failed in {results.experiment}: {', '.join(failed)}"
        log.error(msg)
        print(msg, file=sys.stderr)
        if hc.mode == RunMode.RUN:
            sys.exit(1)
        _FAILED.append(msg)


def _print_smoke_job_config(args: list[str]) -> bool:
    """``--cfg job`` (or ``-c job``) with ``smoke=true``: print the job config with the smoke
    values applied (Hydra prints the config before the task function could apply them).
    Returns False, leaving it to Hydra, for any other command line."""
    flags = [a for a in args if a.startswith("-")]
    if not (
        any(args[i] in ("--cfg", "-c") and args[i + 1 : i + 2] == ["job"] for i in range(len(args)))
        and set(flags) <= {"--cfg", "-c", "--resolve"}
    ):
        return False
    overrides = [a for a in args if not a.startswith("-") and a != "job"]
    if "smoke=true" not in [o.replace(" ", "").lower() for o in overrides]:
        return False
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(harness.CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=overrides)
    print(OmegaConf.to_yaml(harness.effective_config(cfg, overrides)), end="")
    return True


def main() -> None:
    from feynkit.experiments.distributed import check_launcher_plugin

    check_launcher_plugin(sys.argv[1:])
    register_configs()
    if _print_smoke_job_config(sys.argv[1:]):
        return
    _main()
    if _FAILED:
        print("\n".join(_FAILED), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
