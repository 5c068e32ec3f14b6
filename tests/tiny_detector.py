"""A small torchvision SSD standing in for a detector family, and a detector bundle built from it.

``TinySSD`` follows the DetectorModel contract (DETECT.md section 2): ``forward`` is the engine graph
(SSD's raw heads), ``detect`` is torchvision's own post-processing, ``statistics`` holds the anchors.
:func:`write_detector_bundle` writes a bundle with the contract's manifest by hand (``Bundle``,
``add_array``) on a COCO folder, ready for ``export_bundle`` (with ``TinySSD`` registered).
"""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD, SSDHead

from edgeinspect import __version__
from edgeinspect.bundle import Bundle
from edgeinspect.preprocess import Preprocess
from edgeinspect.train.data.coco import CocoSplit

FAMILY = "tinyssd"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DETECTION = {"score_thresh": 0.01, "nms_thresh": 0.45, "topk_candidates": 400, "detections_per_img": 200}


class _Backbone(nn.Module):
    """Two feature maps (strides 4 and 8) for the SSD head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        a = self.stem(x)
        return OrderedDict([("0", a), ("1", self.down(a))])


class TinySSD(nn.Module):
    """A DetectorModel-like SSD on a two-stage conv backbone (random weights, seeded)."""

    family = FAMILY
    task = "detections"
    decoder = "anchor_boxes"
    output_names = ("bbox_regression", "cls_logits")
    low_precision_modules = ("backbone",)
    dynamic_int8_modules = ()
    fit_is_statistics = False

    def __init__(self, classes: list[str], input_size: tuple[int, int], *, pretrained: bool = True,
                 seed: int = 0, ok_classes: list[str] | None = None, **_: object):
        super().__init__()
        torch.manual_seed(seed)
        self.classes, self.input_size, self.seed = list(classes), tuple(input_size), seed
        self.ok_classes = list(ok_classes or [])
        self.backbone = _Backbone()
        generator = DefaultBoxGenerator([[2], [2, 3]])
        self.head = SSDHead([16, 32], generator.num_anchors_per_location(), len(classes) + 1)
        for p in self.head.parameters():  # spread the random confidences a little
            nn.init.normal_(p, std=0.3)
        # torchvision's own SSD around the same modules, for ``detect`` (not a registered submodule)
        self.__dict__["ssd"] = SSD(self.backbone, generator, tuple(input_size), len(classes) + 1, head=self.head,
                                   image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0], **DETECTION)
        self.register_buffer("anchors", self.make_anchors(), persistent=False)

    def make_anchors(self) -> torch.Tensor:
        """A x 4 xyxy anchors in input pixels (torchvision's DefaultBoxGenerator)."""
        x = torch.zeros(1, 3, *self.input_size)
        with torch.no_grad():
            features = list(self.backbone(x).values())
        return self.ssd.anchor_generator(ImageList(x, [self.input_size]), features)[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The engine graph: raw head outputs."""
        out = self.head(list(self.backbone(x).values()))
        return out["bbox_regression"], out["cls_logits"]

    def detect(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """torchvision's own post-processing of the raw heads."""
        regression, logits = self.forward(x)
        return self.ssd.postprocess_detections({"bbox_regression": regression, "cls_logits": logits},
                                               [self.anchors] * len(x), [self.input_size] * len(x))

    def decoder_config(self) -> dict:
        """The manifest's ``detection`` entry."""
        return {"decoder": self.decoder, "anchors": "anchors", "box_coder_weights": [10.0, 10.0, 5.0, 5.0],
                **DETECTION, "classes": self.classes, "ok_classes": self.ok_classes}

    def statistics(self) -> dict[str, np.ndarray]:
        """The anchors the decoder needs."""
        return {"anchors": self.anchors.numpy()}

    def load_statistics(self, stats: dict[str, np.ndarray]) -> None:
        """Anchors are recomputed from the architecture; the stored ones must match."""
        if not np.allclose(stats["anchors"], self.anchors.numpy()):
            raise ValueError("stored anchors differ from the architecture's")

    def hyperparameters(self) -> dict:
        """What rebuilds this model (with ``family``)."""
        return {"classes": self.classes, "input_size": list(self.input_size), "seed": self.seed,
                "ok_classes": self.ok_classes}


def write_detector_bundle(out: Path, coco: Path, classes: list[str], input_size: tuple[int, int] = (64, 64),
                          ok_classes: list[str] | None = None, conf: float | None = None) -> Path:
    """A detector bundle of :class:`TinySSD` with the contract's manifest, no engine yet.

    ``conf`` None: halfway between the two middle values of the highest defect confidence over the val
    images, so the verdicts split between OK and NOK and no image sits on the threshold.
    """
    model = TinySSD(classes, input_size, ok_classes=ok_classes).eval()
    pre = Preprocess(resize=input_size, crop=None, mean=MEAN, std=STD, interpolation="area")
    if conf is None:
        val = CocoSplit(coco, "val")
        with torch.no_grad():
            dets = model.detect(torch.from_numpy(pre.batch([val.load(i)[0] for i in range(len(val))])))
        ok = [classes.index(c) + 1 for c in ok_classes or []]
        defect = [d["scores"][~torch.isin(d["labels"], torch.tensor(ok, dtype=torch.int64))] for d in dets]
        highest = sorted(float(s.max()) if len(s) else 0.0 for s in defect)
        conf = (highest[len(highest) // 2 - 1] + highest[len(highest) // 2]) / 2  # between two images
    out.mkdir(parents=True)
    buf = io.BytesIO()
    np.savez(buf, **{k: v.numpy() for k, v in model.state_dict().items()})
    h, w = input_size
    manifest = {
        "schema_version": 1, "bundle_id": "", "task": "detections", "edgeinspect_version": __version__,
        "model": {"family": FAMILY, **model.hyperparameters()},
        "preprocess": pre.to_dict(),
        "input": {"name": "image", "shape": [1, 3, h, w], "dtype": "float32"},
        "outputs": {"bbox_regression": [1, len(model.anchors), 4],
                    "cls_logits": [1, len(model.anchors), len(classes) + 1]},
        "detection": model.decoder_config(),
        "decision": {"threshold": conf, "normalization": {"method": "threshold_centered", "center": conf,
                                                          "scale": conf},
                     "calibration": {"source": "confidence threshold"}, "min_region_area": 0},
        "data": {"root": str(coco), "format": "coco"},
        "config": {"decision": {"conf": conf}}, "files": {}, "engines": []}
    bundle = Bundle(out, manifest)
    bundle.add_file("weights", "weights.npz", buf.getvalue())
    for key, array in model.statistics().items():
        bundle.add_array(key, array)
    digest = hashlib.sha256(bundle.manifest["files"]["weights"]["sha256"].encode()).hexdigest()[:12]
    bundle.manifest["bundle_id"] = f"{FAMILY}-tiny-{digest}"
    bundle.save()
    return out
