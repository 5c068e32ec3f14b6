"""The schema of the parts of manifest.json the runtime relies on, checked when a bundle is opened.

Other keys (metrics, data summary, config) are free-form. Torch-free: the runtime reads bundles.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from edgeinspect.errors import BundleError
from edgeinspect.schema import integer, real, validation_errors

SCHEMA_VERSION = 1


class _Entry(BaseModel):
    model_config = ConfigDict(extra="allow")


class FileEntry(_Entry):
    """A file of the bundle: a relative path inside it, its sha256 and size."""

    file: str
    sha256: str
    bytes: integer(0)

    @field_validator("file")
    @classmethod
    def _inside(cls, file: str) -> str:
        path = PurePosixPath(file)
        if not file or "\\" in file or "\x00" in file or path.is_absolute() or ".." in path.parts:
            raise ValueError(f"{file!r} is outside the bundle (files must be relative paths inside it)")
        return file

    @field_validator("sha256")
    @classmethod
    def _hex(cls, digest: str) -> str:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{digest[:70]!r} is not a sha256 (64 hex digits)")
        return digest


class Normalization(_Entry):
    """Score normalisation: 0.5 at ``center``, +-0.5 per ``scale``."""

    center: real()
    scale: real(0.0, lo_open=True)


class Decision(_Entry):
    """What the runtime needs to decide OK/NOK."""

    threshold: real()
    normalization: Normalization
    min_region_area: integer(0)


class EngineEntry(FileEntry):
    """An exported engine."""

    format: str
    precision: str
    decision: Decision | None = None


class PreprocessEntry(_Entry):
    """How frames are turned into the model input."""

    resize: tuple[integer(1), integer(1)]
    crop: tuple[integer(1), integer(1)] | None = None
    mean: tuple[real(), real(), real()]
    std: tuple[real(0.0, lo_open=True), real(0.0, lo_open=True), real(0.0, lo_open=True)]
    interpolation: Literal["area", "linear", "cubic", "nearest", "auto"] = "area"
    color_order: Literal["RGB", "BGR"] = "RGB"


class InputImages(_Entry):
    """The training images as stored: side ranges, channels, bit depth (checked against every frame)."""

    height: tuple[integer(1), integer(1)]
    width: tuple[integer(1), integer(1)]
    channels: Literal[1, 3, 4]
    bit_depth: Literal[8, 16, 32, 64]
    grayscale: bool


class ModelEntry(_Entry):
    """What the model is (the rest is the family's hyperparameters)."""

    family: str


class DetectionEntry(_Entry):
    """How a detector's engine outputs become detections (the decoder's parameters are its own)."""

    decoder: str
    classes: list[str]
    ok_classes: list[str] = []


class Manifest(_Entry):
    """manifest.json, as far as the runtime reads it."""

    schema_version: Literal[1]
    bundle_id: str
    task: Literal["anomaly_map", "detections"] = "anomaly_map"  # absent: an anomaly model
    detection: DetectionEntry | None = None  # detectors only
    model: ModelEntry
    preprocess: PreprocessEntry
    input_images: InputImages | None = None
    decision: Decision
    files: dict[str, FileEntry]
    engines: list[EngineEntry]


def check_manifest(manifest: Any, where: object) -> None:
    """BundleError naming ``where`` and every problem, unless ``manifest`` is a readable manifest."""
    if not isinstance(manifest, dict):
        raise BundleError(f"{where} is not a manifest (a JSON object), but a {type(manifest).__name__}; "
                          f"the bundle is damaged: train or copy it again")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{where}: schema_version {version!r} is not supported "
                          f"(this edgeinspect reads {SCHEMA_VERSION}); use the edgeinspect that wrote it")
    try:
        Manifest.model_validate(manifest)
    except ValidationError as exc:
        raise BundleError(f"{where}: {'; '.join(validation_errors(exc, Manifest))}; "
                          f"the bundle is damaged: train or copy it again") from None
