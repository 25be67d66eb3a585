"""The record every experiment writes: `results.json`, a table on stdout, the claim checks.

{"experiment", "seed", "config", "metrics": {name: number},
 "claims": [{"name", "holds", "value", "bound"}], "versions", "wall_seconds"}
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["Claim", "Results", "package_versions"]

_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def package_versions() -> dict[str, str]:
    """Versions of Python, feynkit and the libraries a result depends on."""
    out = {"python": platform.python_version()}
    for pkg in (
        "feynkit",
        "jax",
        "jaxlib",
        "flax",
        "optax",
        "chex",
        "orbax-checkpoint",
        "hydra-core",
        "numpy",
    ):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        import jax

        out["backend"] = jax.default_backend()
        out["devices"] = str(jax.device_count())
    except Exception:  # noqa: BLE001 - versions are informative only
        pass
    return out


@dataclasses.dataclass(frozen=True)
class Claim:
    """`value <op> bound`, e.g. FKC error < naive error / 2."""

    name: str
    value: float
    bound: float
    op: str = "<"
    smoke: bool = False  # also enforced in smoke runs (a loose bound that a smoke run must meet)

    @property
    def holds(self) -> bool:
        return math.isfinite(self.value) and _OPS[self.op](self.value, self.bound)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "holds": self.holds,
            "value": self.value,
            "bound": self.bound,
            "op": self.op,
            "smoke": self.smoke,
        }


class Results:
    """Collects metrics and claims of one run and writes them."""

    def __init__(self, experiment: str, seed: int, config: dict[str, Any] | None = None):
        self.experiment = experiment
        self.seed = seed
        self.config = config or {}
        self.metrics: dict[str, float] = {}
        self.claims: list[Claim] = []
        self.figures: list[str] = []
        self._start = time.perf_counter()

    def metric(self, name: str, value: Any) -> float:
        value = float(value)
        self.metrics[name] = value
        return value

    def claim(self, name: str, value: Any, bound: Any, op: str = "<", smoke: bool = False) -> Claim:
        if op not in _OPS:
            raise ValueError(f"unknown comparison {op!r}; use one of {sorted(_OPS)}.")
        c = Claim(name, float(value), float(bound), op, smoke)
        self.claims.append(c)
        return c

    @property
    def all_hold(self) -> bool:
        return all(c.holds for c in self.claims)

    def failed(self, smoke: bool = False) -> list[Claim]:
        """The claims that do not hold; in a smoke run only those enforced at smoke scale."""
        return [c for c in self.claims if not c.holds and (c.smoke or not smoke)]

    def as_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "seed": self.seed,
            "config": self.config,
            "metrics": self.metrics,
            "claims": [c.as_dict() for c in self.claims],
            "figures": self.figures,
            "versions": package_versions(),
            "wall_seconds": time.perf_counter() - self._start,
        }

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / "results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=2, sort_keys=False) + "\n")
        return path

    def table(self) -> str:
        lines = [
            f"== {self.experiment} (seed {self.seed}) ==",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v:.4g} |" for k, v in self.metrics.items()]
        if self.claims:
            lines += ["", "| claim | value | bound | holds |", "|---|---|---|---|"]
            lines += [
                f"| {c.name}{' (smoke)' if c.smoke else ''} | {c.value:.4g} | {c.op} {c.bound:.4g}"
                f" | {'yes' if c.holds else 'NO'} |"
                for c in self.claims
            ]
        return "\n".join(lines)
