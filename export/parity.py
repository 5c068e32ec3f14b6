"""Parity: does an exported engine score like the PyTorch model it came from?"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgeinspect.runtime.detections import Detections, box_iou
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


class GateResult:
    """What every parity result shares: the gate's failures decide, and it is recorded as a dict."""

    failures: list[str]

    @property
    def passed(self) -> bool:
        """True when every criterion of the gate is met."""
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest."""
        return {**asdict(self), "passed": self.passed}


@dataclass(frozen=True)
class Parity(GateResult):
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
    reference_auroc: float | None  # image AUROC of the PyTorch model on these images (None: not checked)
    image_auroc: float | None      # image AUROC of the engine (None: not checked)
    gate: dict[str, Any]
    auroc_not_checked: str | None = None  # why the AUROCs are None (no AUROC of one class)
    failures: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for people."""
        line = (f"{self.n_images} images: max |d map| {self.max_abs_map_delta:.3g}, max |d score| "
                f"{self.max_abs_score_delta:.3g} ({self.max_rel_score_delta:.3g} of the threshold), "
                f"verdict agreement {100 * self.verdict_agreement:.1f}% ({100 * self.verdict_agreement_all:.1f}% "
                f"with the {self.n_borderline} borderline; flips {self.flips_to_correct} to correct, "
                f"{self.flips_to_wrong} to wrong), " + (
                    f"image AUROC not checked ({self.auroc_not_checked})" if self.auroc_not_checked else
                    f"image AUROC {self.image_auroc:.4f} (PyTorch {self.reference_auroc:.4f})"))
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
    # no AUROC without both classes: that part is not checked (never NaN in the manifest); verdicts still gate
    unchecked = "one class in the check set" if len(np.unique(labels)) < 2 else None
    ref_auroc, auroc = (None, None) if unchecked else (image_auroc(labels, ref_scores), image_auroc(labels, scores))
    failures = [] if finite else ["the engine outputs NaN or infinity"]
    if gate.tolerance is not None and max(map_delta, score_delta) > gate.tolerance * scale:
        failures.append(f"max |delta| {max(map_delta, score_delta) / scale:.3g} of the threshold "
                        f"> tolerance {gate.tolerance:g}")
    if agreement < gate.min_verdict_agreement:
        failures.append(f"verdict agreement {100 * agreement:.1f}% < {100 * gate.min_verdict_agreement:g}%")
    if gate.max_auroc_drop is not None and not unchecked and ref_auroc - auroc > gate.max_auroc_drop:
        failures.append(f"image AUROC drop {ref_auroc - auroc:.4f} > {gate.max_auroc_drop:g}")
    return Parity(len(scores), map_delta, score_delta, score_delta / scale, agreement, int((~clear).sum()),
                  float(np.mean(~flips)), int((flips & (nok == labels.astype(bool))).sum()),
                  int((flips & (ref_nok == labels.astype(bool))).sum()), ref_auroc, auroc, asdict(gate), unchecked,
                  failures)


# ------------------------------------------------------------------------------------------- detectors
@dataclass(frozen=True)
class DetectionGate:
    """What a detector engine must meet against the PyTorch model; one per precision
    (``detections:`` in configs/export.yaml)."""

    min_iou: float                # a detection matches one of the same class with at least this box IoU
    score_tolerance: float | None  # max |d confidence| of a matched pair; None: not required
    min_score: float              # detections below this confidence need not be matched (nor counted)
    max_unmatched: float | None   # unmatched detections (either side, >= min_score) per reference detection;
    #                               None: not required
    min_verdict_agreement: float  # fraction of images with the same OK/NOK, outside the borderline band
    borderline_band: float = 0.0  # images whose highest defect confidence (PyTorch) is within this fraction
    #                               of the threshold are not counted in the agreement
    max_map50_drop: float | None = None  # allowed bbox mAP@0.5 loss against the PyTorch model on the check
    #                                      images' ground truth (accuracy control); None: not required

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> DetectionGate:
        """Build from a precision's section of ``detections`` in the export config."""
        return cls(float(section["min_iou"]), section.get("score_tolerance"), float(section["min_score"]),
                   section.get("max_unmatched"), float(section["min_verdict_agreement"]),
                   float(section.get("borderline_band") or 0.0), section.get("max_map50_drop"))


@dataclass(frozen=True)
class DetectionParity(GateResult):
    """Agreement of a detector engine's detections with the PyTorch model's on the same images."""

    n_images: int
    n_reference: int              # PyTorch detections at or above the gate's min_score
    n_matched: int
    unmatched_reference: int      # PyTorch detections >= min_score the engine does not have
    unmatched_engine: int         # engine detections >= min_score PyTorch does not have
    min_matched_iou: float
    max_abs_score_delta: float    # over matched pairs
    verdict_agreement: float      # same OK/NOK, over the images outside the band
    n_borderline: int
    verdict_agreement_all: float
    gate: dict[str, Any]
    reference_map50: float | None = None  # bbox mAP@0.5 of the PyTorch model on the check images (when the
    map50: float | None = None            # gate has max_map50_drop) and of the engine
    failures: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for people."""
        line = (f"{self.n_images} images: {self.n_matched} of {self.n_reference} detections matched (IoU >= "
                f"{self.gate['min_iou']:g}, same class; min IoU {self.min_matched_iou:.4f}), max |d confidence| "
                f"{self.max_abs_score_delta:.3g}, unmatched {self.unmatched_reference} PyTorch / "
                f"{self.unmatched_engine} engine, verdict agreement {100 * self.verdict_agreement:.1f}% "
                f"({100 * self.verdict_agreement_all:.1f}% with the {self.n_borderline} borderline)")
        if self.map50 is not None:
            line += f", bbox mAP@0.5 {self.map50:.4f} (PyTorch {self.reference_map50:.4f})"
        return line + (f"; failed: {', '.join(self.failures)}" if self.failures else "")


def box_agreement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of N x 4 and M x 4 boxes; boxes equal within 0.01 px count 1 (a box clamped to no area)."""
    iou = box_iou(a, b)
    same = np.abs(a[:, None, :] - b[None, :, :]).max(axis=-1) <= 0.01
    return np.where(same, 1.0, iou)


