"""Configuration: the YAML defaults in configs/, an optional named preset (configs/presets/), an optional
user file, ``key=value`` overrides, all validated against the schema of the configuration (every error at
once, before any work starts)."""

from __future__ import annotations

import copy
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from edgeinspect.errors import ConfigError
from edgeinspect.schema import validation_errors


def default_text(name: str) -> str:
    """The text of configs/<name>.yaml, comments included."""
    try:
        return resources.files("edgeinspect.configs").joinpath(f"{name}.yaml").read_text()
    except FileNotFoundError:
        raise ConfigError(f"no default configuration named {name!r} (configs/{name}.yaml)") from None


def default_config(name: str) -> dict[str, Any]:
    """The documented defaults shipped as configs/<name>.yaml."""
    return yaml.safe_load(default_text(name))


def schema_for(name: str) -> type[BaseModel]:
    """The schema of configuration ``name``: a model family's, or ``export``."""
    from edgeinspect.export.settings import ExportConfig
    from edgeinspect.train.models import MODELS, config_schema

    if name == "export":
        return ExportConfig
    if name not in MODELS:
        raise ConfigError(f"no configuration named {name!r}; choose one of {sorted([*MODELS, 'export'])}")
    return config_schema(name)


def config_names() -> list[str]:
    """Every configuration that has a schema and defaults."""
    from edgeinspect.train.models import MODELS

    return [*MODELS, "export"]


def preset_names() -> list[str]:
    """The presets shipped in configs/presets/, by name."""
    folder = resources.files("edgeinspect.configs").joinpath("presets")
    return sorted(f.name.removesuffix(".yaml") for f in folder.iterdir() if f.name.endswith(".yaml"))


def preset_config(preset: str, family: str) -> dict[str, Any]:
    """The keys preset ``preset`` sets for ``family``: its shared sections, then its entry for the family.

    A preset is a partial configuration (configs/presets/<preset>.yaml) for the anomaly-map families; a
    top-level key that names a family holds settings for that family only (over the shared ones).
    """
    from edgeinspect.train.models import MODELS

    names = preset_names()
    if preset not in names:
        raise ConfigError(f"no preset named {preset!r}; choose one of {names} (configs/presets/)")
    if family not in MODELS or MODELS[family].task != "anomaly_map":
        raise ConfigError(f"--preset {preset}: presets are for the anomaly-map families "
                          f"({', '.join(f for f, cls in MODELS.items() if cls.task == 'anomaly_map')}), "
                          f"not {family}; use --set for its keys")
    raw = yaml.safe_load(resources.files("edgeinspect.configs").joinpath("presets", f"{preset}.yaml").read_text()) or {}
    shared = {key: value for key, value in raw.items() if key not in MODELS}
    return _merge(shared, raw.get(family) or {}, "", {})


def _merge(base: dict[str, Any], update: dict[str, Any], where: str, origins: dict[str, str],
           prefix: str = "") -> dict[str, Any]:
    """``base`` updated by ``update``; records in ``origins`` where each key path was set."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{prefix}{key}"
        origins[path] = where
        old = out.get(key)
        out[key] = (_merge(old, value, where, origins, f"{path}.") if isinstance(old, dict) and isinstance(value, dict)
                    else value)
    return out


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; ConfigError naming the file (and line) when it cannot be read or parsed."""
    try:
        return yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"{path} is not valid YAML{at}: {problem}; fix the file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None


def parse_override(item: str) -> dict[str, Any]:
    """``section.key=value`` (value in YAML) as a nested dict."""
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in parts):
        raise ConfigError(f"--set {item!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"--set {item}: the value is not valid YAML ({problem}); quote it or fix it") from None
    nested: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def validate(name: str, config: Any, origins: dict[str, str] | None = None) -> dict[str, Any]:
    """The validated, normalised configuration; ConfigError listing every problem."""
    schema = schema_for(name)
    if not isinstance(config, dict):
        raise ConfigError(f"the {name} configuration must be a mapping of sections, not {type(config).__name__}")
    try:
        model = schema.model_validate(config)
    except ValidationError as exc:
        lines = validation_errors(exc, schema, origins)
        raise ConfigError(f"invalid {name} configuration: {'; '.join(lines)}; "
                          f"`edgeinspect config schema {name}` lists every key and what it allows") from None
    return model.model_dump(mode="json")


def load_config(name: str, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                preset: str | None = None) -> dict[str, Any]:
    """Defaults of ``name``, updated by the preset, the YAML file ``path`` and ``section.key=value``
    overrides (in this order), validated."""
    schema_for(name)  # an unknown name fails with the choices before any file is read
    origins: dict[str, str] = {}
    config = default_config(name)
    if preset is not None:
        config = _merge(config, preset_config(preset, name), f"preset {preset}", origins)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        user = read_yaml(path)
        if user is None:
            user = {}
        if not isinstance(user, dict):
            raise ConfigError(f"{path} must be a mapping of sections (model:, preprocess:, ...), "
                              f"not a {type(user).__name__}")
        config = _merge(config, user, str(path), origins)
    for item in overrides:
        config = _merge(config, parse_override(item), f"--set {item}", origins)
    return validate(name, config, origins)


def show(name: str, config: dict[str, Any]) -> str:
    """configs/<name>.yaml with its comments, each value replaced by the one in ``config``."""
    out, section = [], None
    line_re = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_]\w*):(?P<gap> *)(?P<value>.*?)(?P<comment>\s+#.*)?$")
    for line in default_text(name).splitlines():
        match = line_re.match(line)
        if not match or line.lstrip().startswith("#"):
            out.append(line)
            continue
        key = match["key"]
        if not match["indent"]:
            section = key
            out.append(line)
            continue
        value = _flow(config[section][key])
        head = f"{match['indent']}{key}:{match['gap'] or ' '}{value}"
        comment = (match["comment"] or "").lstrip()
        out.append(f"{head.ljust(len(line) - len(comment) - 1)} {comment}" if comment else head)
    return "\n".join(out) + "\n"


def _flow(value: Any) -> str:
    """A value as one line of YAML."""
    if isinstance(value, float) and math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return f"{value:.1f}"
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
