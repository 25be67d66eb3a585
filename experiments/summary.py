"""One summary of a ``--multirun`` sweep: summary.csv, summary.md and a comparison figure.

`MultirunSummary` is a Hydra callback (``hydra.callbacks`` in ``configs/config.yaml``); at the end
of a sweep it reads every job's ``results.json`` under the sweep directory and writes, next to
the job directories, one row per job: the job's overrides, its metrics, how many claims held and
its wall time. `write_summary` does the same for any directory, e.g. after a SLURM sweep whose
jobs finished at different times.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

__all__ = ["FIGURE_METRICS", "MultirunSummary", "collect_jobs", "write_summary"]

# The metric the comparison figure shows: the first of these every job has.
FIGURE_METRICS = (
    "energy_distance",
    "fd_digits",
    "energy_distance_to_conditional",
    "perplexity.compressed",
    "denoising_mse",
    "test_perplexity",
    "layer_error.max",
    "wall_seconds",
)
_MD_METRICS = 10  # metrics in the markdown table (the CSV has all)


def _overrides(job_dir: Path, results: dict) -> str:
    path = job_dir / ".hydra" / "overrides.yaml"
    if path.is_file():
        from omegaconf import OmegaConf

        items = OmegaConf.to_container(OmegaConf.load(path))
        return " ".join(str(i) for i in items)
    return str(results.get("overrides", ""))


def collect_jobs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One record per ``results.json`` under `sweep_dir` (job directories in numeric order)."""
    sweep_dir = Path(sweep_dir)

    def order(p: Path) -> tuple:
        name = p.parent.name
        return (0, int(name), "") if name.isdigit() else (1, 0, name)

    paths = sorted(sweep_dir.glob("*/results.json"), key=order)
    jobs = []
    for path in paths:
        res = json.loads(path.read_text())
        claims = res.get("claims", [])
        jobs.append(
            {
                "job": path.parent.name,
                "overrides": _overrides(path.parent, res),
                "experiment": res.get("experiment", ""),
                # strict JSON writes a non-finite metric as null (named in "non_finite")
                "metrics": {
                    k: float("nan") if v is None else v for k, v in res.get("metrics", {}).items()
                },
                "claims_held": sum(bool(c.get("holds")) for c in claims),
                "claims": len(claims),
                "job_seconds": res.get("wall_seconds", float("nan")),
            }
        )
    return jobs


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def write_summary(
    sweep_dir: str | Path, figure_metric: str | None = None
) -> dict[str, Path] | None:
    """Write summary.csv, summary.md and summary.png into `sweep_dir`; None if no job wrote
    results. Returns the paths written."""
    sweep_dir = Path(sweep_dir)
    jobs = collect_jobs(sweep_dir)
    if not jobs:
        return None
    names: list[str] = []
    for j in jobs:
        names += [k for k in j["metrics"] if k not in names]
    common = [k for k in names if all(k in j["metrics"] for j in jobs)]
    head = ["job", "overrides", "experiment", "claims_held", "claims", "job_seconds"]
    out = {"csv": sweep_dir / "summary.csv", "md": sweep_dir / "summary.md"}
    with out["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head + names)
        for j in jobs:
            w.writerow([j[h] for h in head] + [j["metrics"].get(k, "") for k in names])
    md_cols = common[:_MD_METRICS]
    lines = [
        f"# Sweep summary: {len(jobs)} jobs ({sweep_dir})",
        "",
        "| job | overrides | claims held | " + " | ".join(md_cols) + " |",
        "|---|---|---|" + "---|" * len(md_cols),
    ]
    for j in jobs:
        cells = [_fmt(j["metrics"][k]) for k in md_cols]
        held = f"{j['claims_held']}/{j['claims']}"
        lines.append(f"| {j['job']} | `{j['overrides']}` | {held} | " + " | ".join(cells) + " |")
    if len(common) > len(md_cols) or len(names) > len(common):
        lines += ["", f"All {len(names)} metrics per job: summary.csv."]
    out["md"].write_text("\n".join(lines) + "\n")
    metric = figure_metric or next((m for m in FIGURE_METRICS if m in common), None)
    if metric is None and common:
        metric = common[0]
    if metric is not None and metric in common:
        out["png"] = _figure(jobs, metric, sweep_dir / "summary.png")
    return out


def _figure(jobs: list[dict], metric: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [j["overrides"] or j["job"] for j in jobs]
    values = [j["metrics"][metric] for j in jobs]
    colors = ["tab:green" if j["claims_held"] == j["claims"] else "tab:red" for j in jobs]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(jobs) + 1.5))
    ax.barh(range(len(jobs)), values, color=colors)
    ax.set_yticks(range(len(jobs)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(metric)
    ax.set_title(f"{metric} per job (green: every claim held)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class MultirunSummary(Callback):
    """Hydra callback: `write_summary` into the sweep directory when a multirun ends.

    Args:
      figure_metric: the metric of the comparison figure (default: the first of
        `FIGURE_METRICS` that every job reports).
    """

    def __init__(self, figure_metric: str | None = None) -> None:
        self.figure_metric = figure_metric

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        written = write_summary(sweep_dir, self.figure_metric)
        if written is None:
            print(f"sweep summary: no results.json under {sweep_dir}")
        else:
            print(f"sweep summary: {written['md']}")
