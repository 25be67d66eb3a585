"""Registry of experiments: name → (run function, structured config schema).

A replication module defines a dataclass config (the schema Hydra validates
`configs/experiment/<name>.yaml` and overrides against) and a function
`run(cfg, out_dir) -> Results`, and registers both with `@register(name, ConfigClass)`.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["REGISTRY", "Replication", "get", "register"]


class Replication(NamedTuple):
    run: Callable[[Any, Path], Any]
    config_class: type


REGISTRY: dict[str, Replication] = {}


def register(name: str, config_class: type):
    def deco(fn):
        if name in REGISTRY:
            raise ValueError(f"experiment {name!r} is registered twice.")
        REGISTRY[name] = Replication(fn, config_class)
        return fn

    return deco


def get(name: str) -> Replication:
    _load_all()
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown experiment {name!r}; known: {sorted(REGISTRY)}.") from None


def _load_all() -> None:
    # Imported here, not at module import, so that `feynkit.experiments.replications` stays
    # cheap and a broken replication does not break the others' imports.
    from feynkit.experiments.replications import (  # noqa: F401
        bdia_inversion,
        dfloat11,
        fkc_cfg_digits,
        fkc_gmm,
        flow_scaling,
        guidance_adaptive,
        guidance_apg,
        guidance_cfgpp,
        guidance_classifier,
        integer_ops,
        kv_cache,
        quant_ppl,
        svdquant_w4a4,
        train_digits,
        train_lm,
        train_toy,
        train_vae,
        tweedie,
        verifier_scaling,
    )
