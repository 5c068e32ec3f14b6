"""Configuration: the YAML defaults in configs/, an optional user file, and key=value overrides."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from edgeinspect.errors import ConfigError


def default_config(name: str) -> dict[str, Any]:
    """The documented defaults shipped as configs/<name>.yaml."""
    try:
        text = resources.files("edgeinspect.configs").joinpath(f"{name}.yaml").read_text()
    except FileNotFoundError:
        raise ConfigError(f"no default configuration named {name!r}") from None
    return yaml.safe_load(text)


def _merge(base: dict[str, Any], update: dict[str, Any], where: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key not in out:
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: {sorted(out)}")
        out[key] = _merge(out[key], value, f"{where}.{key}") if isinstance(out[key], dict) else value
    return out


def load_config(name: str, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
                ) -> dict[str, Any]:
    """Defaults of ``name``, updated by the YAML file ``path`` and ``section.key=value`` overrides."""
    config = default_config(name)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            user = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        config = _merge(config, user, str(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        nested: dict[str, Any] = {}
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
        config = _merge(config, nested, f"--set {key}")
    return config
