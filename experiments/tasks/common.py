"""What the generic tasks share: task settings with smoke overrides, per-model claim bounds."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

__all__ = ["bound_for", "task_settings"]


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
