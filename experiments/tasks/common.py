"""What the generic tasks share: task settings with smoke overrides, per-model claim bounds."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

__all__ = ["bound_for", "task_settings"]


def task_settings(cfg: DictConfig, smoke: bool) -> DictConfig:
    """``cfg.task`` with ``cfg.task.smoke_overrides`` merged in when `smoke` (the
    replications' convention: keys the user set on the command line keep the user's value),
    without the overrides node itself."""
    from feynkit.experiments import harness

    node = OmegaConf.create(OmegaConf.to_container(cfg.task, resolve=True))  # untyped
    if smoke:
        node = harness.with_smoke(node, "task")  # command-line task.<key> values win
    node = OmegaConf.to_container(node, resolve=True)
    node.pop("smoke_overrides", None)
    return OmegaConf.create(node)


def bound_for(settings: DictConfig, key: str, model: str) -> float | None:
    """``settings[key][model]`` (a per-model claim bound), or None when not stated."""
    table = settings.get(key) or {}
    value = table.get(model)
    return None if value is None else float(value)
