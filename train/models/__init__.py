"""Model registry: one folder per model family."""

from __future__ import annotations

from edgeinspect.errors import ConfigError
from edgeinspect.train.models.base import AnomalyModel
from edgeinspect.train.models.padim import Padim
from edgeinspect.train.models.patchcore import PatchCore

MODELS: dict[str, type[AnomalyModel]] = {"patchcore": PatchCore, "padim": Padim}


def get_model_class(family: str) -> type[AnomalyModel]:
    """Model class of a family name; ConfigError listing the choices when unknown."""
    try:
        return MODELS[family]
    except KeyError:
        raise ConfigError(f"unknown model family {family!r}; choose one of {sorted(MODELS)}") from None


__all__ = ["MODELS", "AnomalyModel", "PatchCore", "Padim", "get_model_class"]
