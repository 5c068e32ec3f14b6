"""Evaluation metrics for anomaly detection (scikit-learn underneath where it has them).

Image level: AUROC, average precision, F1 (best and at a threshold), confusion counts, accuracy.
Pixel level: AUROC and AUPRO (per-region overlap up to a false-positive rate). Boxes: the mean best
IoU of each ground-truth defect box with the regions the runtime would report.
"""

from __future__ import annotations

import cv2
import numpy as np
from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve, roc_auc_score

from edgeinspect.runtime.postprocess import map_regions


def _both_classes(labels: np.ndarray) -> bool:
    labels = np.asarray(labels)
    return labels.size > 0 and labels.min() != labels.max()


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of image scores against 0/1 labels (NaN if one class is missing)."""
    if not _both_classes(labels):
        return float("nan")
    return float(roc_auc_score(np.asarray(labels), scores))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """AUROC over every pixel of every image (NaN when no pixel is defective)."""
    return image_auroc(np.asarray(masks).ravel().astype(np.uint8), np.asarray(maps).ravel())


def aupr(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of image scores, defective = positive (NaN if one class is missing)."""
    if not _both_classes(labels):
        return float("nan")
    return float(average_precision_score(np.asarray(labels), scores))


def f1_at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    """F1 of the 'defective' class when score > threshold means defective."""
    return float(f1_score(np.asarray(labels), np.asarray(scores) > threshold, zero_division=0.0))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The best F1 over all thresholds and a threshold reaching it (decision: score > threshold).

    ``(nan, nan)`` if one class is missing.
    """
    if not _both_classes(labels):
        return float("nan"), float("nan")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1]))
    # precision_recall_curve uses score >= t; step just below t so that '>' gives the same split
    return float(f1[best]), float(np.nextafter(thresholds[best], -np.inf))


def f1_optimal_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold that maximises F1 on a labelled set (decision: score > threshold)."""
    return f1_max(labels, scores)[1]


def confusion(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, int]:
    """``tp``, ``fn``, ``fp``, ``tn`` with defective = positive and score > threshold = predicted defective."""
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(scores) > threshold
    return {"tp": int(np.sum(labels & predicted)), "fn": int(np.sum(labels & ~predicted)),
            "fp": int(np.sum(~labels & predicted)), "tn": int(np.sum(~labels & ~predicted))}


def accuracy(counts: dict[str, int]) -> float:
    """Fraction of images classified right, from :func:`confusion` counts (NaN for no image)."""
    n = sum(counts.values())
    return (counts["tp"] + counts["tn"]) / n if n else float("nan")


def balanced_accuracy(counts: dict[str, int]) -> float:
    """Mean of the defect recall and the good recall, from :func:`confusion` counts (NaN if a class is missing)."""
    positives, negatives = counts["tp"] + counts["fn"], counts["tn"] + counts["fp"]
    if not positives or not negatives:
        return float("nan")
    return 0.5 * (counts["tp"] / positives + counts["tn"] / negatives)


