"""Export a bundle's model to an engine, prove parity, and record the engine in the manifest."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from edgeinspect.bundle import Bundle
from edgeinspect.errors import ExportError
from edgeinspect.export.formats import get_format
from edgeinspect.export.parity import Parity, compare
from edgeinspect.runtime.backends import OnnxRuntimeBackend
from edgeinspect.train.data import MVTecCategory
from edgeinspect.train.evaluate import infer_engine
from edgeinspect.train.trainer import infer, load_model

log = logging.getLogger(__name__)

# Allowed max |delta| of map and score relative to the threshold, per precision.
PARITY_TOLERANCE = {"fp32": 1e-3}


def export_bundle(bundle_path: str | Path, fmt: str = "onnx", precision: str = "fp32", *,
                  data_root: str | Path | None = None, category: str | None = None,
                  progress: bool = True) -> tuple[Path, Parity]:
    """Write the engine, check it against PyTorch on the bundle's test images, record it.

    The images come from the dataset recorded in the manifest unless ``data_root``/``category``
    are given. An engine whose parity fails is deleted and ExportError carries the figures.
    """
    bundle = Bundle.open(bundle_path)
    engine_format = get_format(fmt)
    if precision not in engine_format.precisions:
        raise ExportError(f"{fmt} export supports precision {list(engine_format.precisions)}, not {precision!r}")
    data = bundle.manifest["data"]
    dataset = MVTecCategory(data_root or data["root"], category or data["category"])
    samples = dataset.test_samples()

    model = load_model(bundle, "cpu")
    rel = f"engines/model_{precision}{engine_format.suffix}"
    path = bundle.path / rel
    metadata = {"bundle_id": bundle.bundle_id, "family": bundle.family, "precision": precision,
                "preprocess": bundle.manifest["preprocess"], "decision": bundle.decision,
                "edgeinspect_version": bundle.manifest["edgeinspect_version"]}
    t0 = time.perf_counter()
    engine_format.exporter(model, path, tuple(bundle.manifest["input"]["shape"]), metadata)
    export_seconds = time.perf_counter() - t0

    preprocess = bundle.preprocess
    torch_maps, torch_scores, torch_ms = infer(model, dataset, samples, preprocess, batch_size=1, progress=progress)
    backend = OnnxRuntimeBackend(path)
    engine_maps, engine_scores, engine_ms = infer_engine(backend, dataset, samples, preprocess, progress)
    parity = compare(torch_maps, torch_scores, engine_maps, engine_scores, bundle.decision["threshold"],
                     PARITY_TOLERANCE[precision])
    if not parity.passed:
        path.unlink(missing_ok=True)
        raise ExportError(f"{fmt}/{precision} engine refused, parity failed: {parity.describe()}")
    bundle.set_engine({"file": rel, "format": fmt, "precision": precision, "runs_on": engine_format.runs_here,
                       "input": bundle.manifest["input"], "parity": parity.to_dict(),
                       "export_seconds": round(export_seconds, 2),
                       "ms_per_image": {"torch_cpu": round(torch_ms, 2), "engine_cpu": round(engine_ms, 2)}})
    bundle.save()
    log.info("%s/%s engine written to %s; parity %s", fmt, precision, path, parity.describe())
    return path, parity
