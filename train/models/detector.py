"""What every supervised defect detector shares (SSD, Mask R-CNN): the contract between the family, the
detection trainer (``train/detection.py``) and the bundle (see DETECT.md / ARCHITECTURE.md).

A detector is NOT an :class:`~edgeinspect.train.models.base.AnomalyModel`: it is trained with gradient
descent on labelled boxes, ``forward`` returns its raw engine outputs (``output_names``), and ``detect`` is
the PyTorch reference of the detections (torchvision's own post-processing), which the runtime's decoder
(``decoder``) reproduces from the engine outputs without torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from edgeinspect.schema import Section
from edgeinspect.train.backbones import DEFAULT_BACKBONE, get_backbone_spec

# the category that is never a defect (``data coco --good-class``): its detections never make a verdict NOK
GOOD_CLASS = "good"


def normalised_fpn(in_channels: list[int], out_channels: int, extra_blocks: ExtraFPNBlock | None = None
                   ) -> FeaturePyramidNetwork:
    """torchvision's feature pyramid on backbone stages, with GroupNorm after its convolutions.

    The Lite stages' outputs (linear projections, no activation) are large and differ in scale between
    stages (plain FPN levels: mean |x| 13 at stride 4, 1 at stride 32). Without the norm, Mask R-CNN's
    first mask loss was ~25 with loss spikes at lr 1e-3, and SSD diverged in its second epoch on NEU-DET
    (loss 24 -> 144); normalised levels keep the heads' inputs at unit scale.
    """
    return FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra_blocks,
                                 norm_layer=lambda c: nn.GroupNorm(min(32, c // 4), c))


class DetectorModel(nn.Module):
    """Base class of the detector families: subclasses implement :meth:`loss`, :meth:`forward`,
    :meth:`detect`, :meth:`decoder_config` and the manifest fields."""

    family: str = ""
    task: str = "detections"
    # the family's ``model`` config section (declared beside it, in <family>/config.py)
    config_section: type[Section] = Section
    # submodules whose operations may run in FP16/INT8 engines
    low_precision_modules: tuple[str, ...] = ("backbone",)
    # float submodules whose constant-matrix MatMuls the ONNX INT8 engine runs in 8-bit (see AnomalyModel)
    dynamic_int8_modules: tuple[str, ...] = ()
    fit_is_statistics: bool = False
    # the runtime decoder of the engine outputs: "anchor_boxes" (SSD) | "final_detections" (Mask R-CNN)
    decoder: str = ""
    # engine outputs, in order (the manifest's "outputs" keys)
    output_names: tuple[str, ...] = ()
    # ONNX dynamic axes of the outputs ({name: {axis: label}}), e.g. a detection count decided inside the
    # engine (Mask R-CNN); None: every shape is fixed (SSD's raw heads)
    onnx_dynamic_axes: dict[str, dict[int, str]] | None = None

    def __init__(self, classes: list[str], input_size: tuple[int, int], *, pretrained: bool = True,
                 **model_config: Any):
        """``classes``: the dataset's categories in id order (label k = classes[k - 1]; 0 is background)."""
        super().__init__()
        self.classes = list(classes)
        self.input_size = tuple(int(s) for s in input_size)
        self.model_config = dict(model_config)
        self.pretrained = pretrained
        # per-epoch training curves (name -> values), written to history.json, the manifest and a plot
        self.history: dict[str, list[float]] = {}

    @property
    def num_classes(self) -> int:
        """Classes including the background (label 0)."""
        return len(self.classes) + 1

    @property
    def ok_classes(self) -> list[str]:
        """Classes whose detections are not defects (the ``good`` category when the dataset has one)."""
        return [c for c in self.classes if c == GOOD_CLASS]

    @classmethod
    def normalization(cls, model_config: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) the preprocessing normalises with: the backbone's (EfficientNet-Lite0's by default)."""
        spec = get_backbone_spec(model_config.get("backbone") or DEFAULT_BACKBONE)
        return spec.mean, spec.std

    def loss(self, x: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Loss terms (summed for the gradient) of normalised images N x 3 x H x W and their targets
        (``boxes`` K x 4 xyxy input pixels, ``labels`` K in 1..C; ``masks`` K x H x W for Mask R-CNN)."""
        raise NotImplementedError

    @property
    def features_frozen(self) -> bool:
        """Whether :meth:`frozen_features` never changes during training (the trainer may then cache it)."""
        return False

    def frozen_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of the part of the network that is not trained (default: the input itself)."""
        return [x]

    def loss_on_features(self, features: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
                         ) -> dict[str, torch.Tensor]:
        """:meth:`loss` from :meth:`frozen_features`' output (default: the input itself)."""
        return self.loss(features[0], targets)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Exactly the engine graph (eval mode): the outputs named by ``output_names``."""
        raise NotImplementedError

    def detect(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detections per image: ``boxes`` K x 4 xyxy input pixels, ``labels`` K (1..C), ``scores`` K (and
        ``masks`` K x H x W in [0, 1] for instance segmenters), by torchvision's own post-processing."""
        raise NotImplementedError

    def decoder_config(self) -> dict[str, Any]:
        """The manifest's ``detection`` section: what the runtime decoder needs besides the statistics."""
        raise NotImplementedError

    def statistics(self) -> dict[str, np.ndarray]:
        """Arrays the runtime decoder needs (stored under stats/; default: none)."""
        return {}

    def load_statistics(self, stats: dict[str, np.ndarray]) -> None:
        """Restore the arrays written by :meth:`statistics` (default: there are none)."""

    def hyperparameters(self) -> dict[str, Any]:
        """Everything needed (with the weights and statistics) to rebuild this model: the manifest's ``model``."""
        return {"classes": self.classes, "input_size": list(self.input_size), **self.model_config}

    def weights_source(self) -> str:
        """Where the pretrained weights came from, for the manifest."""
        raise NotImplementedError

    def tag(self) -> str:
        """Short name of the architecture, the middle part of the bundle id."""
        raise NotImplementedError
