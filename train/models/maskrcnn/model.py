"""Mask R-CNN (He et al. 2017) as torchvision builds it: RPN, RoIAlign box and mask heads on an FPN.

Two variants (``model.backbone``):

* ``efficientnet_lite0`` (default, offline): torchvision's ``MaskRCNN`` with a
  ``torchvision.ops.FeaturePyramidNetwork`` (+ max-pool level) on the stages of the ImageNet-pretrained
  EfficientNet-Lite from ``train/backbones.py``. The backbone's batch norms stay frozen (ImageNet
  statistics and affine parameters); its deepest ``trainable_backbone_stages`` stages' convolutions train
  with the FPN, RPN and RoI heads.
* ``resnet50``: torchvision's own ``maskrcnn_resnet50_fpn`` architecture (frozen batch norms,
  ``trainable_backbone_layers``) with COCO weights from torchvision's download or ``weights: PATH``
  (a COCO Mask R-CNN checkpoint, its class-specific predictors re-initialised, or ImageNet ResNet50 weights).

Inputs arrive resized to ``input_size`` and normalised by ``edgeinspect.preprocess.Preprocess``, so
torchvision's ``GeneralizedRCNNTransform`` neither resizes nor normalises here (:class:`InputAsIs`).
``forward`` is the whole detector (RPN, RoIAlign, NMS, mask pasting), the engine graph: one image in,
``(boxes K x 4, labels K, scores K, masks K x 1 x H x W)`` out with K known only at run time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from edgeinspect.errors import ConfigError
from edgeinspect.train.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FeatureExtractor,
    _load_state_dict,
    fetch_torchvision_weights,
)
from edgeinspect.train.models.detector import DetectorModel, normalised_fpn
from edgeinspect.train.models.maskrcnn.config import MaskRcnnSection

RESNET50_COCO = "torchvision MaskRCNN_ResNet50_FPN_Weights.COCO_V1"


class InputAsIs(GeneralizedRCNNTransform):
    """torchvision's detection transform without its resize and normalisation: images come in at the
    model's input size, already normalised (only the batching to a multiple of 32 and the rescaling of
    the outputs to the input size, an identity here, remain)."""

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """Identity: the preprocessing normalised the image."""
        return image

    def resize(self, image: torch.Tensor, target: dict | None = None) -> tuple[torch.Tensor, dict | None]:
        """Identity: the preprocessing resized the image."""
        return image, target


class LiteFPN(nn.Module):
    """EfficientNet-Lite stages + torchvision FPN (+ max-pool level): a torchvision detection backbone
    (``out_channels``, returns an ordered dict of pyramid levels "0", "1", ..., "pool")."""

    def __init__(self, backbone: str, stages: list[str], fpn_channels: int, trainable_stages: int, *,
                 pretrained: bool = True, weights: str | None = None):
        super().__init__()
        self.body = FeatureExtractor(backbone, stages, pretrained=pretrained, weights=weights)
        trunk = self.body.trunk
        last = max(int(s.removeprefix("stage")) for s in stages)
        first_block = trunk.stage_ends[last - trainable_stages - 1] + 1 if last - trainable_stages >= 1 else 0
        for block in trunk._blocks[first_block:] if trainable_stages else ():
            for module in block.modules():  # convolutions train; batch norms stay frozen
                if isinstance(module, nn.Conv2d):
                    module.requires_grad_(True)
        if trainable_stages > last:  # the stem too
            trunk._conv_stem.requires_grad_(True)
        self.fpn = normalised_fpn(self.body.channels(), fpn_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Images -> pyramid levels, finest first."""
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def _resnet50_fpn(trainable_layers: int) -> nn.Module:
    """torchvision's ResNet50-FPN detection backbone, exactly as ``maskrcnn_resnet50_fpn`` builds it."""
    from torchvision.models import resnet50
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    return _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), min(trainable_layers, 5))


