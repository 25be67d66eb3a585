"""Hydra entry point: ``python -m feynkit.experiments.run [task=...] [experiment=...] [k=v ...]``.

`task=replication` (the default) runs the paper replication `experiment` (default `fkc_gmm`)
through `feynkit.experiments.harness`; `task=sample`, `task=compress`, `task=train` run the
generic tasks of `feynkit.experiments.tasks` over the config groups. Each run writes
`results.json` (metrics, claim checks, config, versions, seed, wall time), its figures and
checkpoints into Hydra's run directory, prints a table, and exits non-zero when a claim fails
(for `--multirun` sweeps: at the end, when a claim of any job failed). Smoke runs
(``smoke=true``) record their claims without enforcing them.
"""

import dataclasses
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


def run_experiment(cfg: DictConfig, out_dir: str | Path) -> Results:
    """Run the task of `cfg` and write its results into `out_dir`."""
    results = Results(_run_name(cfg), cfg.seed)
    if cfg.task.name == "replication":
        harness.run_replication(cfg, harness.Context(results, cfg.seed, cfg.smoke, out_dir))
    else:
        from feynkit.experiments.tasks import TASKS

        if cfg.task.name not in TASKS:
            raise ValueError(f"unknown task {cfg.task.name!r}; known: {sorted(TASKS)}.")
        ctx = harness.Context(results, cfg.seed, cfg.smoke, out_dir, smoke_claims=True)
        TASKS[cfg.task.name](cfg, ctx)
        harness.check_finite(ctx)
    results.config = OmegaConf.to_container(cfg, resolve=True)
    if _is_main_process():  # a multi-process run writes its record once
        path = results.write(out_dir)
        print(results.table())
        print(f"\nresults: {path}")
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
    hc = HydraConfig.get()
    results = run_experiment(cfg, hc.runtime.output_dir)
    if cfg.smoke:
        print("smoke run: only the claims marked (smoke) are enforced at this scale.")
    failed = [c.name for c in results.failed(smoke=cfg.smoke)]
    if failed:
        msg = f"claims failed in {results.experiment}: {', '.join(failed)}"
        print(msg, file=sys.stderr)
        if hc.mode == RunMode.RUN:
            sys.exit(1)
        _FAILED.append(msg)


def main() -> None:
    from feynkit.experiments.distributed import check_launcher_plugin

    check_launcher_plugin(sys.argv[1:])
    register_configs()
    _main()
    if _FAILED:
        print("\n".join(_FAILED), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
