"""Plots as PNG bytes, the one place for them: ROC, PR and PRO curves, score histogram, confusion matrix,
an overlay grid of test images, per-epoch training curves (bundle reports and ``evaluate --report``)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve  # noqa: E402


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def roc_png(labels: np.ndarray, scores: np.ndarray, title: str) -> bytes:
    """ROC curve of image scores against 0/1 labels, with its AUROC in the legend."""
    fpr, tpr, _ = roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"AUROC {auc(fpr, tpr):.4f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    return _png(fig)


def curves_png(history: Mapping[str, Sequence[float]], title: str) -> bytes:
    """One line per curve of ``history`` (name -> value per epoch), epochs on the x axis."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in history.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=name)
    ax.set(xlabel="epoch", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def pr_png(labels: np.ndarray, scores: np.ndarray, title: str) -> bytes:
    """Precision-recall curve of image scores (defective = positive), with its average precision."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(recall, precision, drawstyle="steps-post", label=f"AP {average_precision_score(labels, scores):.4f}")
    ax.axhline(float(np.mean(labels)), linestyle="--", color="grey", linewidth=0.8, label="share defective")
    ax.set(xlabel="recall", ylabel="precision", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left")
    return _png(fig)


def histogram_png(labels: np.ndarray, scores: np.ndarray, threshold: float, title: str) -> bytes:
    """Histograms of the good and the defective images' scores on shared bins, the threshold as a line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(np.r_[scores, threshold], bins=30)
    for label, name, colour in ((0, "good", "tab:green"), (1, "defective", "tab:red")):
        ax.hist(scores[labels == label], bins=bins, alpha=0.6, color=colour,
                label=f"{name} ({int((labels == label).sum())})")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set(xlabel="image score", ylabel="images", title=title)
    ax.legend()
    return _png(fig)


def pro_png(fpr: np.ndarray, overlap: np.ndarray, max_fpr: float, title: str) -> bytes:
    """The per-region-overlap curve (``metrics.pro_curve``) with its normalised area."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, overlap, label=f"AUPRO (FPR <= {max_fpr:g}) {np.trapezoid(overlap, fpr) / max_fpr:.4f}")
    ax.set(xlabel="false positive rate (pixels)", ylabel="per-region overlap", title=title, xlim=(0, max_fpr),
           ylim=(0, 1.01))
    ax.legend(loc="lower right")
    return _png(fig)


def confusion_png(counts: Mapping[str, int], threshold: float, title: str) -> bytes:
    """The 2 x 2 confusion matrix (rows: truth, columns: verdict) of ``metrics.confusion`` counts."""
    matrix = np.array([[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]])
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), n in np.ndenumerate(matrix):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=14,
                color="white" if n > matrix.max() / 2 else "black")
    ax.set(xticks=[0, 1], xticklabels=["OK", "NOK"], yticks=[0, 1], yticklabels=["good", "defective"],
           xlabel="verdict", ylabel="truth", title=f"{title}\nthreshold {threshold:.4g}")
    return _png(fig)


def overlay_grid_png(rows: Sequence[tuple[str, Sequence[dict[str, Any]]]], threshold: float, vmax: float,
                     title: str) -> bytes:
    """A grid of test images, one row per ``(name, tiles)``: each tile the image (model geometry), its anomaly
    map over it, the regions above ``threshold`` as yellow boxes and the ground truth outlined in green.

    A tile is ``{"image": HxWx3 uint8, "map": HxW, "mask": HxW bool, "boxes": [(x0, y0, x1, y1)], "label": str}``;
    every map shares the colour scale 0..``vmax``.
    """
    cols = max(len(tiles) for _, tiles in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.6 * cols, 2.9 * len(rows)), squeeze=False)
    for r, (name, tiles) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(tiles):
                continue
            tile = tiles[c]
            ax.imshow(tile["image"])
            ax.imshow(tile["map"], cmap="jet", alpha=0.45, vmin=0.0, vmax=vmax)
            if tile["mask"].any():
                ax.contour(tile["mask"].astype(float), levels=[0.5], colors="lime", linewidths=1.2)
            for x0, y0, x1, y1 in tile["boxes"]:
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="yellow",
                                       linewidth=1.2))
            ax.set_title(f"{name}: {tile['label']}", fontsize=8)
    fig.suptitle(f"{title}\nheatmap, regions > threshold {threshold:.4g} (yellow), ground truth (green)", fontsize=9)
    return _png(fig)
