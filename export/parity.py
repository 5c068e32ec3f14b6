"""Parity: does an exported engine score like the PyTorch model it came from?"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgeinspect.train.metrics import image_auroc


@dataclass(frozen=True)
class Gate:
    """What an engine must meet against the PyTorch model; one per precision (configs/export.yaml)."""

    tolerance: float | None      # max |d map| and |d score| relative to the threshold; None: not required
    min_verdict_agreement: float  # fraction of test images with the same OK/NOK
    max_auroc_drop: float | None  # allowed image-AUROC loss against the PyTorch model; None: not required
    borderline_band: float = 0.0  # images PyTorch scores within this fraction of its threshold are not
    #                               counted in the agreement (any perturbation that size flips them)

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> Gate:
        """Build from a precision's section of the export config."""
        return cls(section.get("tolerance"), float(section["min_verdict_agreement"]), section.get("max_auroc_drop"),
                   float(section.get("borderline_band") or 0.0))


@dataclass(frozen=True)
class Parity:
    """Agreement figures of an engine against the PyTorch model on the same images."""

    n_images: int
    max_abs_map_delta: float
    max_abs_score_delta: float
    max_rel_score_delta: float   # relative to the decision threshold
    verdict_agreement: float     # same OK/NOK (each at its own threshold), over the images outside the band
    n_borderline: int            # images within the gate's borderline band, not counted above
    verdict_agreement_all: float  # same OK/NOK over all images
    flips_to_correct: int        # images whose verdict differs and the engine's matches the label
    flips_to_wrong: int          # images whose verdict differs and PyTorch's matches the label
    reference_auroc: float       # image AUROC of the PyTorch model on these images
    image_auroc: float           # image AUROC of the engine
    gate: dict[str, Any]
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when every criterion of the gate is met."""
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest."""
        return {**asdict(self), "passed": self.passed}

    def describe(self) -> str:
        """One line for people."""
        line = (f"{self.n_images} images: max |d map| {self.max_abs_map_delta:.3g}, max |d score| "
                f"{self.max_abs_score_delta:.3g} ({self.max_rel_score_delta:.3g} of the threshold), "
                f"verdict agreement {100 * self.verdict_agreement:.1f}% ({100 * self.verdict_agreement_all:.1f}% "
                f"with the {self.n_borderline} borderline; flips {self.flips_to_correct} to correct, "
                f"{self.flips_to_wrong} to wrong), image AUROC {self.image_auroc:.4f} "
                f"(PyTorch {self.reference_auroc:.4f})")
        return line + (f"; failed: {', '.join(self.failures)}" if self.failures else "")


def compare(reference: tuple[np.ndarray, np.ndarray], engine: tuple[np.ndarray, np.ndarray], labels: np.ndarray,
            reference_threshold: float, engine_threshold: float, gate: Gate) -> Parity:
    """Compare engine (maps, scores) with the PyTorch model's; tolerances are relative to the threshold."""
    (ref_maps, ref_scores), (maps, scores) = reference, engine
    finite = bool(np.isfinite(maps).all() and np.isfinite(scores).all())
    if not finite:  # a broken engine: keep the figures readable, fail below
        big = float(np.finfo(np.float32).max)
        maps, scores = np.nan_to_num(maps, posinf=big, neginf=-big), np.nan_to_num(scores, posinf=big, neginf=-big)
    map_delta = float(np.abs(ref_maps - maps).max())
    score_delta = float(np.abs(ref_scores - scores).max())
    scale = max(abs(reference_threshold), 1e-12)
    ref_nok, nok = ref_scores > reference_threshold, scores > engine_threshold
    clear = np.abs(ref_scores - reference_threshold) > gate.borderline_band * scale
    agreement = float(np.mean(ref_nok[clear] == nok[clear])) if clear.any() else 1.0
    flips = ref_nok != nok
    ref_auroc, auroc = image_auroc(labels, ref_scores), image_auroc(labels, scores)
    failures = [] if finite else ["the engine outputs NaN or infinity"]
    if gate.tolerance is not None and max(map_delta, score_delta) > gate.tolerance * scale:
        failures.append(f"max |delta| {max(map_delta, score_delta) / scale:.3g} of the threshold "
                        f"> tolerance {gate.tolerance:g}")
    if agreement < gate.min_verdict_agreement:
        failures.append(f"verdict agreement {100 * agreement:.1f}% < {100 * gate.min_verdict_agreement:g}%")
    if gate.max_auroc_drop is not None and ref_auroc - auroc > gate.max_auroc_drop:
        failures.append(f"image AUROC drop {ref_auroc - auroc:.4f} > {gate.max_auroc_drop:g}")
    return Parity(len(scores), map_delta, score_delta, score_delta / scale, agreement, int((~clear).sum()),
                  float(np.mean(~flips)), int((flips & (nok == labels.astype(bool))).sum()),
                  int((flips & (ref_nok == labels.astype(bool))).sum()), ref_auroc, auroc, asdict(gate), failures)
