"""The model bundle: the one contract between training and the runtime.

A bundle is a directory::

    manifest.json            what the model is and how to feed it (see ARCHITECTURE.md)
    weights.npz              torch state dict as plain arrays (for re-export; no pickle)
    stats/*.npy              model statistics (PatchCore memory bank, PaDiM mean / inverse covariance)
    engines/<name>.<ext>     exported engines (ONNX, TensorRT plans, CoreML packages, a Triton model
                             repository), each listed in the manifest with its sha256; an engine that
                             is a directory is hashed over its files (see :func:`sha256_path`)

Nothing in a bundle is a pickle. This module needs only numpy and the standard library, so the
runtime can read bundles without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgeinspect.errors import BundleError
from edgeinspect.preprocess import Preprocess

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a directory: the digest of its sorted ``relpath sha256`` lines."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    lines = [f"{p.relative_to(path).as_posix()} {sha256_file(p)}\n"
             for p in sorted(path.rglob("*")) if p.is_file()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def size_path(path: str | Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file via a temporary sibling and rename, so a failure (full disk) leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Bundle:
    """A model bundle directory and its manifest."""

    def __init__(self, path: str | Path, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest
        self._verified: set[str] = set()  # files whose sha256 was checked since opening

    # ---------------------------------------------------------------- reading
    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True) -> Bundle:
        """Open a bundle; with ``verify`` check every listed file exists and matches its sha256."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not path.is_dir():
            raise BundleError(f"bundle not found: {path} is not a directory")
        if not manifest_path.is_file():
            raise BundleError(f"bundle {path} has no {MANIFEST}")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from exc
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(f"{manifest_path}: schema_version {version!r} is not supported "
                              f"(this edgeinspect reads {SCHEMA_VERSION})")
        bundle = cls(path, manifest)
        if verify:
            for entry in [*manifest.get("files", {}).values(), *manifest.get("engines", [])]:
                bundle._verify(entry)
        return bundle

    def _verify(self, entry: dict[str, Any]) -> Path:
        """Path of a listed file, its sha256 checked once per opened bundle."""
        file = self.path / entry["file"]
        if not file.exists():
            raise BundleError(f"bundle {self.path} is missing {entry['file']} (listed in {MANIFEST})")
        if entry["file"] not in self._verified:
            if sha256_path(file) != entry["sha256"]:
                raise BundleError(f"{file} does not match the sha256 in {MANIFEST}: the file was changed or corrupted")
            self._verified.add(entry["file"])
        return file

    @property
    def bundle_id(self) -> str:
        """Unique id of this bundle (family, backbone and a hash of its statistics)."""
        return self.manifest["bundle_id"]

    @property
    def family(self) -> str:
        """Model family, e.g. ``patchcore`` or ``padim``."""
        return self.manifest["model"]["family"]

    @property
    def preprocess(self) -> Preprocess:
        """The preprocessing the model was trained with."""
        return Preprocess.from_dict(self.manifest["preprocess"])

    @property
    def decision(self) -> dict[str, Any]:
        """Threshold and score normalisation: everything the runtime needs to decide OK/NOK."""
        return self.manifest["decision"]

    def file(self, key: str) -> Path:
        """Path of a file listed under ``files`` (e.g. ``weights``, ``memory_bank``)."""
        try:
            entry = self.manifest["files"][key]
        except KeyError:
            raise BundleError(f"bundle {self.path} has no file entry {key!r}") from None
        return self._verify(entry)

    def load_array(self, key: str) -> np.ndarray:
        """Load a .npy statistics file listed under ``files`` (no pickle allowed)."""
        return np.load(self.file(key), allow_pickle=False)

    @property
    def engines(self) -> list[dict[str, Any]]:
        """Manifest entries of the exported engines, in export order."""
        return list(self.manifest.get("engines", []))

    def find_engine(self, fmt: str, precision: str) -> dict[str, Any] | None:
        """The manifest entry of the engine of ``fmt`` at ``precision``, or None."""
        return next((e for e in self.engines if (e["format"], e["precision"]) == (fmt, precision)), None)

    def engine(self, fmt: str, precision: str = "fp32") -> tuple[Path, dict[str, Any]]:
        """(path, manifest entry) of the engine of a format and precision; BundleError if absent."""
        entry = self.find_engine(fmt, precision)
        if entry is not None:
            return self._verify(entry), entry
        have = [f"{e['format']}:{e['precision']}" for e in self.engines] or ["none"]
        raise BundleError(f"bundle {self.path} has no {fmt}:{precision} engine (it has: {', '.join(have)}); "
                          f"run: edgeinspect export {self.path} --format {fmt} --precision {precision}")

    def engine_decision(self, entry: dict[str, Any]) -> dict[str, Any]:
        """The decision an engine applies: its own when export recalibrated it (INT8), else the bundle's."""
        return entry.get("decision") or self.decision

    # ---------------------------------------------------------------- writing
    def add_file(self, key: str, relpath: str, data: bytes) -> None:
        """Write a file into the bundle and list it under ``files`` with its sha256."""
        atomic_write_bytes(self.path / relpath, data)
        self.manifest.setdefault("files", {})[key] = {
            "file": relpath, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        self._verified.add(relpath)

    def add_array(self, key: str, array: np.ndarray) -> None:
        """Store a statistics array as ``stats/<key>.npy``."""
        from io import BytesIO

        buf = BytesIO()
        np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
        self.add_file(key, f"stats/{key}.npy", buf.getvalue())

    def set_engine(self, entry: dict[str, Any]) -> None:
        """Record an engine already written under ``engines/`` (replaces one of the same format and precision)."""
        file = self.path / entry["file"]
        entry = {**entry, "sha256": sha256_path(file), "bytes": size_path(file)}
        self._verified.add(entry["file"])
        engines = [e for e in self.manifest.get("engines", [])
                   if (e["format"], e["precision"]) != (entry["format"], entry["precision"])]
        self.manifest["engines"] = [*engines, entry]

    def save(self) -> None:
        """Write manifest.json atomically."""
        text = json.dumps(self.manifest, indent=2, sort_keys=False, allow_nan=False)
        atomic_write_bytes(self.path / MANIFEST, (text + "\n").encode())

    def size_bytes(self) -> int:
        """Total size of every file in the bundle directory."""
        return size_path(self.path)
