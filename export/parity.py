"""Parity: does an exported engine score like the PyTorch model it came from?"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Parity:
    """Agreement figures of an engine against the PyTorch model on the same images."""

    n_images: int
    max_abs_map_delta: float
    max_abs_score_delta: float
    max_rel_score_delta: float   # relative to the decision threshold
    verdict_agreement: float     # fraction of images with the same OK/NOK
    tolerance: float             # allowed max |delta| of map and score, relative to the threshold
    passed: bool

    def to_dict(self) -> dict:
        """JSON-ready form for the manifest."""
        return asdict(self)

    def describe(self) -> str:
        """One line for people."""
        return (f"{self.n_images} images: max |d map| {self.max_abs_map_delta:.3g}, max |d score| "
                f"{self.max_abs_score_delta:.3g} ({self.max_rel_score_delta:.3g} of the threshold), "
                f"verdict agreement {100 * self.verdict_agreement:.1f}% "
                f"(tolerance {self.tolerance:g} of the threshold, 100% agreement required)")


def compare(torch_maps: np.ndarray, torch_scores: np.ndarray, engine_maps: np.ndarray,
            engine_scores: np.ndarray, threshold: float, tolerance: float) -> Parity:
    """Compare engine outputs with PyTorch outputs; ``tolerance`` is relative to the threshold."""
    map_delta = float(np.abs(torch_maps - engine_maps).max())
    score_delta = float(np.abs(torch_scores - engine_scores).max())
    agreement = float(np.mean((torch_scores > threshold) == (engine_scores > threshold)))
    scale = max(abs(threshold), 1e-12)
    passed = map_delta <= tolerance * scale and score_delta <= tolerance * scale and agreement == 1.0
    return Parity(len(torch_scores), map_delta, score_delta, score_delta / scale, agreement, tolerance, passed)
