"""From raw engine outputs to a verdict: normalised score, OK/NOK, defect regions.

One post-processing per task (:data:`TASKS`, keyed by ``manifest.get("task", "anomaly_map")``):
anomaly maps become regions above the threshold; detector outputs go through their decoder
(:mod:`edgeinspect.runtime.detections`) and every detection at or above the confidence threshold
becomes a region with its class name (and its mask's outline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np

from edgeinspect.bundle import Bundle
from edgeinspect.errors import BundleError, EngineError
from edgeinspect.preprocess import Preprocess
from edgeinspect.runtime.detections import MASK_THRESHOLD, Detections, make_decoder, mask_polygon

ANOMALY = "anomaly"  # the label of an anomaly map's regions


@dataclass(frozen=True)
class Region:
    """A connected region of the anomaly map above the threshold, or a detection at or above the
    confidence threshold."""

    box: tuple[int, int, int, int]   # x0, y0, x1, y1 in frame pixels (x1/y1 exclusive for map regions)
    area: int                        # pixels of the model input (a detection: its mask's, else its box's)
    score: float                     # normalised peak score inside the region; a detection: its confidence
    label: str = ANOMALY             # class name of a detection
    polygon: tuple[tuple[int, int], ...] | None = None  # outline in frame pixels (instance masks only)

    def to_dict(self) -> dict:
        """JSON-ready form (``polygon`` only when there is one)."""
        d = {"box": list(self.box), "area": self.area, "score": round(self.score, 6), "label": self.label}
        return d if self.polygon is None else {**d, "polygon": [list(p) for p in self.polygon]}


def normalize(raw: np.ndarray | float, normalization: dict) -> np.ndarray | float:
    """Map raw scores so that the threshold is 0.5 (see trainer.decide); clipped to [0, 1]."""
    center, scale = normalization["center"], normalization["scale"]
    return np.clip(0.5 + 0.5 * (np.asarray(raw, np.float64) - center) / scale, 0.0, 1.0)


def map_regions(anomaly_map: np.ndarray, threshold: float, min_area: int
                ) -> list[tuple[tuple[int, int, int, int], int, float]]:
    """``(box, area, peak)`` of each 8-connected region of ``anomaly_map > threshold`` with at least
    ``min_area`` pixels, in map pixels (box ``x0, y0, x1, y1``, x1/y1 exclusive; peak in map units), largest
    first.

    The one place a map becomes boxes: the runtime's regions and the evaluation's box IoU both use it.
    Only the bounding window of the pixels above the threshold is labelled (the same components, a
    fraction of the work where a defect covers part of the map).
    """
    above = anomaly_map > threshold
    rows, cols = np.flatnonzero(above.any(axis=1)), np.flatnonzero(above.any(axis=0))
    if rows.size == 0:  # nothing above the threshold (a good part; also a NaN map or threshold): no labelling
        return []
    top, left = int(rows[0]), int(cols[0])
    window = np.s_[top:int(rows[-1]) + 1, left:int(cols[-1]) + 1]
    n, labels, stats, _ = cv2.connectedComponentsWithStats(above[window].view(np.uint8), connectivity=8)
    scores = anomaly_map[window]
    regions = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area < min_area:
            continue
        peak = float(scores[y:y + h, x:x + w][labels[y:y + h, x:x + w] == i].max())
        regions.append(((left + x, top + y, left + x + w, top + y + h), area, peak))
    return sorted(regions, key=lambda r: r[1], reverse=True)


def find_regions(anomaly_map: np.ndarray, threshold: float, min_area: int, normalization: dict,
                 preprocess: Preprocess, frame_hw: tuple[int, int]) -> list[Region]:
    """Boxes of the 8-connected regions of ``anomaly_map > threshold``, in frame pixels, largest first."""
    return [Region(preprocess.box_to_frame(box, frame_hw), area, float(normalize(peak, normalization)))
            for box, area, peak in map_regions(anomaly_map, threshold, min_area)]


def require_finite(what: str, values: np.ndarray | float) -> None:
    """EngineError when an engine output holds NaN or infinity (an FP16 engine that overflowed, a broken
    engine): such a frame cannot be judged, so it gets an ERROR verdict instead of a meaningless one."""
    if not np.isfinite(values).all():
        raise EngineError(f"the engine returned a non-finite {what} (NaN or infinity); the frame cannot be "
                          f"judged: check the engine (an FP16 engine that overflows? try its FP32 engine)")


# ------------------------------------------------------------------------------ one per task
@dataclass
class Outcome:
    """What a task's post-processing makes of one image's engine outputs."""

    nok: bool
    raw_score: float                          # anomaly score, or the highest defect confidence
    regions: list[Region]
    anomaly_map: np.ndarray | None            # raw map in model-input geometry (anomaly maps only)
    detections: Detections | None = None      # every decoded detection (detectors only)


class Postprocess(Protocol):
    """Engine outputs (in ``manifest["outputs"]`` order) of one image -> :class:`Outcome`. ``rule``: how the raw
    score meets the threshold for NOK (``>`` or ``>=``), for tools that judge recorded scores again."""

    rule: str

    def __call__(self, outputs: tuple[np.ndarray, ...], frame_hw: tuple[int, int]) -> Outcome: ...


class AnomalyMapPostprocess:
    """``(anomaly_map, score)``: NOK above the threshold, regions of the map above it. An OK verdict has no
    regions: a family whose image score is not the map's maximum (CAM: the mean of the map's logits) can
    have map positions above the threshold on a part it passes, and a line must not see boxes on an OK."""

    rule = ">"

    def __init__(self, bundle: Bundle, decision: dict[str, Any]):
        self.preprocess = bundle.preprocess
        self.threshold = float(decision["threshold"])
        self.normalization = decision["normalization"]
        self.min_region_area = int(decision["min_region_area"])

    def __call__(self, outputs: tuple[np.ndarray, ...], frame_hw: tuple[int, int]) -> Outcome:
        """Verdict and regions of one image."""
        amap, raw = outputs[0][0, 0], float(outputs[1][0])
        require_finite("anomaly score", raw)
        require_finite("anomaly map", amap)
        nok = raw > self.threshold
        regions = find_regions(amap, self.threshold, self.min_region_area, self.normalization, self.preprocess,
                               frame_hw) if nok else []
        return Outcome(nok, raw, regions, amap)


class DetectionPostprocess:
    """Detector outputs through the bundle's decoder: NOK when a detection of a class not in
    ``ok_classes`` has a confidence at or above the threshold; regions are the detections that do."""

    rule = ">="

    def __init__(self, bundle: Bundle, decision: dict[str, Any]):
        detection = bundle.manifest.get("detection")
        if not isinstance(detection, dict):
            raise BundleError(f"bundle {bundle.path} serves detections but its manifest has no detection entry")
        self.preprocess = bundle.preprocess
        self.output_names = list(bundle.manifest["outputs"])
        self.decode = make_decoder(detection, bundle.load_array, self.preprocess.input_size)
        self.classes = list(detection["classes"])
        self.ok_labels = [self.classes.index(c) + 1 for c in detection.get("ok_classes") or [] if c in self.classes]
        self.threshold = float(decision["threshold"])
        self.mask_threshold = float(detection.get("mask_threshold", MASK_THRESHOLD))

    def __call__(self, outputs: tuple[np.ndarray, ...], frame_hw: tuple[int, int]) -> Outcome:
        """Verdict and regions of one image."""
        detections = self.decode(dict(zip(self.output_names, outputs, strict=True)))
        require_finite("detection confidence", detections.scores)
        require_finite("detection box", detections.boxes)
        return self.judge(detections, frame_hw)

    def judge(self, detections: Detections, frame_hw: tuple[int, int]) -> Outcome:
        """Verdict and regions of decoded detections (model-input pixels) on a frame of ``frame_hw``."""
        defect = ~np.isin(detections.labels, self.ok_labels)
        raw = float(detections.scores[defect].max()) if defect.any() else 0.0
        regions = [self.region(detections, i, frame_hw) for i in np.flatnonzero(detections.scores >= self.threshold)]
        return Outcome(raw >= self.threshold, raw, regions, None, detections)

    def label(self, label: int) -> str:
        """Class name of a label (1..C)."""
        return self.classes[label - 1] if 1 <= label <= len(self.classes) else f"class_{label}"

    def region(self, detections: Detections, i: int, frame_hw: tuple[int, int]) -> Region:
        """Detection ``i`` as a region in frame pixels."""
        x0, y0, x1, y1 = (float(v) for v in detections.boxes[i])
        area, polygon = int(round((x1 - x0) * (y1 - y0))), None
        if detections.masks is not None:
            mask = detections.masks[i]
            area = int((mask >= self.mask_threshold).sum())
            outline = mask_polygon(mask, self.mask_threshold)
            if outline is not None:
                points = self.preprocess.points_to_frame(outline, frame_hw)
                polygon = tuple((int(x), int(y)) for x, y in np.rint(points))
        return Region(self.preprocess.box_to_frame((x0, y0, x1, y1), frame_hw), area,
                      float(detections.scores[i]), self.label(int(detections.labels[i])), polygon)


TASKS: dict[str, type] = {"anomaly_map": AnomalyMapPostprocess, "detections": DetectionPostprocess}


def bundle_task(bundle: Bundle) -> str:
    """What a bundle's engine gives: ``anomaly_map`` (also bundles that do not say) or ``detections``."""
    return bundle.manifest.get("task", "anomaly_map")


def postprocess_for(bundle: Bundle, decision: dict[str, Any]) -> Postprocess:
    """The post-processing of a bundle's task, with ``decision`` (the engine's) applied."""
    task = bundle_task(bundle)
    if task not in TASKS:
        raise BundleError(f"bundle {bundle.path} serves task {task!r}; this edgeinspect knows {sorted(TASKS)}")
    return TASKS[task](bundle, decision)
