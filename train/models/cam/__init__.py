"""CAM: a supervised good/anomaly classifier whose class activation map gives the boxes."""

from edgeinspect.train.models.cam.model import Cam

__all__ = ["Cam"]
