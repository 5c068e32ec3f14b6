"""Evaluate a bundle on an MVTec-layout test split with the PyTorch model or an exported engine; the engine
side of a detector's evaluation on a COCO split."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

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


def evaluate(bundle_path: str | Path, data_root: str | Path, category: str, engine: str = "torch", *,
             device: str = "cpu", progress: bool = True) -> dict:
    """:func:`trainer.test_metrics` of a bundle on its test split, with ms per image (model/engine only).

    The test split is :func:`trainer.bundle_test_samples`: test/, or the hold-out a supervised family
    recorded in the bundle (``split`` in the result says which).

    ``engine`` is ``torch`` or an engine selector (``onnx``, ``onnx:int8``, ``auto``...); an engine is
    judged at its own threshold (INT8 engines are recalibrated at export).
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
    metrics = test_metrics(dataset, samples, preprocess, maps, scores, decision["threshold"],
                           min_region_area=decision["min_region_area"])
    return {**metrics, "split": split, "threshold": decision["threshold"], "engine": engine, "ms_per_image": ms,
            "bundle_id": bundle.bundle_id, "category": category, "data_root": str(Path(data_root).resolve())}


