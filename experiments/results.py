"""The record every experiment writes: `results.json`, a table on stdout, the claim checks.

{"schema_version", "experiment", "seed", "config", "overrides", "metrics": {name: number},
 "claims": [{"name", "holds", "value", "bound", "op", "smoke"}], "figures", "non_finite",
 "versions", "git_commit", "timestamp", "wall_seconds"}

`results.json` is strict JSON (RFC 8259): a NaN or ±inf metric or claim value is written as
``null`` and its place named in ``non_finite`` (e.g. ``"metrics.fkc.error"``,
``"claims[2].value"``), so `json.loads` of any reader — and `jsonschema` against
``results_schema.json`` next to this module (`RESULTS_SCHEMA`) — accepts it. ``config`` is the
configuration that actually ran (smoke overrides applied), ``overrides`` the command-line
overrides, ``git_commit`` the commit of the feynkit checkout (``"unknown"`` outside git).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import operator
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "RESULTS_SCHEMA",
    "SCHEMA_VERSION",
    "Claim",
    "Results",
    "git_commit",
    "package_versions",
    "strict_json",
]

SCHEMA_VERSION = 1
RESULTS_SCHEMA = Path(__file__).with_name("results_schema.json")

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


def git_commit() -> str:
    """The commit of the feynkit checkout this code runs from, or "unknown" (no git, no
    repository, e.g. an installed wheel)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha if len(sha) == 40 else "unknown"


def strict_json(obj: Any, path: str = "") -> tuple[Any, list[str]]:
    """(``obj`` with every non-finite float replaced by None, the paths replaced).

    Paths read like ``metrics.a.b`` for mapping keys and ``claims[2].value`` for list items.
    """
    bad: list[str] = []

    def walk(o: Any, where: str) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            bad.append(where)
            return None
        if isinstance(o, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(o)]
        return o

    return walk(obj, path), bad


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

    def __init__(
        self,
        experiment: str,
        seed: int,
        config: dict[str, Any] | None = None,
        overrides: list[str] | None = None,
    ):
        self.experiment = experiment
        self.seed = seed
        self.config = config or {}
        self.overrides = list(overrides or [])
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
        """The record as strict-JSON-ready data (non-finite numbers → None, named in
        ``non_finite``)."""
        record = {
            "schema_version": SCHEMA_VERSION,
            "experiment": self.experiment,
            "seed": self.seed,
            "config": self.config,
            "overrides": self.overrides,
            "metrics": self.metrics,
            "claims": [c.as_dict() for c in self.claims],
            "figures": self.figures,
            "versions": package_versions(),
            "git_commit": git_commit(),
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "wall_seconds": time.perf_counter() - self._start,
        }
        record, bad = strict_json(record)
        record["non_finite"] = bad
        return record

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / "results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.as_dict(), indent=2, sort_keys=False, allow_nan=False)
        path.write_text(text + "\n")
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
