"""The inspector's models: bundles served by the torch-free runtime, their test-split scores, thresholds.

Nothing here imports torch or FastAPI: a :class:`Model` is a :class:`~edgeinspect.runtime.predictor.Predictor`
plus what the dashboard needs around it (a heatmap PNG per prediction, the raw scores and labels of the
bundle's recorded test split for the threshold slider, a session threshold override or a saved decision).
"""

from __future__ import annotations

import base64
import io
import logging
import threading
import zipfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgeinspect.bundle import Bundle
from edgeinspect.errors import EdgeInspectError
from edgeinspect.runtime.postprocess import bundle_task, normalize
from edgeinspect.runtime.predictor import Predictor

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 20 * 1024 * 1024    # one uploaded image (or one member of a zip, uncompressed)
MAX_BATCH_BYTES = 100 * 1024 * 1024   # one /api/predict/batch request (several images or a zip)
MAX_BATCH_IMAGES = 64                 # images in one batch request (zip members included)
MAX_PIXELS = 40_000_000               # width x height of an uploaded image (checked from the header where it can)
MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}


class UploadError(EdgeInspectError):
    """An upload that cannot be judged; ``status`` is the HTTP status it answers (4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def image_kind(data: bytes) -> str | None:
    """``PNG``, ``JPEG``, ``BMP`` or ``TIFF`` from the file's first bytes, or None."""
    return next((kind for magic, kind in MAGIC.items() if data.startswith(magic)), None)


def decode_upload(name: str, data: bytes) -> np.ndarray:
    """Decode an uploaded image as it is stored (OpenCV layout); UploadError naming the file and the problem."""
    if not data:
        raise UploadError(400, f"{name}: the file is empty (0 bytes)")
    if len(data) > MAX_IMAGE_BYTES:
        raise UploadError(413, f"{name}: {len(data)} bytes, over the limit of {MAX_IMAGE_BYTES} bytes per image")
    kind = image_kind(data)
    if kind is None:
        raise UploadError(415, f"{name}: not an image (PNG, JPEG, BMP or TIFF expected; the file starts with "
                               f"{data[:8]!r})")
    if kind == "PNG" and len(data) >= 24:  # IHDR: width and height before decoding anything
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        if width * height > MAX_PIXELS:
            raise UploadError(413, f"{name}: {width}x{height} pixels, over the limit of {MAX_PIXELS} pixels")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise UploadError(400, f"{name}: cannot decode this {kind} file ({len(data)} bytes): corrupt or truncated")
    return image


