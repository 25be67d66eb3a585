"""Structured-config schemas for the option YAMLs of the config groups.

Every option ``configs/<group>/<option>.yaml`` starts with
``defaults: [/schema/<group>/<option>@_here_, _self_]``; `register_schemas` stores a dataclass
under that name, one field per key of the YAML, typed by the annotation of the same parameter
of the YAML's ``_target_`` factory (or by the builder's config dataclass for models; by the YAML
value where neither says). Hydra then rejects an unknown key (``guidance.foo=1``) and a wrong
type (``guidance.scale=abc``) while composing, and the dataclass's name lists the valid keys, so
the error names them:
``Key 'foo' not in 'guidance/apg (valid keys: scale, eta, momentum, norm_threshold)'``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

__all__ = [
    "GROUPS",
    "SETUP_KEYS",
    "config_dir",
    "factory_parameters",
    "import_target",
    "option_names",
    "option_schema",
    "register_schemas",
]

GROUPS = ("model", "solver", "guidance", "corrector", "quant", "prune", "data", "decoder")
# Keys of an option that configure the task around the factory (a calibration batch, a reward),
# never passed to the factory itself.
SETUP_KEYS = ("calibration", "reward")
_META_KEYS = ("_target_", "_partial_", "defaults")


def config_dir() -> Path:
    """The package's ``configs/`` directory."""
    import feynkit

    return Path(feynkit.__file__).parent / "configs"


def option_names(group: str) -> list[str]:
    """The options of a config group (its YAML file names)."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def import_target(path: str | None) -> Any:
    """The object a ``_target_`` names; ValueError naming it when it cannot be imported."""
    if path is None:
        return None
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"_target_ {path!r} cannot be imported ({e}).") from e


def factory_parameters(fn: Any) -> dict[str, Any]:
    """Parameter name → annotation (``Any`` where unresolvable) of a factory.

    A model builder declares its config dataclass as ``fn.config_class``; its fields count too.
    """
    out: dict[str, Any] = {}
    cls = getattr(fn, "config_class", None)
    if cls is not None:
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            out[f.name] = hints.get(f.name, Any)
    hints = _hints(fn)
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        out[name] = hints.get(name, Any)
    return out


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj)
    except Exception:  # noqa: BLE001 - jaxtyping strings etc.: fall back to the YAML values
        return {}


_PLAIN = (bool, int, float, str)


def _field_type(annotation: Any, value: Any) -> Any:
    """An OmegaConf-supported type for a field: a plain type or Optional of one, else Any."""
    origin = typing.get_origin(annotation)
    if annotation in _PLAIN:
        return annotation if value is not None else typing.Optional[annotation]  # noqa: UP045
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and args[0] in _PLAIN:
            return typing.Optional[args[0]]  # noqa: UP045
        return Any
    if annotation is Any or annotation is inspect.Parameter.empty:
        if isinstance(value, bool):
            return bool
        if isinstance(value, (int, float)):
            return float if isinstance(value, float) else int
        if isinstance(value, str):
            return str
    return Any


def option_schema(group: str, option: str, node: Any | None = None) -> type:
    """The schema dataclass of ``configs/<group>/<option>.yaml``."""
    if node is None:
        node = OmegaConf.load(config_dir() / group / f"{option}.yaml")
    values = {k: v for k, v in OmegaConf.to_container(node, resolve=False).items()}
    target = values.get("_target_")
    try:
        params = factory_parameters(import_target(target)) if target else {}
    except ValueError:  # a factory another part of the library has not written yet
        params = {}
    fields: list[tuple[str, Any, Any]] = [
        ("_target_", typing.Optional[str], dataclasses.field(default=target)),  # noqa: UP045
    ]
    if "_partial_" in values:
        fields.append(("_partial_", bool, dataclasses.field(default=bool(values["_partial_"]))))
    keys = [k for k in values if k not in _META_KEYS]
    for k in keys:
        v = values[k]
        if k in SETUP_KEYS or isinstance(v, (dict, list)) or _is_interpolation(v):
            ftype = Any
        else:
            ftype = _field_type(params.get(k, Any), v)
        default = v if not isinstance(v, (dict, list)) else None
        if isinstance(v, (dict, list)):
            fields.append((k, ftype, dataclasses.field(default_factory=lambda v=v: v)))
        else:
            fields.append((k, ftype, dataclasses.field(default=default)))
    name = f"{group}/{option} (valid keys: {', '.join(keys) if keys else 'none'})"
    return dataclasses.make_dataclass(name, fields)


def _is_interpolation(v: Any) -> bool:
    return isinstance(v, str) and "${" in v


_REGISTERED: list[bool] = []


def register_schemas() -> None:
    """Store ``schema/<group>/<option>`` for every option of every group (once per process)."""
    from hydra.core.config_store import ConfigStore

    if _REGISTERED:
        return
    _REGISTERED.append(True)
    cs = ConfigStore.instance()
    for group in GROUPS:
        for option in option_names(group):
            cs.store(group=f"schema/{group}", name=option, node=option_schema(group, option))
