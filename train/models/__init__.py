"""Model registry: one folder per model family."""

from __future__ import annotations

from edgeinspect.errors import ConfigError
from edgeinspect.schema import Section, family_config
from edgeinspect.train.models.autoencoder import Autoencoder
from edgeinspect.train.models.base import AnomalyModel, BackboneAnomalyModel
from edgeinspect.train.models.cam import Cam
from edgeinspect.train.models.glass import GLASS
from edgeinspect.train.models.maskrcnn import MaskRCNN
from edgeinspect.train.models.padim import Padim
from edgeinspect.train.models.patchcore import PatchCore

MODELS: dict[str, type[AnomalyModel]] = {"patchcore": PatchCore, "padim": Padim, "autoencoder": Autoencoder,
                                         "cam": Cam, "glass": GLASS}


def get_model_class(family: str) -> type[AnomalyModel]:
    """Model class of a family name; ConfigError listing the choices when unknown."""
    try:
        return MODELS[family]
    except KeyError:
        raise ConfigError(f"unknown model family {family!r}; choose one of {sorted(MODELS)}") from None


def config_schema(family: str) -> type[Section]:
    """The whole configuration schema of a family: its own ``model`` section and the shared ones."""
    return family_config(get_model_class(family).config_section)


__all__ = ["MODELS", "AnomalyModel", "Autoencoder", "BackboneAnomalyModel", "Cam", "GLASS", "MaskRCNN", "PatchCore",
           "Padim", "config_schema", "get_model_class"]