def zip_images(name: str, data: bytes) -> list[tuple[str, bytes]]:
    """The image members of an uploaded zip as (name, bytes), checked against the batch limits before reading."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX/")
                   and not Path(m.filename).name.startswith(".")]
        if len(members) > MAX_BATCH_IMAGES:
            raise UploadError(413, f"{name}: {len(members)} files, over the limit of {MAX_BATCH_IMAGES} per batch")
        big = next((m for m in members if m.file_size > MAX_IMAGE_BYTES), None)
        if big is not None:
            raise UploadError(413, f"{name}: {big.filename} is {big.file_size} bytes uncompressed, over the limit "
                                   f"of {MAX_IMAGE_BYTES} bytes per image")
        return [(f"{name}/{m.filename}", archive.read(m)) for m in members]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as exc:
        raise UploadError(400, f"{name}: not a readable zip file ({exc})") from None


def heatmap_png(anomaly_map: np.ndarray, normalization: dict) -> str:
    """The anomaly map as a base64 RGBA PNG: JET colours of the normalised score (0.5 = the threshold),
    transparent where the score is low, so it can lie over the image."""
    norm = np.asarray(normalize(anomaly_map, normalization), np.float32)
    bgr = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    alpha = (np.clip((norm - 0.2) / 0.3, 0.0, 1.0) * 190).astype(np.uint8)
    ok, png = cv2.imencode(".png", np.dstack([bgr, alpha]))
    assert ok, "PNG encoding of a uint8 image cannot fail"
    return base64.b64encode(png.tobytes()).decode("ascii")


class Model:
    """One bundle loaded for the inspector: its predictor (threshold override included) and test-split scores."""

    def __init__(self, model_id: str, path: str | Path, *, engine: str = "auto", convert_frames: bool = False):
        self.id = model_id
        self.path = Path(path)
        self.selector = engine
        self.base = Predictor(Bundle.open(self.path), engine=engine, convert_frames=convert_frames)
        self.predictor = self.base
        self.task = bundle_task(self.base.bundle)
        self._lock = threading.Lock()  # threshold changes (predictions read self.predictor once, atomically)
        self.test = self._score_test_split()

    @property
    def bundle(self) -> Bundle:
        """The bundle as it was opened."""
        return self.base.bundle

    # ------------------------------------------------------------------------------------- the test split
    def _score_test_split(self) -> dict[str, Any]:
        """Raw scores and labels (True: defective) of the bundle's recorded test split, or why there are none.

        The images come from :func:`bench.bundle_test_images` (an anomaly bundle's ``test/``, a detector's COCO
        test split); the raw score is the runtime's own (an anomaly score, a detector's highest defect confidence),
        NOK when it meets the threshold by the post-processing's ``rule``."""
        from edgeinspect.bench import bundle_test_images
        from edgeinspect.imageio import read_raw

        try:
            test = bundle_test_images(self.bundle)
        except (EdgeInspectError, OSError, KeyError) as exc:
            return {"error": f"no test split: {' '.join(str(exc).split())}", "scores": [], "labels": [], "names": []}
        scores, labels, names, skipped = [], [], [], 0
        root = test.paths[0].parents[2] if test.paths else Path()
        for path, label in zip(test.paths, test.labels, strict=True):
            try:
                rgb, _ = self.base.check(read_raw(path))
                scores.append(round(self.base.predict(rgb).raw_score, 6))
            except EdgeInspectError as exc:
                skipped += 1
                log.warning("test image skipped: %s", exc)
                continue
            labels.append(bool(label))
            names.append(path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name)
        return {"error": None, "scores": scores, "labels": labels, "names": names, "skipped": skipped,
                "description": test.description}

    # ------------------------------------------------------------------------------------- predictions
    def predict(self, name: str, data: bytes) -> dict[str, Any]:
        """The verdict of one uploaded image, with its heatmap (anomaly bundles) and the frame size."""
        raw = decode_upload(name, data)
        predictor = self.predictor
        rgb, conversions = predictor.check(raw)  # FrameError (a DataError) when refused
        prediction = predictor.predict(rgb)
        h, w = rgb.shape[:2]
        result = {"image": name, "model": self.id, "task": self.task, **prediction.to_dict(),
                  "frame": {"width": w, "height": h}, "heatmap": None}
        if conversions:
            result["conversions"] = conversions
        if prediction.anomaly_map is not None:
            mh, mw = prediction.anomaly_map.shape[-2:]
            result["heatmap"] = {"png_base64": heatmap_png(prediction.anomaly_map, predictor.normalization),
                                 "box": list(predictor.preprocess.box_to_frame((0, 0, mw, mh), (h, w)))}
        return result

    # ------------------------------------------------------------------------------------- thresholds
    def set_threshold(self, threshold: float | None, *, save: bool = False) -> dict[str, Any]:
        """Override the decision threshold (model units) for this session, or with ``save`` write it into the
        bundle as its new decision (the active engine's own decision when it has one, e.g. INT8); None goes
        back to the bundle's. Returns what changed."""
        with self._lock:
            previous = self.predictor.threshold
            if threshold is None:
                self.predictor = self.base
            else:
                self.predictor = self.base.with_threshold(threshold)
            if save:
                self._save_decision(self.predictor.decision, previous=self.base.threshold)
                self.base = self.predictor
        return {"previous": previous, "threshold": self.predictor.threshold, "saved": save}

    def _save_decision(self, decision: dict[str, Any], *, previous: float) -> None:
        """Write ``decision`` into the bundle's manifest atomically (verified first: a bundle changed on disk is
        refused rather than overwritten with a stale manifest)."""
        bundle = Bundle.open(self.path)
        if bundle.bundle_id != self.bundle.bundle_id:
            raise UploadError(409, f"the bundle at {self.path} is now {bundle.bundle_id}, not the loaded "
                                   f"{self.bundle.bundle_id}: load it again before saving a threshold")
        new = {**decision, "set_by": "inspector", "previous_threshold": previous}
        entry = bundle.find_engine(self.base.engine_entry["format"], self.base.engine_entry["precision"])
        if entry is not None and entry.get("decision"):
            entry["decision"] = new  # the engine's own decision (INT8, faiss) is the one it applies
        else:
            bundle.manifest["decision"] = new
        bundle.save()

    # ------------------------------------------------------------------------------------- description
    def summary(self) -> dict[str, Any]:
        """JSON-ready description for /api/status and the dashboard."""
        bundle, predictor = self.bundle, self.predictor
        manifest = bundle.manifest
        return {"id": self.id, "bundle_id": bundle.bundle_id, "path": str(self.path), "family": bundle.family,
                "task": self.task, "engine": predictor.engine,
                "engines": [f"{e['format']}:{e['precision']}" for e in bundle.engines],
                "category": (manifest.get("data") or {}).get("category"),
                "threshold": predictor.threshold, "bundle_threshold": self.base.threshold,
                "override": predictor is not self.base,
                "rule": predictor.postprocess.rule,
                "metrics": manifest.get("metrics") or {},
                "test_split": {"n": len(self.test["scores"]), "error": self.test["error"]}}
