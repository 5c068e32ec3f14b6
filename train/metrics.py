"""Evaluation metrics for anomaly detection (scikit-learn underneath)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of image scores against 0/1 labels (NaN if one class is missing)."""
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """AUROC over every pixel of every image (NaN when no pixel is defective)."""
    return image_auroc(np.asarray(masks).ravel().astype(np.uint8), np.asarray(maps).ravel())


def f1_at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    """F1 of the 'defective' class when score > threshold means defective."""
    return float(f1_score(np.asarray(labels), np.asarray(scores) > threshold, zero_division=0.0))


def f1_optimal_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold that maximises F1 on a labelled set (decision: score > threshold)."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1]))
    # precision_recall_curve uses score >= t; step just below t so that '>' gives the same split
    return float(np.nextafter(thresholds[best], -np.inf))
