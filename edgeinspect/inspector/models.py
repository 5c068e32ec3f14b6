"""The inspector's models: bundles served by the torch-free runtime, their test-split scores, thresholds.

Nothing here imports torch or FastAPI: a :class:`Model` is a :class:`~edgeinspect.runtime.predictor.Predictor`
plus what the dashboard needs around it (a heatmap PNG per prediction, the raw scores and labels of the
bundle's recorded test split for the threshold slider, a session threshold override or a saved decision).
"""

from __future__ import annotations

import base64
import io
import logging
import lzma
import threading
import zipfile
import zlib
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


ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError, RuntimeError,
              OSError, zlib.error, lzma.LZMAError)  # a corrupt, truncated, encrypted or unsupported zip


def batch_images(uploads: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The images of a batch request as (name, bytes): each upload, or the members of an uploaded zip.

    The zips' directories are checked against the batch limits (images, bytes per image and per batch, counted
    uncompressed over all uploads) before any member is read, and each member is read only up to its limit.
    UploadError: 413 over a limit, 400 for a zip that cannot be read (naming it)."""
    listed: list[tuple[str, bytes | tuple[zipfile.ZipFile, zipfile.ZipInfo]]] = []
    for name, data in uploads:
        if data.startswith(b"PK\x03\x04"):
            listed.extend((f"{name}/{m.filename}", (archive, m)) for archive, m in _zip_members(name, data))
        else:
            listed.append((name, data))
    if len(listed) > MAX_BATCH_IMAGES:
        raise UploadError(413, f"{len(listed)} images (zip members included), over the limit of {MAX_BATCH_IMAGES} "
                               f"per batch")
    declared = sum(len(item) if isinstance(item, bytes) else item[1].file_size for _, item in listed)
    if declared > MAX_BATCH_BYTES:
        raise UploadError(413, f"{declared} bytes of images (zip members uncompressed), over the limit of "
                               f"{MAX_BATCH_BYTES} bytes per batch")
    files: list[tuple[str, bytes]] = []
    left = MAX_BATCH_BYTES
    for name, item in listed:
        data = item if isinstance(item, bytes) else _read_member(name, *item, min(MAX_IMAGE_BYTES, left))
        left -= len(data)
        files.append((name, data))
    return files


def _zip_members(name: str, data: bytes) -> list[tuple[zipfile.ZipFile, zipfile.ZipInfo]]:
    """The files of an uploaded zip (no folders, macOS metadata or hidden files), none read yet; a member over
    the per-image limit by its declared size is refused."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX/")
                   and not Path(m.filename).name.startswith(".")]
    except ZIP_ERRORS as exc:
        raise UploadError(400, f"{name}: not a readable zip file ({' '.join(str(exc).split())})") from None
    big = next((m for m in members if m.file_size > MAX_IMAGE_BYTES), None)
    if big is not None:
        raise UploadError(413, f"{name}: {big.filename} is {big.file_size} bytes uncompressed, over the limit "
                               f"of {MAX_IMAGE_BYTES} bytes per image")
    return [(archive, m) for m in members]


def _read_member(name: str, archive: zipfile.ZipFile, member: zipfile.ZipInfo, limit: int) -> bytes:
    """A zip member's bytes, reading at most ``limit`` + 1 of them whatever its declared size (413 beyond)."""
    try:
        with archive.open(member) as fh:
            data = fh.read(limit + 1)
    except ZIP_ERRORS as exc:
        raise UploadError(400, f"{name}: cannot be read from its zip file ({' '.join(str(exc).split())})") from None
    if len(data) > limit:
        raise UploadError(413, f"{name}: over the limit of {MAX_IMAGE_BYTES} bytes per image or {MAX_BATCH_BYTES} "
                               f"bytes per batch when uncompressed")
    return data


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
            predictor = self.base if threshold is None else self.base.with_threshold(threshold)
            if save:  # written first: a refused save changes nothing
                self._save_decision(predictor.decision, previous=self.base.threshold)
                self.base = predictor
            self.predictor = predictor
        return {"previous": previous, "threshold": predictor.threshold, "saved": save}

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
