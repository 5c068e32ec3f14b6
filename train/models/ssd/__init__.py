"""SSD: torchvision's SSD head and default boxes on pretrained EfficientNet-Lite stages (or SSD300 VGG16)."""

from edgeinspect.train.models.ssd.model import LiteSSDBackbone, SSDDetector

__all__ = ["LiteSSDBackbone", "SSDDetector"]
