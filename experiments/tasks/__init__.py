"""Generic tasks that compose the config groups: ``task=sample``, ``task=compress``, ``task=train``.

`TASKS` maps ``cfg.task.name`` to ``task(cfg, ctx) -> None``, where ``ctx`` is the harness's run
context (``key``, ``seed``, ``smoke``, ``out_dir``; ``metric``, ``claim``, ``figure``). Every task
calls `validate_combination` first, so a combination that cannot work fails before any model is
built or compiled. `register_schemas` stores the structured-config schemas of every group option
(``schema/<group>/<option>``) and task (``schema/task/<name>``) in Hydra's ConfigStore; the entry
point calls it before composing.
"""

from collections.abc import Callable
from typing import Any

from feynkit.experiments.tasks.compress import CompressTask, run_compress
from feynkit.experiments.tasks.decode import DecodeTask, run_decode
from feynkit.experiments.tasks.models import ModelBundle
from feynkit.experiments.tasks.sample import SampleTask, run_sample
from feynkit.experiments.tasks.schemas import register_schemas as _register_group_schemas
from feynkit.experiments.tasks.train import TrainTask, run_train
from feynkit.experiments.tasks.validate import validate_combination

__all__ = [
    "TASKS",
    "TASK_SCHEMAS",
    "ModelBundle",
    "register_configs",
    "register_schemas",
    "run_compress",
    "run_decode",
    "run_sample",
    "run_train",
    "validate_combination",
]

TASKS: dict[str, Callable[[Any, Any], None]] = {
    "sample": run_sample,
    "compress": run_compress,
    "train": run_train,
    "decode": run_decode,
}
TASK_SCHEMAS: dict[str, type] = {
    "sample": SampleTask,
    "compress": CompressTask,
    "train": TrainTask,
    "decode": DecodeTask,
}


def register_schemas() -> None:
    """Store the schemas of every group option and generic task in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    _register_group_schemas()
    cs = ConfigStore.instance()
    for name, schema in TASK_SCHEMAS.items():
        cs.store(group="schema/task", name=name, node=schema)


register_configs = register_schemas
