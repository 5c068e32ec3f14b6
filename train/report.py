"""``edgeinspect evaluate --report DIR``: the evaluation's plots as PNG files and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeinspect.bundle import bundle_target, staged_output
from edgeinspect.errors import DataError
from edgeinspect.registry import flatten
from edgeinspect.runtime.postprocess import map_regions
from edgeinspect.train.metrics import pro_curve
from edgeinspect.train.plots import (
    confusion_png,
    curves_png,
    histogram_png,
    overlay_grid_png,
    pr_png,
    pro_png,
    roc_png,
)
from edgeinspect.train.trainer import test_masks

if TYPE_CHECKING:
    from edgeinspect.train.evaluate import Inference

REPORT = "report.html"
PRO_MAX_FPR = 0.3  # as metrics.pro


def ranked(labels: np.ndarray, scores: np.ndarray, threshold: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``n`` best and ``n`` worst judged images: by the margin of their score on the right side
    of ``threshold`` (above it for a defective image, at or below for a good one); worst first among the worst."""
    margin = (scores - threshold) * np.where(labels == 1, 1.0, -1.0)
    order = np.argsort(margin, kind="stable")
    return order[::-1][:n], order[:n]


def _tiles(run: Inference, masks: np.ndarray, indices: np.ndarray) -> list[dict[str, Any]]:
    threshold, min_area = run.decision["threshold"], run.decision["min_region_area"]
    tiles = []
    for i in indices:
        sample, score = run.samples[i], float(run.scores[i])
        tiles.append({"image": run.bundle.preprocess.view(run.dataset.load_image(sample)), "map": run.maps[i],
                      "mask": masks[i], "boxes": [box for box, _, _ in map_regions(run.maps[i], threshold, min_area)],
                      "label": f"{sample.defect_type} {score:.3g} {'NOK' if score > threshold else 'OK'}"})
    return tiles


def report_plots(run: Inference, metrics: dict[str, Any], n_tiles: int = 4) -> dict[str, tuple[str, bytes]]:
    """``{file name: (caption, PNG)}`` of an evaluation; curves that need both classes only when there are."""
    labels = np.array([s.label for s in run.samples])
    threshold = run.decision["threshold"]
    title = f"{run.bundle.family} on {run.dataset.category} ({run.engine})"
    plots: dict[str, tuple[str, bytes]] = {}
    if 0 < labels.sum() < len(labels):
        plots["roc.png"] = ("ROC curve of the image scores", roc_png(labels, run.scores, title))
        plots["pr.png"] = ("Precision-recall curve of the image scores (defective = positive)",
                           pr_png(labels, run.scores, title))
    plots["score_histogram.png"] = ("Image scores of good and defective test images, and the threshold",
                                    histogram_png(labels, run.scores, threshold, title))
    masks = test_masks(run.dataset, run.samples, run.bundle.preprocess)
    curve = pro_curve(masks, run.maps, PRO_MAX_FPR)
    if curve is not None:
        plots["pro.png"] = (f"Per-region overlap against the pixel false positive rate (up to {PRO_MAX_FPR:g})",
                            pro_png(*curve, PRO_MAX_FPR, title))
    best, worst = ranked(labels, run.scores, threshold, n_tiles)
    vmax = max(float(np.quantile(run.maps, 0.999)), threshold * 1.5)
    plots["overlays.png"] = (
        f"The {len(best)} best and {len(worst)} worst judged test images (by the margin of their score to the "
        f"threshold): anomaly map, regions above the threshold, ground truth",
        overlay_grid_png([("best", _tiles(run, masks, best)), ("worst", _tiles(run, masks, worst))], threshold,
                         vmax, title))
    history = (run.bundle.manifest.get("training") or {}).get("history")
    if history:
        plots["training_curves.png"] = ("Training curves (per epoch, from the bundle)",
                                        curves_png(history, f"{run.bundle.family} training"))
    plots["confusion.png"] = ("Confusion matrix at the bundle's threshold",
                              confusion_png(metrics["confusion"], threshold, title))
    return plots


def write_report(out_dir: str | Path, run: Inference, metrics: dict[str, Any]) -> Path:
    """Write the plots of :func:`report_plots`, ``metrics.json`` and ``report.html`` (the PNGs embedded as base64,
    so the page alone is the whole report) as the folder ``out_dir``; the HTML file's path.

    The folder is written as a hidden sibling and swapped in whole (:func:`staged_output`): an earlier report
    there is replaced, none of its files left, and a failure leaves it as it was. DataError when ``out_dir`` is
    a non-empty folder that is not a report."""
    out = bundle_target(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / REPORT).is_file())):
        raise DataError(f"refusing to overwrite {out}: it is not empty and not a report written by edgeinspect "
                        f"(no {REPORT})")
    plots = report_plots(run, metrics)
    with staged_output(out) as staged:
        _write_files(staged, run, metrics, plots)
    return out / REPORT


def _write_files(out: Path, run: Inference, metrics: dict[str, Any], plots: dict[str, tuple[str, bytes]]) -> None:
    """The report's files, written into the folder ``out``."""
    for name, (_, png) in plots.items():
        (out / name).write_bytes(png)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in flatten(metrics).items())
    figures = "".join(
        f'<figure id="{html.escape(Path(name).stem)}"><img alt="{html.escape(name)}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}"><figcaption>{html.escape(caption)} '
        f"({html.escape(name)})</figcaption></figure>" for name, (caption, png) in plots.items())
    title = f"edgeinspect evaluation: {run.bundle.bundle_id} on {run.dataset.category}"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}} table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:13px}} figure{{display:inline-block;
vertical-align:top;margin:1em}} img{{max-width:100%}} figcaption{{font-size:13px;color:#444;max-width:640px}}</style>
</head><body><h1>{html.escape(title)}</h1>
<p>Bundle {html.escape(str(Path(run.bundle.path).resolve()))}, engine {html.escape(run.engine)},
{len(run.samples)} test images ({html.escape(run.split)}),
data {html.escape(str(Path(run.dataset.root).resolve()))}.</p>
<h2>Metrics</h2><table>{rows}</table><h2>Plots</h2>{figures}</body></html>
"""
    (out / REPORT).write_text(page)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if np.isfinite(value) else str(value)
    return str(value)
