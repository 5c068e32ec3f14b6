"""Model registry: one folder per model family."""

from __future__ import annotations

from edgeinspect.errors import ConfigError
from edgeinspect.schema import Section, detector_config, family_config
from edgeinspect.train.models.autoencoder import Autoencoder
from edgeinspect.train.models.base import AnomalyModel, BackboneAnomalyModel
from edgeinspect.train.models.cam import Cam
from edgeinspect.train.models.detector import DetectorModel
from edgeinspect.train.models.glass import GLASS
from edgeinspect.train.models.maskrcnn import MaskRCNN
from edgeinspect.train.models.padim import Padim
from edgeinspect.train.models.patchcore import PatchCore
from edgeinspect.train.models.ssd import SSDDetector

MODELS: dict[str, type[AnomalyModel] | type[DetectorModel]] = {
    "patchcore": PatchCore, "padim": Padim, "autoencoder": Autoencoder, "cam": Cam, "glass": GLASS,
    "ssd": SSDDetector, "maskrcnn": MaskRCNN}
# the whole configuration schema of a family, by the task it serves (detectors train for epochs on labelled
# boxes and decide on a confidence; anomaly models calibrate a threshold on held-out scores)
SCHEMAS_BY_TASK = {"anomaly_map": family_config, "detections": detector_config}


def get_model_class(family: str) -> type[AnomalyModel] | type[DetectorModel]:
    """Model class of a family name; ConfigError listing the choices when unknown."""
    try:
        return MODELS[family]
    except KeyError:
        raise ConfigError(f"unknown model family {family!r}; choose one of {sorted(MODELS)}") from None


def config_schema(family: str) -> type[Section]:
    """The whole configuration schema of a family: its own ``model`` section and the shared ones."""
    cls = get_model_class(family)
    return SCHEMAS_BY_TASK[cls.task](cls.config_section)


__all__ = ["MODELS", "SCHEMAS_BY_TASK", "AnomalyModel", "Autoencoder", "BackboneAnomalyModel", "Cam", "DetectorModel",
           "GLASS", "MaskRCNN", "PatchCore", "Padim", "SSDDetector", "config_schema", "get_model_class"]
