"""SSD's ``model`` section (configs/ssd.yaml documents every key)."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from edgeinspect.schema import integer, real
from edgeinspect.train.backbones import get_backbone_spec
from edgeinspect.train.models.config import WeightsSection

# the backbones SSD is built on: the EfficientNet-Lite trunks (stages + extra layers) or torchvision's SSD300
SSD_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "vgg16")


class SsdSection(WeightsSection):
    """``model`` keys of SSD."""

    backbone: Literal[SSD_BACKBONES]
    weights: str | None = None
    stages: list[str]
    train_backbone_stages: integer(0, 7)
    neck: Literal["conv", "fpn"] = "conv"
    neck_channels: integer(0, 4096)
    extra_channels: list[integer(8, 4096)]
    aspect_ratios: list[list[real(1.0, 10.0)]]
    min_ratio: real(0.0, 1.0, lo_open=True)
    max_ratio: real(0.0, 2.0, lo_open=True)
    iou_thresh: real(0.0, 1.0, lo_open=True)
    positive_fraction: real(0.0, 1.0, lo_open=True, hi_open=True)
    score_thresh: real(0.0, 1.0)
    nms_thresh: real(0.0, 1.0)
    topk_candidates: integer(1, 100_000)
    detections_per_img: integer(1, 100_000)
    seed: integer(0, 2**32 - 1)

    @model_validator(mode="after")
    def _layout(self) -> SsdSection:
        if self.max_ratio <= self.min_ratio:
            raise ValueError(f"max_ratio ({self.max_ratio}) must exceed min_ratio ({self.min_ratio})")
        if self.backbone == "vgg16":
            if len(self.aspect_ratios) != 6:
                raise ValueError(f"aspect_ratios: vgg16 (torchvision's SSD300) has 6 feature maps, "
                                 f"got {len(self.aspect_ratios)} lists")
            return self
        have = list(get_backbone_spec(self.backbone).stages)
        unknown = [s for s in self.stages if s not in have]
        if not self.stages or unknown or self.stages != sorted(set(self.stages), key=have.index):
            raise ValueError(f"stages: {self.stages} is not a non-empty list of distinct stages of {self.backbone} "
                             f"in network order ({', '.join(have)})")
        maps = len(self.stages) + len(self.extra_channels)
        if len(self.aspect_ratios) != maps:
            raise ValueError(f"aspect_ratios: one list per feature map ({len(self.stages)} stages + "
                             f"{len(self.extra_channels)} extra layers = {maps}), got {len(self.aspect_ratios)}")
        return self
