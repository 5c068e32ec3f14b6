"""SSD: torchvision's ``SSD`` (``SSDHead``, ``DefaultBoxGenerator``, its matcher, loss and post-processing)
on the pretrained EfficientNet-Lite stages plus extra layers for the coarse scales (the offline default), or
torchvision's real ``ssd300_vgg16`` (``backbone: vgg16``, weights from a file or torchvision's download).

The engine is the network up to the raw head outputs (``bbox_regression`` N x A x 4 box deltas,
``cls_logits`` N x A x (C+1)); box decoding against the anchors (``stats/anchors.npy``), softmax, top-k and
per-class NMS run in the runtime (numpy), checked against :meth:`SSD.postprocess_detections` (``detect``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops import boxes as box_ops

from edgeinspect.errors import ConfigError
from edgeinspect.train.backbones import FeatureExtractor, _load_state_dict, fetch_torchvision_weights
from edgeinspect.train.models.detector import DetectorModel, normalised_fpn
from edgeinspect.train.models.ssd.config import SsdSection

# torchvision's SSD300: input normalisation (0..255 pixels minus the mean), default boxes
VGG_MEAN = (0.48235, 0.45882, 0.40784)
VGG_STD = (1.0 / 255.0,) * 3
VGG_SCALES = [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]
VGG_STEPS = [8, 16, 32, 64, 100, 300]
VGG_SIZE = (300, 300)


class LiteSSDBackbone(nn.Module):
    """EfficientNet-Lite stages (frozen batch-norm statistics, the upper ``train_stages`` stages trainable)
    followed by extra layers like SSD300's (1x1 reduce, 3x3 stride 2 conv, ReLU) down to a 1 x 1 map."""

    def __init__(self, backbone: str, stages: list[str], extra_channels: list[int], train_stages: int,
                 neck: str, neck_channels: int, input_size: tuple[int, int], *, pretrained: bool,
                 weights: str | None):
        super().__init__()
        self.extractor = FeatureExtractor(backbone, stages, pretrained=pretrained, weights=weights)
        trunk = self.extractor.trunk
        last = max(int(s.removeprefix("stage")) for s in stages)
        first_block = trunk.stage_ends[last - train_stages - 1] + 1 if last - train_stages >= 1 else 0
        for block in trunk._blocks[first_block:] if train_stages else []:
            block.requires_grad_(True)  # batch-norm statistics stay ImageNet's: the extractor stays in eval mode
        with torch.no_grad():
            feature = self.extractor(torch.zeros(1, 3, *input_size))[-1]
        cin, size = feature.shape[1], tuple(feature.shape[-2:])
        # the neck on the stage maps: "conv", one trainable 3x3 conv + ReLU on each (the heads' only non-linear
        # layer on frozen stages); "fpn", torchvision's feature pyramid (1x1 laterals, top-down sum of the
        # upsampled coarser map, 3x3 output conv, GroupNorm; normalised_fpn): the fine maps also see the deep
        # stages' features. None with neck_channels 0.
        channels = self.extractor.channels()
        self.neck: nn.Module | None = None
        if neck_channels and neck == "fpn":
            self.neck = normalised_fpn(channels, neck_channels)
        elif neck_channels:
            self.neck = nn.ModuleList(nn.Sequential(nn.Conv2d(c, neck_channels, 3, padding=1), nn.ReLU(inplace=True))
                                      for c in channels)
        self.out_channels = [neck_channels] * len(stages) if neck_channels else [*channels]
        extras = []
        for cout in extra_channels:
            # 3x3 stride 2 while the map is larger than 3 x 3, then one conv over the whole map (-> 1 x 1)
            kernel, stride, pad = ((3, 3), 2, 1) if min(size) > 3 else (size, 1, 0)
            extras.append(nn.Sequential(nn.Conv2d(cin, cout // 2, 1), nn.ReLU(inplace=True),
                                        nn.Conv2d(cout // 2, cout, kernel, stride, pad), nn.ReLU(inplace=True)))
            size = tuple((s + 2 * pad - k) // stride + 1 for s, k in zip(size, kernel, strict=True))
            cin = cout
            self.out_channels.append(cout)
        self.extras = nn.ModuleList(extras)
        for layer in [*self.extras.modules(), *(self.neck.modules() if self.neck is not None else [])]:
            if isinstance(layer, nn.Conv2d):
                nn.init.xavier_uniform_(layer.weight)
                if layer.bias is not None:  # none before a norm (the FPN's)
                    nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Feature maps, finest first: the stages (through the neck), then the extra layers."""
        return self.tail(self.extractor(x))

    def tail(self, stages: list[torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """The feature maps from the stage outputs: the neck, the extra layers on the last stage."""
        if isinstance(self.neck, FeaturePyramidNetwork):
            features = list(self.neck(OrderedDict((str(i), f) for i, f in enumerate(stages))).values())
        elif self.neck is not None:
            features = [neck(f) for neck, f in zip(self.neck, stages, strict=True)]
        else:
            features = list(stages)
        y = stages[-1]
        for extra in self.extras:
            y = extra(y)
            features.append(y)
        return OrderedDict((str(i), f) for i, f in enumerate(features))


def _vgg_backbone(weights: str | None, pretrained: bool, trainable_layers: int) -> tuple[nn.Module, dict | None]:
    """torchvision's SSD300 VGG16 feature extractor and, when ``weights`` is a whole SSD300 checkpoint, its
    state dict (loaded after the model is built)."""
    import torchvision
    from torchvision.models.detection.ssd import _vgg_extractor

    vgg = torchvision.models.vgg16(weights=None)
    detector_state = None
    if weights is not None:
        state = _load_state_dict(weights)
        if any(k.startswith("backbone.") for k in state):
            detector_state = state  # e.g. ssd300_vgg16_coco-b556d3b4.pth
        else:
            vgg.load_state_dict(state)
    elif pretrained:
        vgg.load_state_dict(fetch_torchvision_weights(torchvision.models.VGG16_Weights.IMAGENET1K_FEATURES,
                                                      "vgg16: torchvision's ImageNet weights",
                                                      "--weights PATH (or an SSD300 COCO checkpoint)"))
    return _vgg_extractor(vgg, False, trainable_layers), detector_state


class SSDDetector(DetectorModel):
    """torchvision's SSD without its resize/normalise transform (inputs come normalised at their size)."""

    family = "ssd"
    config_section = SsdSection
    decoder = "anchor_boxes"
    output_names = ("bbox_regression", "cls_logits")
    # the Lite trunk runs in FP16/INT8 engines; its traced ONNX nodes are named /extractor/... (called
    # directly by frozen_features), the heads and extra layers stay float
    low_precision_modules = ("extractor",)

    def __init__(self, classes: list[str], input_size: tuple[int, int], *, pretrained: bool = True,
                 backbone: str, weights: str | None, stages: list[str], train_backbone_stages: int,
                 neck: str = "conv", neck_channels: int, extra_channels: list[int],
                 aspect_ratios: list[list[float]], min_ratio: float, max_ratio: float, iou_thresh: float,
                 positive_fraction: float, score_thresh: float, nms_thresh: float, topk_candidates: int,
                 detections_per_img: int, seed: int = 0):
        super().__init__(classes, input_size, pretrained=pretrained, backbone=backbone, weights=weights,
                         stages=stages, train_backbone_stages=train_backbone_stages, neck=neck,
                         neck_channels=neck_channels, extra_channels=extra_channels, aspect_ratios=aspect_ratios,
                         min_ratio=min_ratio, max_ratio=max_ratio,
                         iou_thresh=iou_thresh, positive_fraction=positive_fraction, score_thresh=score_thresh,
                         nms_thresh=nms_thresh, topk_candidates=topk_candidates,
                         detections_per_img=detections_per_img, seed=seed)
        torch.manual_seed(seed)  # the new layers' initial weights
        ratios = [[float(r) for r in rs] for rs in aspect_ratios]
        detector_state = None
        if backbone == "vgg16":
            if self.input_size != VGG_SIZE:
                raise ConfigError(f"vgg16 is torchvision's SSD300: preprocess.input_size must be [300, 300], "
                                  f"got {list(self.input_size)}")
            net, detector_state = _vgg_backbone(weights, pretrained, min(train_backbone_stages, 5))
            anchors = DefaultBoxGenerator(ratios, scales=VGG_SCALES, steps=VGG_STEPS)
        else:
            net = LiteSSDBackbone(backbone, stages, extra_channels, train_backbone_stages, neck, neck_channels,
                                  self.input_size, pretrained=pretrained, weights=weights)
            anchors = DefaultBoxGenerator(ratios, min_ratio=min_ratio, max_ratio=max_ratio)
        self.ssd = SSD(net, anchors, self.input_size, self.num_classes, image_mean=[0.0] * 3, image_std=[1.0] * 3,
                       score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                       iou_thresh=iou_thresh, topk_candidates=topk_candidates, positive_fraction=positive_fraction)
        if detector_state is not None:  # an SSD300 checkpoint: everything but the class scores (other classes)
            own = self.ssd.state_dict()
            keep = {k: v for k, v in detector_state.items() if k in own and v.shape == own[k].shape}
            self.ssd.load_state_dict(keep, strict=False)
        with torch.no_grad():
            x = torch.zeros(1, 3, *self.input_size)
            features = list(self.ssd.backbone(x).values())
            default_boxes = anchors(ImageList(x, [self.input_size]), features)[0]
        self.register_buffer("anchors", default_boxes, persistent=False)  # in stats/, not in the weights

    @classmethod
    def normalization(cls, model_config: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """torchvision SSD300's for vgg16 (0..255 pixels minus the mean), else the backbone's."""
        if model_config.get("backbone") == "vgg16":
            return VGG_MEAN, VGG_STD
        return super().normalization(model_config)

    @property
    def _lite(self) -> bool:
        return isinstance(self.ssd.backbone, LiteSSDBackbone)

    @property
    def features_frozen(self) -> bool:
        """Whether the whole Lite trunk is frozen (``train_backbone_stages: 0``): its stage outputs can be cached."""
        return self._lite and self.model_config["train_backbone_stages"] == 0

    def frozen_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The Lite stage outputs (vgg16: the input itself)."""
        return self.ssd.backbone.extractor(x) if self._lite else [x]

    def _heads(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        maps = self.ssd.backbone.tail(features) if self._lite else self.ssd.backbone(features[0])
        return self.ssd.head(list(maps.values()))

    def loss(self, x: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """torchvision's SSD loss (smooth L1 on matched boxes, cross-entropy with 3:1 hard negative mining)."""
        return self.loss_on_features(self.frozen_features(x), targets)

    def loss_on_features(self, features: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
                         ) -> dict[str, torch.Tensor]:
        """:meth:`loss` from :meth:`frozen_features`' output."""
        heads = self._heads(features)
        anchors = [self.anchors] * len(targets)
        matched = []
        for t in targets:
            if t["boxes"].numel() == 0:
                matched.append(torch.full((self.anchors.shape[0],), -1, dtype=torch.int64, device=self.anchors.device))
            else:
                matched.append(self.ssd.proposal_matcher(box_ops.box_iou(t["boxes"], self.anchors)))
        return self.ssd.compute_loss(targets, heads, anchors, matched)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw head outputs: box deltas N x A x 4 and class logits N x A x (C+1)."""
        heads = self._heads(self.frozen_features(x))
        return heads["bbox_regression"], heads["cls_logits"]

    @torch.no_grad()
    def detect(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """torchvision's :meth:`SSD.postprocess_detections` on :meth:`forward`'s outputs and the anchors."""
        bbox_regression, cls_logits = self.forward(x)
        n = x.shape[0]
        return self.ssd.postprocess_detections({"bbox_regression": bbox_regression, "cls_logits": cls_logits},
                                               [self.anchors] * n, [self.input_size] * n)

    def decoder_config(self) -> dict[str, Any]:
        """The ``anchor_boxes`` decoder: anchors, box coder weights, thresholds, top-k, classes."""
        return {"decoder": self.decoder, "anchors": "anchors", "box_coder_weights": list(self.ssd.box_coder.weights),
                "score_thresh": self.ssd.score_thresh, "nms_thresh": self.ssd.nms_thresh,
                "topk_candidates": self.ssd.topk_candidates, "detections_per_img": self.ssd.detections_per_img,
                "classes": self.classes, "ok_classes": self.ok_classes}

    def statistics(self) -> dict[str, np.ndarray]:
        """The default boxes, A x 4 xyxy input pixels (what the runtime decodes the box deltas against)."""
        return {"anchors": self.anchors.detach().cpu().numpy().astype(np.float32)}

    def load_statistics(self, stats: dict[str, np.ndarray]) -> None:
        """Restore the default boxes (they are recomputed at build time; a bundle's must agree)."""
        anchors = torch.from_numpy(np.asarray(stats["anchors"], np.float32)).to(self.anchors.device)
        if anchors.shape != self.anchors.shape:
            raise ConfigError(f"anchors of shape {tuple(anchors.shape)} do not fit this SSD "
                              f"({tuple(self.anchors.shape)})")
        self.anchors = anchors

    def weights_source(self) -> str:
        """The weights file given, else the backbone's own source."""
        if self.model_config["weights"]:
            return self.model_config["weights"]
        if self.model_config["backbone"] == "vgg16":
            return "torchvision VGG16_Weights.IMAGENET1K_FEATURES"
        return self.ssd.backbone.extractor.spec.weights_source

    def tag(self) -> str:
        """The backbone's name."""
        return self.model_config["backbone"]


__all__ = ["LiteSSDBackbone", "SSDDetector"]
