"""Hydra entry point: `python -m feynkit.experiments.run experiment=<name> [key=value ...]`.

Each run writes `results.json` (metrics, claim checks, config, versions, wall time), its figures
and checkpoints into Hydra's run directory, prints a table, and exits non-zero when a claim
fails (for `--multirun` sweeps: when a claim of any job fails).
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

from feynkit.experiments import replications


@dataclasses.dataclass
class RunConfig:
    """Top-level keys shared by every experiment."""

    experiment: Any = MISSING
    seed: int = 0
    smoke: bool = False  # shrink the run (fewer steps/particles) for CI and quick checks


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    replications._load_all()
    for name, rep in replications.REGISTRY.items():
        cs.store(group="schema", name=name, node=rep.config_class)


_FAILED: list[str] = []


def run_experiment(cfg: DictConfig, out_dir: str | Path):
    """Run the experiment `cfg.experiment.name` and write its results into `out_dir`."""
    rep = replications.get(cfg.experiment.name)
    results = rep.run(cfg, Path(out_dir))
    results.config = OmegaConf.to_container(cfg, resolve=True)
    path = results.write(out_dir)
    print(results.table())
    print(f"\nresults: {path}")
    return results


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def _main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    results = run_experiment(cfg, hc.runtime.output_dir)
    if cfg.smoke:
        print("smoke run: claims are recorded but not enforced at this scale.")
    elif not results.all_hold:
        failed = [c.name for c in results.claims if not c.holds]
        msg = f"claims failed in {cfg.experiment.name}: {', '.join(failed)}"
        print(msg, file=sys.stderr)
        if hc.mode == RunMode.RUN:
            sys.exit(1)
        _FAILED.append(msg)


def main() -> None:
    register_configs()
    _main()
    if _FAILED:
        print("\n".join(_FAILED), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
