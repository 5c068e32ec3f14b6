"""Mask R-CNN: torchvision's instance segmenter with an FPN on pretrained EfficientNet-Lite stages (offline
default) or torchvision's maskrcnn_resnet50_fpn."""

from edgeinspect.train.models.maskrcnn.model import MaskRCNN

__all__ = ["MaskRCNN"]
