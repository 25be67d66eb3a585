"""What the generic tasks share: task settings with smoke overrides, the figure helper."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["bound_for", "save_figure", "task_settings"]


def task_settings(cfg: DictConfig, smoke: bool) -> DictConfig:
    """``cfg.task`` with ``cfg.task.smoke_overrides`` merged in when `smoke` (the
    replications' convention), without the overrides node itself."""
    node = OmegaConf.to_container(cfg.task, resolve=True)
    overrides = node.pop("smoke_overrides", None) or {}
    out = OmegaConf.create(node)
    if smoke and overrides:
        out = OmegaConf.merge(out, overrides)
    return out


def bound_for(settings: DictConfig, key: str, model: str) -> float | None:
    """``settings[key][model]`` (a per-model claim bound), or None when not stated."""
    table = settings.get(key) or {}
    value = table.get(model)
    return None if value is None else float(value)


def save_figure(ctx: Any, name: str, fig: Any) -> None:
    """Hand a matplotlib figure to the harness (``ctx.figure``), which writes the PNG."""
    import matplotlib.pyplot as plt

    try:
        ctx.figure(name, fig)
    finally:
        plt.close(fig)


def new_figure(*args: Any, **kwargs: Any):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)
