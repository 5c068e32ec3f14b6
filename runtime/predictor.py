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
from edgeinspect.runtime.detections import Detections
from edgeinspect.runtime.postprocess import Region, normalize, postprocess_for

OK, NOK = "OK", "NOK"


@dataclass
class Prediction:
    """The verdict for one image and how it was reached (the one schema of every task)."""

    verdict: str                  # "OK" or "NOK"
    score: float                  # normalised: 0.5 is the decision boundary
    raw_score: float              # engine output in the model's own units; a detector: highest defect confidence
    raw_threshold: float
    regions: list[Region]
    anomaly_map: np.ndarray | None  # raw map, model-input geometry (H x W); None for detectors
    latency_ms: dict[str, float] = field(default_factory=dict)
    detections: Detections | None = None  # every decoded detection, model-input pixels (detectors only)

    def to_dict(self) -> dict:
        """JSON-ready summary (without the map and the raw detections)."""
        return {"verdict": self.verdict, "score": round(self.score, 6), "threshold": 0.5,
                "raw_score": round(self.raw_score, 6), "raw_threshold": round(self.raw_threshold, 6),
                "regions": [r.to_dict() for r in self.regions],
                "latency_ms": {k: round(v, 3) for k, v in self.latency_ms.items()}}


class Predictor:
    """Loads a bundle's engine once; :meth:`predict` is the per-frame hot path."""

    def __init__(self, bundle: str | Path | Bundle, *, engine: str = "auto",
                 providers: tuple[str, ...] = ("cpu",), threads: int | None = None, convert_frames: bool = False,
                 remote: str | None = None):
        """``remote``: the server of an engine that runs on one (``--engine triton --triton-url``)."""
        for _ in range(OPEN_ATTEMPTS):  # a bundle swapped in while its engine loads is opened again
            self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
            self.engine_entry, self.backend = open_engine(self.bundle, engine, providers, threads, remote)
            if isinstance(bundle, Bundle) or not self.bundle.replaced():
                break
        spec = self.bundle.manifest.get("input_images")
        self.check = FrameCheck(FrameSpec.from_dict(spec) if spec else None, convert=convert_frames)
        self.engine = f"{self.engine_entry['format']}:{self.engine_entry['precision']}"
        self.preprocess = self.bundle.preprocess
        self._decide(self.bundle.engine_decision(self.engine_entry))

    def _decide(self, decision: dict) -> None:
        self.decision = decision
        self.threshold = float(decision["threshold"])
        self.normalization = decision["normalization"]
        self.postprocess = postprocess_for(self.bundle, decision)

    def with_threshold(self, threshold: float) -> Predictor:
        """A predictor sharing this one's engine whose decision threshold is ``threshold`` (model units:
        the anomaly score, or a detector's confidence); the normalised score is recentred on it, so 0.5
        stays the OK/NOK boundary."""
        other = copy.copy(self)
        other._decide({**self.decision, "threshold": float(threshold),
                       "normalization": {**self.normalization, "center": float(threshold)}})
        return other

    def predict(self, rgb: np.ndarray) -> Prediction:
        """Score one HxWx3 uint8 RGB image."""
        t0 = time.perf_counter()
        x = self.preprocess(rgb)
        t1 = time.perf_counter()
        outputs = self.backend.run(x)
        t2 = time.perf_counter()
        outcome = self.postprocess(outputs, rgb.shape[:2])
        t3 = time.perf_counter()
        return Prediction(verdict=NOK if outcome.nok else OK, score=float(normalize(outcome.raw_score,
                                                                                    self.normalization)),
                          raw_score=outcome.raw_score, raw_threshold=self.threshold, regions=outcome.regions,
                          anomaly_map=outcome.anomaly_map, detections=outcome.detections,
                          latency_ms={"preprocess": 1e3 * (t1 - t0), "inference": 1e3 * (t2 - t1),
                                      "postprocess": 1e3 * (t3 - t2)})
