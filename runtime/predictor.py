"""A bundle's engine plus its pre- and post-processing: one RGB image in, one verdict out."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeinspect.bundle import OPEN_ATTEMPTS, Bundle
from edgeinspect.frames import FrameCheck, FrameSpec
from edgeinspect.runtime.backends import open_engine
from edgeinspect.runtime.postprocess import Region, find_regions, normalize

OK, NOK = "OK", "NOK"


@dataclass
class Prediction:
    """The verdict for one image and how it was reached."""

    verdict: str                  # "OK" or "NOK"
    score: float                  # normalised: 0.5 is the decision boundary
    raw_score: float              # engine output, in the model's own units
    raw_threshold: float
    regions: list[Region]
    anomaly_map: np.ndarray       # raw map, model-input geometry (H x W)
    latency_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready summary (without the map)."""
        return {"verdict": self.verdict, "score": round(self.score, 6), "threshold": 0.5,
                "raw_score": round(self.raw_score, 6), "raw_threshold": round(self.raw_threshold, 6),
                "regions": [r.to_dict() for r in self.regions],
                "latency_ms": {k: round(v, 3) for k, v in self.latency_ms.items()}}


class Predictor:
    """Loads a bundle's engine once; :meth:`predict` is the per-frame hot path."""

    def __init__(self, bundle: str | Path | Bundle, *, engine: str = "auto",
                 providers: tuple[str, ...] = ("cpu",), threads: int | None = None, convert_frames: bool = False):
        for _ in range(OPEN_ATTEMPTS):  # a bundle swapped in while its engine loads is opened again
            self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
            self.engine_entry, self.backend = open_engine(self.bundle, engine, providers, threads)
            if isinstance(bundle, Bundle) or not self.bundle.replaced():
                break
        spec = self.bundle.manifest.get("input_images")
        self.check = FrameCheck(FrameSpec.from_dict(spec) if spec else None, convert=convert_frames)
        self.engine = f"{self.engine_entry['format']}:{self.engine_entry['precision']}"
        self.preprocess = self.bundle.preprocess
        decision = self.bundle.engine_decision(self.engine_entry)
        self.threshold = float(decision["threshold"])
        self.normalization = decision["normalization"]
        self.min_region_area = int(decision["min_region_area"])

    def with_threshold(self, threshold: float) -> Predictor:
        """A predictor sharing this one's engine whose decision threshold is ``threshold`` (model units);
        the normalised score is recentred on it, so 0.5 stays the OK/NOK boundary."""
        other = copy.copy(self)
        other.threshold = float(threshold)
        other.normalization = {**self.normalization, "center": float(threshold)}
        return other

    def predict(self, rgb: np.ndarray) -> Prediction:
        """Score one HxWx3 uint8 RGB image."""
        t0 = time.perf_counter()
        x = self.preprocess(rgb)
        t1 = time.perf_counter()
        amap, score = self.backend.run(x)
        t2 = time.perf_counter()
        amap, raw = amap[0, 0], float(score[0])
        regions = find_regions(amap, self.threshold, self.min_region_area, self.normalization,
                               self.preprocess, rgb.shape[:2])
        t3 = time.perf_counter()
        return Prediction(verdict=NOK if raw > self.threshold else OK, score=float(normalize(raw, self.normalization)),
                          raw_score=raw, raw_threshold=self.threshold, regions=regions, anomaly_map=amap,
                          latency_ms={"preprocess": 1e3 * (t1 - t0), "inference": 1e3 * (t2 - t1),
                                      "postprocess": 1e3 * (t3 - t2)})
