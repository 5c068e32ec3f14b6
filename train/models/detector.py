"""What every supervised detector family shares (issue 7, DETECT.md section 2): the class attributes the
trainer, bundle writer, exporter and runtime dispatch on, and the methods each family implements.

A detector is not an :class:`AnomalyModel`: it is trained on labelled boxes (and masks) and its engine
outputs detections (or the raw head outputs a runtime decoder turns into detections).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeinspect.schema import Section
from edgeinspect.train.backbones import DEFAULT_BACKBONE, get_backbone_spec


class DetectorModel(nn.Module):
    """Base class of the detector families: subclasses implement :meth:`loss`, :meth:`forward` (the engine
    graph), :meth:`detect` (the torch reference), :meth:`decoder_config` and the manifest fields."""

    family: str = ""
    task: str = "detections"
    # The family's ``model`` config section (declared beside it, in <family>/config.py).
    config_section: type[Section] = Section
    # Submodules whose operations may run in FP16/INT8 engines.
    low_precision_modules: tuple[str, ...] = ("backbone",)
    fit_is_statistics: bool = False
    # The runtime decoder row: "anchor_boxes" (raw head outputs) | "final_detections" (the engine decodes).
    decoder: str = ""
    # Engine outputs, in order (the manifest's "outputs" keys).
    output_names: tuple[str, ...] = ()
    # Axes of the engine's inputs/outputs whose size is only known at run time (torch.onnx ``dynamic_axes``),
    # None = every shape fixed.
    onnx_dynamic_axes: dict[str, dict[int, str]] | None = None

    def __init__(self, classes: list[str], input_size: tuple[int, int]):
        super().__init__()
        self.classes = list(classes)
        self.input_size = tuple(input_size)
        # per-epoch training curves (name -> values), written to the manifest like the anomaly families'
        self.history: dict[str, list[float]] = {}

    @classmethod
    def normalization(cls, model_config: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) the preprocessing normalises images with: the backbone's (Lite0's by default)."""
        spec = get_backbone_spec(model_config.get("backbone", DEFAULT_BACKBONE))
        return spec.mean, spec.std

    def loss(self, x: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Training losses (name -> scalar) of images N x 3 x H x W and their targets."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Exactly the engine graph (eval mode): outputs in :attr:`output_names` order."""
        raise NotImplementedError

    def detect(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Torch reference detections per image (boxes K x 4 xyxy input px, labels K, scores K[, masks])."""
        raise NotImplementedError

    def decoder_config(self) -> dict:
        """The manifest's ``detection`` section (decoder, its parameters, classes, ok_classes)."""
        raise NotImplementedError

    def statistics(self) -> dict[str, np.ndarray]:
        """Arrays the runtime decoder needs (default: none)."""
        return {}

    def load_statistics(self, stats: dict[str, np.ndarray]) -> None:
        """Restore the arrays written by :meth:`statistics` (default: there are none)."""

    def hyperparameters(self) -> dict:
        """Everything needed (with the weights) to rebuild this model."""
        raise NotImplementedError

    def weights_source(self) -> str:
        """Where the initial weights came from, for the manifest."""
        raise NotImplementedError

    def tag(self) -> str:
        """Short name of the architecture, the middle part of the bundle id."""
        raise NotImplementedError