def match_detections(reference: Detections, engine: Detections, min_iou: float, min_score: float
                     ) -> tuple[list[tuple[int, int, float]], int, int]:
    """Greedy matching of one image's detections (PyTorch's by decreasing confidence, each to the unmatched
    engine detection of its class with the highest IoU >= ``min_iou``): (pairs (i, j, iou), PyTorch
    and engine detections >= ``min_score`` left unmatched)."""
    iou = box_agreement(reference.boxes, engine.boxes) if len(reference) and len(engine) else None
    taken = np.zeros(len(engine), bool)
    pairs = []
    for i in np.argsort(-reference.scores, kind="stable"):
        if iou is None:
            break
        candidates = (engine.labels == reference.labels[i]) & ~taken & (iou[i] >= min_iou)
        if candidates.any():
            j = int(np.argmax(np.where(candidates, iou[i], -1.0)))
            taken[j] = True
            pairs.append((int(i), j, float(iou[i, j])))
    matched_ref = np.zeros(len(reference), bool)
    matched_ref[[i for i, _, _ in pairs]] = True
    return (pairs, int(((reference.scores >= min_score) & ~matched_ref).sum()),
            int(((engine.scores >= min_score) & ~taken).sum()))


def compare_detections(reference: list[Detections], engine: list[Detections], reference_nok: np.ndarray,
                       engine_nok: np.ndarray, reference_raw: np.ndarray, threshold: float, gate: DetectionGate,
                       map50: tuple[float, float] | None = None) -> DetectionParity:
    """Compare an engine's decoded detections (one :class:`Detections` per image) and OK/NOK with
    the PyTorch model's; ``reference_raw`` is PyTorch's highest defect confidence per image; ``map50``:
    (PyTorch's, the engine's) bbox mAP@0.5 on the images' ground truth, needed when the gate bounds its drop."""
    finite = all(np.isfinite(d.scores).all() and np.isfinite(d.boxes).all() for d in engine)
    n_ref = matched = unmatched_ref = unmatched_eng = 0
    ious, deltas = [], []
    for ref, eng in zip(reference, engine, strict=True):
        pairs, u_ref, u_eng = match_detections(ref, eng, gate.min_iou, gate.min_score)
        n_ref += int((ref.scores >= gate.min_score).sum())
        matched += sum(ref.scores[i] >= gate.min_score for i, _, _ in pairs)
        unmatched_ref, unmatched_eng = unmatched_ref + u_ref, unmatched_eng + u_eng
        ious += [iou for _, _, iou in pairs]
        deltas += [abs(float(ref.scores[i]) - float(eng.scores[j])) for i, j, _ in pairs]
    max_delta = max(deltas, default=0.0)
    clear = np.abs(reference_raw - threshold) > gate.borderline_band * max(abs(threshold), 1e-12)
    agreement = float(np.mean(reference_nok[clear] == engine_nok[clear])) if clear.any() else 1.0
    failures = [] if finite else ["the engine outputs NaN or infinity"]
    unmatched = (unmatched_ref + unmatched_eng) / max(n_ref, 1)
    if gate.max_unmatched is not None and unmatched > gate.max_unmatched:
        failures.append(f"{unmatched_ref} PyTorch and {unmatched_eng} engine detections >= {gate.min_score:g} "
                        f"unmatched ({unmatched:.3g} per reference detection > {gate.max_unmatched:g})")
    if gate.score_tolerance is not None and max_delta > gate.score_tolerance:
        failures.append(f"max |d confidence| {max_delta:.3g} > tolerance {gate.score_tolerance:g}")
    if agreement < gate.min_verdict_agreement:
        failures.append(f"verdict agreement {100 * agreement:.1f}% < {100 * gate.min_verdict_agreement:g}%")
    if gate.max_map50_drop is not None:
        if map50 is None:
            raise ValueError("the gate bounds the mAP@0.5 drop: pass map50=(PyTorch's, the engine's)")
        if map50[0] - map50[1] > gate.max_map50_drop:
            failures.append(f"bbox mAP@0.5 drop {map50[0] - map50[1]:.4f} > {gate.max_map50_drop:g}")
    return DetectionParity(len(reference), n_ref, int(matched), unmatched_ref, unmatched_eng,
                           min(ious, default=1.0), max_delta, agreement, int((~clear).sum()),
                           float(np.mean(reference_nok == engine_nok)) if len(reference) else 1.0, asdict(gate),
                           *(map50 or (None, None)), failures)
