"""From raw engine outputs to a verdict: normalised score, OK/NOK, defect regions."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edgeinspect.preprocess import Preprocess


@dataclass(frozen=True)
class Region:
    """A connected region of the anomaly map above the threshold."""

    box: tuple[int, int, int, int]   # x0, y0, x1, y1 in frame pixels (x1/y1 exclusive)
    area: int                        # pixels of the model input
    score: float                     # normalised peak score inside the region

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"box": list(self.box), "area": self.area, "score": round(self.score, 6)}


def normalize(raw: np.ndarray | float, normalization: dict) -> np.ndarray | float:
    """Map raw scores so that the threshold is 0.5 (see trainer.decide); clipped to [0, 1]."""
    center, scale = normalization["center"], normalization["scale"]
    return np.clip(0.5 + 0.5 * (np.asarray(raw, np.float64) - center) / scale, 0.0, 1.0)


def map_regions(anomaly_map: np.ndarray, threshold: float, min_area: int
                ) -> list[tuple[tuple[int, int, int, int], int, float]]:
    """``(box, area, peak)`` of each 8-connected region of ``anomaly_map > threshold`` with at least
    ``min_area`` pixels, in map pixels (box ``x0, y0, x1, y1``, x1/y1 exclusive; peak in map units).

    The one place a map becomes boxes: the runtime's regions and the evaluation's box IoU both use it.
    """
    if float(anomaly_map.max()) <= threshold:  # the usual good part: no labelling to do
        return []
    binary = (anomaly_map > threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    regions = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area < min_area:
            continue
        peak = float(anomaly_map[y:y + h, x:x + w][labels[y:y + h, x:x + w] == i].max())
        regions.append(((x, y, x + w, y + h), area, peak))
    return regions


def find_regions(anomaly_map: np.ndarray, threshold: float, min_area: int, normalization: dict,
                 preprocess: Preprocess, frame_hw: tuple[int, int]) -> list[Region]:
    """Boxes of the 8-connected regions of ``anomaly_map > threshold``, in frame pixels, largest first."""
    regions = [Region(preprocess.box_to_frame(box, frame_hw), area, float(normalize(peak, normalization)))
               for box, area, peak in map_regions(anomaly_map, threshold, min_area)]
    return sorted(regions, key=lambda r: r.area, reverse=True)
