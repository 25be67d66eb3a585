"""The one replication harness: schema, smoke overrides, seeds, figures, claims, results.json.

A replication is a YAML experiment (`configs/experiment/<name>.yaml`) that holds every value of
the run, its smoke settings and, where they compare two metrics, its claims. Python is needed
only for what is specific to the paper (a ground truth, a metric), in a module of
`feynkit.experiments.replications` that is discovered, not listed:

    @dataclasses.dataclass
    class MyConfig(harness.ReplicationConfig):   # types only; values live in the YAML
        num_steps: int = MISSING
        def __post_init__(self):                  # value checks: run before any JAX work
            harness.require(self.num_steps >= 1, "num_steps", "must be >= 1")

    @harness.replication("my_paper", MyConfig)
    def run(ex: MyConfig, ctx: harness.Context) -> None:
        ctx.metric("error", ...)
        ctx.claim("error below 0.1", error, 0.1)
        with ctx.figure("my_paper.png", ncols=2) as (fig, axes): ...

and its YAML:

    defaults:
      - /schema/experiment/my_paper@_here_
      - _self_
    name: my_paper
    num_steps: 100
    smoke_overrides: {num_steps: 5}
    claims:   # optional: value <op> factor · bound_metric + offset, checked after run()
      - {name: "ours beats baseline", metric: ours.error, op: "<", bound_metric: base.error}

An experiment with no Python at all composes the generic tasks (`task=sample`, ...): its YAML
uses the schema `/schema/experiment/composite`, lists `runs: {label: [overrides...]}` and
states `claims` over the runs' metrics (prefixed `label.`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import math
import pkgutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import MISSING, DictConfig, OmegaConf

from feynkit.experiments.results import Results

__all__ = [
    "ClaimSpec",
    "Context",
    "REGISTRY",
    "ReplicationConfig",
    "discover",
    "get",
    "replication",
    "require",
    "run_replication",
]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

log = logging.getLogger("feynkit.experiments.harness")


@dataclasses.dataclass
class ClaimSpec:
    """A claim stated in YAML: ``metrics[metric] <op> factor · (bound or metrics[bound_metric])
    + offset``."""

    name: str = MISSING
    metric: str = MISSING
    op: str = "<"
    bound: float | None = None
    bound_metric: str | None = None
    factor: float = 1.0
    offset: float = 0.0


@dataclasses.dataclass
class ReplicationConfig:
    """Keys every experiment has. Subclass it with the experiment's own (typed) keys."""

    name: str = MISSING
    smoke_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    claims: list[ClaimSpec] = dataclasses.field(default_factory=list)
    # loose bounds a smoke run must meet (CI runs every experiment with smoke=true)
    smoke_claims: list[ClaimSpec] = dataclasses.field(default_factory=list)
    runs: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def require(ok: bool, key: str, what: str) -> None:
    """Raise ``ValueError("experiment.<key> <what>")`` unless `ok`: the one way schemas state
    their value checks, so every message names the key to change."""
    if not ok:
        raise ValueError(f"experiment.{key} {what}")


class Replication(NamedTuple):
    run: Callable[[Any, Context], None]
    schema: type


REGISTRY: dict[str, Replication] = {}


def replication(name: str, schema: type):
    """Register ``run(ex, ctx)`` as the replication `name` with its schema dataclass."""
    if not (isinstance(schema, type) and issubclass(schema, ReplicationConfig)):
        raise TypeError(f"the schema of {name!r} must subclass harness.ReplicationConfig.")

    def deco(fn):
        if name in REGISTRY and REGISTRY[name].run is not fn:
            raise ValueError(f"experiment {name!r} is registered twice.")
        REGISTRY[name] = Replication(fn, schema)
        return fn

    return deco


_DISCOVERED = False


