"""Evaluate a bundle on an MVTec-layout test split with the PyTorch model or an exported engine; the engine
side of a detector's evaluation on a COCO split."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from edgeinspect.bundle import Bundle
from edgeinspect.preprocess import Preprocess
from edgeinspect.runtime.backends import Backend, open_engine
from edgeinspect.train.data import MVTecCategory, Sample
from edgeinspect.train.trainer import bundle_test_samples, infer, load_model, test_metrics


def infer_engine(backend: Backend, dataset: MVTecCategory, samples: Sequence[Sample], preprocess: Preprocess,
                 progress: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """Like :func:`trainer.infer` for an engine backend: maps, scores, engine ms per image."""
    maps, scores, seconds = [], [], 0.0
    for sample in tqdm(samples, desc="inference engine", disable=not progress, unit="img"):
        x = preprocess(dataset.load_image(sample))
        t0 = time.perf_counter()
        amap, score = backend.run(x)
        seconds += time.perf_counter() - t0
        maps.append(amap[0, 0])
        scores.append(float(score[0]))
    return np.stack(maps), np.array(scores), 1000.0 * seconds / max(len(samples), 1)


@dataclass
class Inference:
    """A bundle's anomaly maps and scores on its test split: what the metrics and the report are made of."""

    bundle: Bundle
    dataset: MVTecCategory
    samples: list[Sample]
    split: str          # which test images: test/, or the hold-out a supervised family recorded
    maps: np.ndarray    # N x H x W, model units
    scores: np.ndarray  # N
    ms_per_image: float
    decision: dict[str, Any]  # the threshold and min_region_area the engine is judged at
    engine: str         # torch or FORMAT:PRECISION


def run_inference(bundle_path: str | Path, data_root: str | Path, category: str, engine: str = "torch", *,
                  device: str = "cpu", progress: bool = True) -> Inference:
    """Run a bundle's PyTorch model or one of its engines over its test split (:func:`trainer.bundle_test_samples`).

    ``engine`` is ``torch`` or an engine selector (``onnx``, ``onnx:int8``, ``auto``...); an engine is
    judged at its own threshold (INT8 and faiss engines get one at export).
    """
    bundle = Bundle.open(bundle_path)
    dataset = MVTecCategory(data_root, category)
    samples, split = bundle_test_samples(bundle, dataset)
    preprocess = bundle.preprocess
    if engine == "torch":
        maps, scores, ms = infer(load_model(bundle, device), dataset, samples, preprocess, progress=progress)
        decision = bundle.decision
    else:
        entry, backend = open_engine(bundle, engine)
        maps, scores, ms = infer_engine(backend, dataset, samples, preprocess, progress)
        decision = bundle.engine_decision(entry)
        engine = f"{entry['format']}:{entry['precision']}"
    return Inference(bundle, dataset, list(samples), split, maps, scores, ms, decision, engine)


def evaluate(bundle_path: str | Path, data_root: str | Path, category: str, engine: str = "torch", *,
             device: str = "cpu", progress: bool = True, report_dir: str | Path | None = None) -> dict:
    """:func:`trainer.test_metrics` of a bundle on its test split (:func:`run_inference`), with ms per image
    (model/engine only); ``split`` in the result says which images. With ``report_dir``, also the plots and
    report.html of :func:`report.write_report` there.
    """
    run = run_inference(bundle_path, data_root, category, engine, device=device, progress=progress)
    metrics = test_metrics(run.dataset, run.samples, run.bundle.preprocess, run.maps, run.scores,
                           run.decision["threshold"], min_region_area=run.decision["min_region_area"])
    result = {**metrics, "split": run.split, "threshold": run.decision["threshold"], "engine": run.engine,
              "ms_per_image": run.ms_per_image, "bundle_id": run.bundle.bundle_id, "category": category,
              "data_root": str(Path(data_root).resolve())}
    if report_dir is not None:
        from edgeinspect.train.report import write_report

        write_report(report_dir, run, result)
    return result