def _load_resnet50_weights(detector: nn.Module, weights: str | None, pretrained: bool) -> None:
    """COCO Mask R-CNN (file or torchvision download) or ImageNet ResNet50 (file) weights; the
    class-specific predictors are kept freshly initialised when their class count differs."""
    if weights is not None:
        state = _load_state_dict(weights)
    elif pretrained:
        from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

        state = fetch_torchvision_weights(MaskRCNN_ResNet50_FPN_Weights.COCO_V1,
                                          "resnet50: torchvision's COCO Mask R-CNN weights", "--set model.weights=PATH")
    else:
        return
    if not any(k.startswith("backbone.") for k in state):  # an ImageNet ResNet50 classifier
        state = {f"backbone.body.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    own = detector.state_dict()
    state = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    missing = [k for k in own if k not in state and not k.startswith(("roi_heads.box_predictor",
                                                                       "roi_heads.mask_predictor.mask_fcn_logits"))]
    if not state or (weights is not None and any(k.startswith("backbone.body.") for k in missing)):
        raise ConfigError(f"resnet50: {weights} holds neither Mask R-CNN ResNet50-FPN nor ResNet50 weights "
                          f"({len(missing)} backbone tensors missing)")
    detector.load_state_dict(state, strict=False)


class MaskRCNN(DetectorModel):
    """torchvision Mask R-CNN on an FPN (see the module docstring); defects are classes 1..C."""

    family = "maskrcnn"
    config_section = MaskRcnnSection
    # the backbone + FPN: ONNX node names "/detector/backbone/..." (RPN, RoI heads and NMS stay float)
    low_precision_modules = ("detector/backbone",)
    decoder = "final_detections"
    output_names = ("boxes", "labels", "scores", "masks")
    onnx_dynamic_axes = {"boxes": {0: "detections"}, "labels": {0: "detections"}, "scores": {0: "detections"},
                         "masks": {0: "detections"}}

    def __init__(self, classes: list[str], input_size: tuple[int, int], *, backbone: str = "efficientnet_lite0",
                 weights: str | None = None, stages: list[str] = ("stage2", "stage3", "stage5", "stage7"),
                 trainable_backbone_stages: int = 2, fpn_channels: int = 128,
                 anchor_sizes: list[int] = (16, 32, 64, 128, 256), aspect_ratios: list[float] = (0.5, 1.0, 2.0),
                 rpn_pre_nms_top_n_train: int = 500, rpn_pre_nms_top_n_test: int = 500,
                 rpn_post_nms_top_n_train: int = 300, rpn_post_nms_top_n_test: int = 300,
                 box_batch_size_per_image: int = 64, score_thresh: float = 0.05, nms_thresh: float = 0.5,
                 detections_per_img: int = 20, seed: int = 0, pretrained: bool = True):
        super().__init__(classes, input_size)
        torch.manual_seed(seed)
        self.config = {"backbone": backbone, "weights": weights, "stages": list(stages),
                       "trainable_backbone_stages": trainable_backbone_stages, "fpn_channels": fpn_channels,
                       "anchor_sizes": list(anchor_sizes), "aspect_ratios": list(aspect_ratios),
                       "rpn_pre_nms_top_n_train": rpn_pre_nms_top_n_train,
                       "rpn_pre_nms_top_n_test": rpn_pre_nms_top_n_test,
                       "rpn_post_nms_top_n_train": rpn_post_nms_top_n_train,
                       "rpn_post_nms_top_n_test": rpn_post_nms_top_n_test,
                       "box_batch_size_per_image": box_batch_size_per_image, "score_thresh": score_thresh,
                       "nms_thresh": nms_thresh, "detections_per_img": detections_per_img, "seed": seed}
        MaskRcnnSection.model_validate(self.config)
        if backbone == "resnet50":
            body = _resnet50_fpn(trainable_backbone_stages)
            levels = ["0", "1", "2", "3"]
        else:
            body = LiteFPN(backbone, list(stages), fpn_channels, trainable_backbone_stages,
                           pretrained=pretrained, weights=weights)
            levels = [str(i) for i in range(len(stages))]
        side = min(self.input_size)
        self.detector = TorchvisionMaskRCNN(
            body, num_classes=len(self.classes) + 1, min_size=side, max_size=max(self.input_size),
            image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
            rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in anchor_sizes),
                                                 (tuple(aspect_ratios),) * len(anchor_sizes)),
            rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=rpn_post_nms_top_n_train, rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
            # RoIs map to pyramid levels by their size relative to the input (torchvision: 224 px -> level 4
            # for 800-1333 px inputs), scaled to this input so that levels are used as at torchvision's scale
            box_roi_pool=MultiScaleRoIAlign(levels, 7, 2, canonical_scale=max(16, round(224 * side / 800))),
            mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2, canonical_scale=max(16, round(224 * side / 800))),
            box_batch_size_per_image=box_batch_size_per_image, box_score_thresh=score_thresh,
            box_nms_thresh=nms_thresh, box_detections_per_img=detections_per_img)
        # a small mask-logits init (std 0.01; Detectron: 0.001) so that the first mask loss is ~0.7 (log 2):
        # torchvision's Kaiming init gives ~3 on these (normalised) levels, which training first has to undo
        logits = self.detector.roi_heads.mask_predictor.mask_fcn_logits
        nn.init.normal_(logits.weight, std=0.01)
        nn.init.zeros_(logits.bias)
        t = self.detector.transform
        self.detector.transform = InputAsIs(t.min_size, t.max_size, t.image_mean, t.image_std)
        if backbone == "resnet50":
            _load_resnet50_weights(self.detector, weights, pretrained)
        self.weights = weights

    @classmethod
    def normalization(cls, model_config: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """ImageNet's mean/std for ResNet50 (torchvision's detection transform uses them), else the
        EfficientNet-Lite backbone's."""
        if model_config.get("backbone") == "resnet50":
            return IMAGENET_MEAN, IMAGENET_STD
        return super().normalization(model_config)

    @contextmanager
    def _mode(self, training: bool) -> Iterator[None]:
        """Run the torchvision detector in train (losses) or eval (detections) mode, then restore."""
        before = self.detector.training
        self.detector.train(training)
        try:
            yield
        finally:
            self.detector.train(before)

    def loss(self, x: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """torchvision's loss dict (classifier, box_reg, mask, objectness, rpn_box_reg) of images
        N x 3 x H x W and targets with boxes K x 4 (xyxy input px), labels K (1..C), masks K x H x W."""
        for t in targets:
            if t.get("masks") is None:
                raise ValueError("Mask R-CNN trains on instance masks; this dataset has boxes only (use SSD)")
        targets = [{"boxes": t["boxes"].float(), "labels": t["labels"].long(), "masks": t["masks"].to(torch.uint8)}
                   for t in targets]
        with self._mode(True):
            return self.detector(list(x), targets)

    @torch.no_grad()
    def detect(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """torchvision's own detections per image: boxes, labels, scores, masks K x H x W in [0, 1]."""
        with self._mode(False):
            out = self.detector(list(x))
        return [{"boxes": d["boxes"], "labels": d["labels"], "scores": d["scores"], "masks": d["masks"][:, 0]}
                for d in out]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The engine graph, one image 1 x 3 x H x W -> (boxes K x 4, labels K, scores K, masks K x 1 x H x W)."""
        with self._mode(False):
            d = self.detector(list(x[:1]))[0]
        return d["boxes"], d["labels"], d["scores"], d["masks"]

    def decoder_config(self) -> dict:
        """The manifest's ``detection`` section: the engine's detections are final."""
        return {"decoder": self.decoder, "score_thresh": self.config["score_thresh"],
                "nms_thresh": self.config["nms_thresh"], "detections_per_img": self.config["detections_per_img"],
                "mask_threshold": 0.5, "classes": list(self.classes),
                "ok_classes": self.ok_classes}

    def hyperparameters(self) -> dict:
        """The classes, input size and ``model`` section: with the weights, all that rebuilds the model."""
        return {"classes": list(self.classes), "input_size": list(self.input_size), **self.config}

    def weights_source(self) -> str:
        """The weights file given, else the backbone's own source."""
        if self.weights:
            return self.weights
        if self.config["backbone"] == "resnet50":
            return RESNET50_COCO
        return self.detector.backbone.body.spec.weights_source

    def tag(self) -> str:
        """The backbone's name."""
        return self.config["backbone"]
