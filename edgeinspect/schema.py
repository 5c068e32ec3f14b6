"""Typed configuration: the sections every family shares, the building blocks for family sections,
and one error formatter that turns pydantic's errors into lines naming key, value and what is allowed.

Torch-free (pydantic, numpy-free even), so the runtime and the manifest reader use it too. A model
family declares its ``model`` section beside the family (``train/models/<family>/config.py``);
:func:`family_config` combines it with the shared sections below.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator


class Section(BaseModel):
    """A configuration section: unknown keys are errors (a typo must never be ignored)."""

    model_config = ConfigDict(extra="forbid")


def real(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False
         ) -> Any:
    """A finite float (ints accepted, bools and strings not) in the interval given by the bounds."""
    bounds = {("gt" if lo_open else "ge"): lo} if lo is not None else {}
    if hi is not None:
        bounds["lt" if hi_open else "le"] = hi
    return Annotated[float, Field(strict=True, allow_inf_nan=False, **bounds)]


def integer(lo: int | None = None, hi: int | None = None) -> Any:
    """An int (not a bool, a float or a string) within [lo, hi]."""
    return Annotated[int, Field(strict=True, ge=lo, le=hi)]


Side = integer(32, 4096)  # an image side in pixels the backbones can take


# ------------------------------------------------------------------------------ shared sections
class PreprocessSection(Section):
    """``preprocess``: model input size, optional resize before a centre crop, interpolation."""

    input_size: tuple[Side, Side]
    resize: tuple[Side, Side] | None = None
    interpolation: Literal["area", "linear", "cubic", "nearest", "auto"] = "area"

    @model_validator(mode="after")
    def _crop_fits(self) -> PreprocessSection:
        if self.resize is not None and (self.resize[0] < self.input_size[0] or self.resize[1] < self.input_size[1]):
            raise ValueError(f"resize: {list(self.resize)} is smaller than input_size {list(self.input_size)} "
                             f"(the centre crop must fit inside the resized image)")
        return self


class TrainSection(Section):
    """``train``: batching and the calibration hold-out."""

    batch_size: integer(1, 1024)
    holdout_fraction: real(0.0, 1.0, hi_open=True)
    min_holdout: integer(1, 100_000)


class DecisionSection(Section):
    """``decision``: how the threshold is set from held-out good scores, smallest reported region."""

    threshold_rule: Literal["mean_sd", "quantile"]
    threshold_sd: real(0.0, 100.0)
    threshold_quantile: real(0.0, 1.0)
    threshold_margin: real(0.0, 100.0, lo_open=True)
    min_region_area: integer(0, 10_000_000)


@cache
def family_config(model_section: type[Section]) -> type[Section]:
    """The whole configuration of a family: its ``model`` section plus the shared sections."""
    name = model_section.__name__.removesuffix("Section") + "Config"
    return create_model(name, __base__=Section, __doc__=f"Configuration of {name.removesuffix('Config')}.",
                        model=(model_section, ...), preprocess=(PreprocessSection, ...),
                        train=(TrainSection, ...), decision=(DecisionSection, ...))


class DetectorTrainSection(Section):
    """``train`` of a detector: epochs, batching, optimizer and schedule, flips, checkpoints."""

    epochs: integer(1, 100_000)
    batch_size: integer(1, 1024)
    lr: real(0.0, 10.0, lo_open=True)
    optimizer: Literal["adamw", "sgd"]
    weight_decay: real(0.0, 1.0)
    momentum: real(0.0, 1.0, hi_open=True)
    warmup_epochs: real(0.0, 1000.0)
    min_lr_ratio: real(0.0, 1.0)
    grad_clip: real(0.0, 1e6)
    hflip: real(0.0, 1.0)
    vflip: real(0.0, 1.0)
    crop: real(0.0, 1.0)
    save_every: integer(0, 100_000)
    cache_features: bool
    map_every: integer(0, 100_000)
    best_by: Literal["val_map50", "val_loss", "last"]
    ema_epochs: real(0.0, 1000.0)
    seed: integer(0, 2**32 - 1)
    workers: integer(0, 0)

    @model_validator(mode="after")
    def _map_to_rank_by(self) -> DetectorTrainSection:
        if self.best_by == "val_map50" and not self.map_every:
            raise ValueError("best_by: val_map50 needs map_every > 0 (the val mAP is measured then)")
        return self


class DetectorDecisionSection(Section):
    """``decision`` of a detector: the confidence a defect detection needs to make the verdict NOK."""

    conf: real(0.0, 1.0, lo_open=True, hi_open=True)


@cache
def detector_config(model_section: type[Section]) -> type[Section]:
    """The whole configuration of a detector family: its ``model`` section plus the detector sections."""
    name = model_section.__name__.removesuffix("Section") + "Config"
    return create_model(name, __base__=Section, __doc__=f"Configuration of {name.removesuffix('Config')}.",
                        model=(model_section, ...), preprocess=(PreprocessSection, ...),
                        train=(DetectorTrainSection, ...), decision=(DetectorDecisionSection, ...))


# ------------------------------------------------------------------------------------- errors
def validation_errors(exc: ValidationError, schema: type[BaseModel], where: dict[str, str] | None = None
                      ) -> list[str]:
    """One line per error: ``key.path: value is not <allowed> (where it was set)``."""
    json_schema = schema.model_json_schema()
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        path = _path(loc)
        kind, value = err["type"], err.get("input")
        if kind == "extra_forbidden":
            parent = _node(json_schema, loc[:-1])
            known = sorted(parent.get("properties", {}))
            prefix = _path(loc[:-1])
            text = f"{prefix + ': ' if prefix else ''}unknown key {loc[-1]!r}; known keys: {known}"
        elif kind == "missing":
            text = f"{path}: missing"
        elif kind == "value_error":
            msg = str(err["msg"]).removeprefix("Value error, ")
            text = f"{path}.{msg}" if path and isinstance(value, dict) else f"{path}: {msg}" if path else msg
        elif kind in _RANGE_ERRORS:
            text = f"{path}: {_show(value)} is not {_interval(_node(json_schema, loc)) or 'allowed'}"
        else:
            allowed = _describe(_node(json_schema, loc), json_schema)
            text = f"{path}: {_show(value)} is not {allowed}" if allowed else f"{path}: {err['msg']}"
        origin = _origin(path, where or {})
        lines.append(f"{text} ({origin})" if origin else text)
    return lines


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _origin(path: str, where: dict[str, str]) -> str:
    """Where the value at ``path`` (or its closest parent) was set."""
    while path:
        if path in where:
            return where[path]
        path = path.rpartition(".")[0] if "." in path else path.partition("[")[0] if "[" in path else ""
    return ""


def _show(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _deref(root: dict, node: dict) -> dict:
    while "$ref" in node:
        node = root["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _non_null(root: dict, node: dict) -> tuple[dict, bool]:
    """(the schema without its null alternative, whether null is allowed)."""
    node = _deref(root, node)
    options = node.get("anyOf")
    if options and any(o.get("type") == "null" for o in options):
        rest = [o for o in options if o.get("type") != "null"]
        return (_deref(root, rest[0]) if len(rest) == 1 else {"anyOf": rest}), True
    return node, False


def _node(root: dict, loc: tuple) -> dict:
    """The JSON Schema of the value at ``loc`` ({} when it cannot be followed)."""
    node = root
    for part in loc:
        node, _ = _non_null(root, node)
        if isinstance(part, int):
            items = node.get("prefixItems")
            node = items[part] if items and part < len(items) else node.get("items", {})
        else:
            node = node.get("properties", {}).get(part, {})
    return _deref(root, node)


def _interval(node: dict) -> str:
    """``in (0, 1]``, ``>= 1`` or '' for a numeric schema."""
    lo = node.get("exclusiveMinimum", node.get("minimum"))
    hi = node.get("exclusiveMaximum", node.get("maximum"))
    left = "(" if "exclusiveMinimum" in node else "["
    right = ")" if "exclusiveMaximum" in node else "]"
    if lo is not None and hi is not None:
        return f"in {left}{_num(lo)}, {_num(hi)}{right}"
    if lo is not None:
        return f"{'>' if left == '(' else '>='} {_num(lo)}"
    if hi is not None:
        return f"{'<' if right == ')' else '<='} {_num(hi)}"
    return ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and not math.isinf(x) else repr(x)


def _describe(node: dict, root: dict) -> str:
    """What a schema allows, in words: ``a number in (0, 1]``, ``one of area, linear``, ..."""
    node, nullable = _non_null(root, node)
    text = ""
    if "enum" in node or "const" in node:
        values = node.get("enum", [node.get("const")])
        text = "one of " + ", ".join(_show(v) if not isinstance(v, str) else v for v in values)
    elif node.get("type") in ("number", "integer"):
        noun = "a finite number" if node["type"] == "number" else "an integer"
        bounds = _interval(node)
        text = f"{noun} {bounds}" if bounds else noun
    elif node.get("type") == "boolean":
        text = "true or false"
    elif node.get("type") == "string":
        text = "a string"
    elif node.get("type") == "array":
        items = node.get("prefixItems")
        if items:
            inner = {_describe(i, root) for i in items}
            text = f"a list of {len(items)} " + (inner.pop().replace("an integer", "integers")
                                                  .replace("a finite number", "numbers") if len(inner) == 1 else
                                                  "values")
        else:
            text = f"a list of {_describe(node.get('items', {}), root) or 'values'}"
    elif node.get("type") == "object" or "properties" in node:
        text = "a mapping of " + ", ".join(node.get("properties", {})) if node.get("properties") else "a mapping"
    elif "anyOf" in node:
        text = " or ".join(filter(None, (_describe(o, root) for o in node["anyOf"])))
    return f"{text} or null" if nullable and text else text