def discover() -> dict[str, Replication]:
    """Import every module of `feynkit.experiments.replications` (each registers itself) and
    check that each registered experiment has its YAML and each YAML its schema."""
    global _DISCOVERED
    if not _DISCOVERED:
        from feynkit.experiments import replications

        for info in pkgutil.iter_modules(replications.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{replications.__name__}.{info.name}")
        _DISCOVERED = True
        yamls = {p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")}
        missing = sorted(set(REGISTRY) - yamls)
        if missing:
            raise RuntimeError(f"experiments without configs/experiment/<name>.yaml: {missing}")
    return REGISTRY


def get(name: str) -> Replication:
    discover()
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown experiment {name!r}; known: {sorted(REGISTRY)}.") from None


class Context:
    """What a replication or task gets from the harness: seed and key, smoke flag, output
    directory, and the writers of metrics, claims and figures (into one `Results`)."""

    def __init__(
        self,
        results: Results,
        seed: int,
        smoke: bool,
        out_dir: str | Path,
        prefix: str = "",
        smoke_claims: bool = False,
    ):
        self.results = results
        self.seed = int(seed)
        self.smoke = bool(smoke)
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        # whether claims default to being enforced in smoke runs too (the generic tasks' loose
        # bounds are; a replication's paper claims are not, it states smoke_claims instead)
        self.smoke_claims = smoke_claims

    @property
    def key(self):
        import jax

        return jax.random.key(self.seed)

    def metric(self, name: str, value: Any) -> float:
        return self.results.metric(self.prefix + name, value)

    def metrics(self, values: dict[str, Any], prefix: str = "") -> None:
        for k, v in values.items():
            self.metric(prefix + k, v)

    def claim(self, name: str, value: Any, bound: Any, op: str = "<", smoke: bool | None = None):
        """Record ``value <op> bound``; `smoke` (default: the context's) enforces it in smoke
        runs as well."""
        label = f"{self.prefix.rstrip('.')}: {name}" if self.prefix else name
        smoke = self.smoke_claims if smoke is None else smoke
        return self.results.claim(label, value, bound, op, smoke)

    def child(self, prefix: str, smoke_claims: bool | None = None) -> Context:
        """The same run seen through a metric prefix (a sub-run of a composite experiment)."""
        enforce = self.smoke_claims if smoke_claims is None else smoke_claims
        return Context(
            self.results, self.seed, self.smoke, self.out_dir, self.prefix + prefix, enforce
        )

    @contextlib.contextmanager
    def figure(
        self, filename: str, nrows: int = 1, ncols: int = 1, size: float = 3.6, **subplot_kw: Any
    ) -> Iterator[tuple[Any, Any]]:
        """``with ctx.figure("x.png", nrows, ncols) as (fig, axes):`` — a 2-D array of axes of
        `size` inches each; saved as a PNG in the run directory and listed in results.json."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        subplot_kw.setdefault("figsize", (size * ncols, size * nrows))
        fig, axes = plt.subplots(nrows, ncols, squeeze=False, **subplot_kw)
        try:
            yield fig, axes
            fig.tight_layout()
            self.out_dir.mkdir(parents=True, exist_ok=True)
            name = self.prefix.replace(".", "_") + filename
            fig.savefig(self.out_dir / name, dpi=100)
            self.results.figures.append(name)
        finally:
            plt.close(fig)


def with_smoke(node: DictConfig, group: str, overrides: list[str] | None = None) -> DictConfig:
    """`node` (the ``group`` node: "experiment" or "task") with its ``smoke_overrides`` merged
    in, except for the keys the user set on the command line (``group.key=value`` wins over
    the smoke value). ``overrides``: the command line (default: the current Hydra run's)."""
    smoke = node.get("smoke_overrides") or {}
    if not smoke:
        return node
    unknown = sorted(set(smoke) - set(node) - {"smoke_overrides"})
    if unknown:
        raise ValueError(
            f"{group}.smoke_overrides names unknown keys {unknown}; "
            f"valid keys: {sorted(k for k in node if k != 'smoke_overrides')}."
        )
    explicit = _command_line_keys(group, overrides)  # what the user set wins over smoke values
    return OmegaConf.merge(node, {k: v for k, v in smoke.items() if k not in explicit})


def effective_config(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """The run's configuration as it actually runs: with ``smoke=true`` the smoke overrides of
    the replication (``experiment``) and of the generic task (``task``) applied, user
    command-line values winning. What results.json records and ``--cfg job`` prints."""
    out = OmegaConf.to_container(cfg, resolve=True)
    if not cfg.smoke:
        return out
    for group in ("experiment", "task"):
        node = cfg.get(group)
        if isinstance(node, DictConfig) and node.get("smoke_overrides"):
            if group == "experiment" and cfg.task.name != "replication":
                continue
            node = OmegaConf.create(OmegaConf.to_container(node, resolve=True))  # untyped
            out[group] = OmegaConf.to_container(with_smoke(node, group, overrides), resolve=True)
    return out


def experiment_node(cfg: DictConfig, schema: type) -> Any:
    """The `experiment` node with its smoke overrides applied (when ``smoke=true``, see
    `with_smoke`), validated by the schema (types, unknown keys, ``__post_init__`` value
    checks) into a `schema` instance."""
    node = cfg.experiment
    if cfg.smoke:
        node = with_smoke(node, "experiment")
    merged = OmegaConf.merge(OmegaConf.structured(schema), node)
    return OmegaConf.to_object(merged)


def command_line_overrides() -> list[str]:
    """The current Hydra run's command-line overrides (empty outside a Hydra run)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return []


def _command_line_keys(node: str, overrides: list[str] | None = None) -> set[str]:
    """The keys of `node` set by command-line overrides (by default those of the current Hydra
    run; empty when the config was composed without Hydra's run context)."""
    if overrides is None:
        overrides = command_line_overrides()
    keys = set()
    for o in overrides:
        path = o.split("=", 1)[0].lstrip("+~")
        if path.startswith(node + "."):
            keys.add(path[len(node) + 1 :].split(".")[0])
    return keys


def check_claims(specs: list[ClaimSpec], ctx: Context, smoke: bool = False) -> None:
    """Evaluate the YAML-stated claims against the metrics the run wrote."""
    metrics = ctx.results.metrics

    def lookup(key: str, spec: ClaimSpec) -> float:
        if key not in metrics:
            raise ValueError(
                f"claim {spec.name!r} refers to metric {key!r}, which the run did not write; "
                f"written: {sorted(metrics)}."
            )
        return metrics[key]

    for spec in specs:
        if (spec.bound is None) == (spec.bound_metric is None):
            raise ValueError(f"claim {spec.name!r} needs exactly one of bound, bound_metric.")
        ref = spec.bound if spec.bound is not None else lookup(spec.bound_metric, spec)
        name = f"smoke: {spec.name}" if smoke else spec.name
        ctx.results.claim(
            name, lookup(spec.metric, spec), spec.factor * ref + spec.offset, spec.op, smoke
        )


def run_composite(ex: ReplicationConfig, ctx: Context) -> None:
    """Run each entry of ``ex.runs`` as a generic task (composed with its overrides, the run's
    seed and smoke flag) and write its metrics under ``<label>.``."""
    from hydra import compose

    from feynkit.experiments.tasks import TASKS

    if not ex.runs:
        raise ValueError(f"experiment {ex.name!r} has neither a Python module nor `runs`.")
    for i, (label, overrides) in enumerate(ex.runs.items()):
        log.info("run %d/%d %s: %s", i + 1, len(ex.runs), label, " ".join(overrides))
        sub = compose(
            "config", overrides=[*overrides, f"seed={ctx.seed}", f"smoke={str(ctx.smoke).lower()}"]
        )
        if sub.task.name == "replication":
            raise ValueError(
                f"runs.{label} must select a task (task=sample, ...), not another replication."
            )
        TASKS[sub.task.name](sub, ctx.child(f"{label}.", smoke_claims=False))


def run_replication(cfg: DictConfig, ctx: Context) -> None:
    """Run the experiment `cfg.experiment.name` into `ctx` and check its YAML claims."""
    name = cfg.experiment.name
    discover()
    if name in REGISTRY:
        rep = REGISTRY[name]
        ex = experiment_node(cfg, rep.schema)
        log.info("replication %s: started", name)
        rep.run(ex, ctx)
        log.info("replication %s: done, %d metrics", name, len(ctx.results.metrics))
    else:
        ex = experiment_node(cfg, ReplicationConfig)
        run_composite(ex, ctx)
    check_claims(ex.claims, ctx)
    if ctx.smoke:
        check_claims(ex.smoke_claims, ctx, smoke=True)
    check_finite(ctx)


def check_finite(ctx: Context) -> None:
    """A claim, enforced in smoke runs too, that every metric written is finite."""
    bad = [k for k, v in ctx.results.metrics.items() if not math.isfinite(v)]
    found = f" (found: {', '.join(bad[:5])})" if bad else ""
    ctx.results.claim(f"no non-finite metrics{found}", len(bad), 0.5, "<", smoke=True)
