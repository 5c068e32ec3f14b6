"""One conversion to JSON-ready values for what edgeinspect writes as JSON (manifests, the run registry)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def json_ready(value: Any) -> Any:
    """JSON-ready: numpy scalars and arrays to Python, NaN / infinity to None (JSON has neither; a metric
    that is undefined, e.g. precision without a single positive, is null), paths to strings."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [json_ready(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):  # numpy
        return json_ready(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