def _components(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """Number of 8-connected components of a bool mask and the label image (0 = background)."""
    n, labels = cv2.connectedComponents(np.asarray(mask, np.uint8), connectivity=8)
    return n - 1, labels


def pro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``max_fpr``, divided by ``max_fpr`` (AUPRO); the curve is
    :func:`pro_curve`'s. NaN when there is no defect pixel or no normal pixel."""
    curve = pro_curve(masks, maps, max_fpr)
    if curve is None:
        return float("nan")
    x, y = curve
    return float(np.trapezoid(y, x) / max_fpr)


def pro_curve(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> tuple[np.ndarray, np.ndarray] | None:
    """The per-region-overlap curve up to ``max_fpr``: (FPR, PRO) points, FPR ascending from 0 to ``max_fpr``.

    Bergmann et al., MVTec AD, IJCV 2021. For a threshold t, PRO(t) is the mean over every
    8-connected ground-truth component (of all images) of the fraction of its pixels with score > t,
    FPR(t) the fraction of all normal pixels with score > t; the curve has one point per distinct
    score (ties enter together), the last point is interpolated at exactly ``max_fpr``. None when
    there is no defect pixel or no normal pixel.

    Exact, without a loop over thresholds: in descending score order each defect pixel adds
    1 / (R * |its component|) to PRO and each normal pixel 1 / N_normal to FPR, so PRO is a
    cumulative sum over the defect pixels alone. Between two distinct defect scores PRO is flat, so
    the curve needs only two points per distinct defect score d, (#normal > d, PRO above d) and
    (#normal >= d, PRO at d), counted in the sorted normal scores; no argsort of every pixel.
    """
    masks = np.asarray(masks, bool)
    scores = np.asarray(maps).reshape(masks.shape)
    defect_scores, defect_weights, n_regions = [], [], 0
    for mask, amap in zip(masks, scores, strict=True):
        n, labels = _components(mask)
        if n:
            sizes = np.bincount(labels.ravel(), minlength=n + 1)
            labels = labels[mask]
            defect_scores.append(amap[mask])
            defect_weights.append(1.0 / sizes[labels])
            n_regions += n
    normal_scores = scores[~masks]
    n_normal = len(normal_scores)
    if n_regions == 0 or n_normal == 0:
        return None

    # Past the k-th highest normal score FPR exceeds max_fpr: no lower score matters, and the curve
    # ends on the point of that score.
    k = min(int(np.floor(max_fpr * n_normal)) + 1, n_normal)
    cut = np.partition(normal_scores, n_normal - k)[n_normal - k]
    normal_top = np.sort(normal_scores[normal_scores >= cut])
    defect_scores, defect_weights = np.concatenate(defect_scores), np.concatenate(defect_weights) / n_regions
    keep = defect_scores >= cut
    if not keep.any():  # every defect pixel scores below the normal pixels within max_fpr: PRO 0
        return np.array([0.0, max_fpr]), np.zeros(2)
    order = np.argsort(defect_scores[keep])[::-1]
    ranked = defect_scores[keep][order]
    overlap = np.cumsum(defect_weights[keep][order])
    ends = np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True])  # last pixel of each group of ties
    values, at = ranked[ends], overlap[ends]
    before = np.r_[0.0, at[:-1]]
    above = len(normal_top) - np.searchsorted(normal_top, values, side="right")
    at_or_above = len(normal_top) - np.searchsorted(normal_top, values, side="left")
    fpr = np.r_[0.0, np.column_stack([above, at_or_above]).ravel(), len(normal_top)] / n_normal
    curve = np.r_[0.0, np.column_stack([before, at]).ravel(), overlap[-1]]

    inside = int(np.searchsorted(fpr, max_fpr, side="right"))  # points with fpr <= max_fpr
    x, y = fpr[:inside], curve[:inside]
    if x[-1] < max_fpr:  # the last point is past max_fpr, so there is a segment to cut
        x0, x1, y0, y1 = fpr[inside - 1], fpr[inside], curve[inside - 1], curve[inside]
        x, y = np.r_[x, max_fpr], np.r_[y, y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)]
    return x, y


def _box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """IoU of two ``x0, y0, x1, y1`` boxes (x1/y1 exclusive)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def box_iou(masks: np.ndarray, maps: np.ndarray, labels: np.ndarray, threshold: float, min_region_area: int
            ) -> float:
    """Mean over every ground-truth defect box of its best IoU with a predicted box (0 if none).

    Ground-truth boxes: the bounding boxes of the 8-connected components of each defective image's
    mask. Predicted boxes: the regions of ``map > threshold`` the runtime reports
    (:func:`~edgeinspect.runtime.postprocess.map_regions`). NaN when there is no ground-truth box.
    """
    ious = []
    for mask, amap, label in zip(masks, maps, labels, strict=True):
        if not label:
            continue
        predicted = [box for box, _, _ in map_regions(amap, threshold, min_region_area)]
        for truth, _, _ in map_regions(np.asarray(mask, np.uint8), 0, 1):
            ious.append(max((_box_iou(truth, box) for box in predicted), default=0.0))
    return float(np.mean(ious)) if ious else float("nan")
