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

import ctypes
import errno
import glob
import hashlib
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from edgeinspect.errors import BundleError
from edgeinspect.manifest import check_manifest
from edgeinspect.preprocess import Preprocess

MANIFEST = "manifest.json"
OPEN_ATTEMPTS = 3  # Bundle.open retries when the bundle was swapped while it was being read
SWAP_GAP_WAIT_S = 0.05  # and waits this long for a missing bundle (the gap of a swap without an atomic exchange)

log = logging.getLogger(__name__)


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


def _dir_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a directory: changes when a bundle is swapped in at ``path``; None when there is none
    (a path with a NUL byte included)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


class Bundle:
    """A model bundle directory and its manifest."""

    def __init__(self, path: str | Path, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest
        self._verified: set[str] = set()  # files whose sha256 was checked since opening
        self._dir_id = _dir_id(self.path)

    # ---------------------------------------------------------------- reading
    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True) -> Bundle:
        """Open a bundle; with ``verify`` check every listed file exists and matches its sha256.

        A bundle replaced (``train --overwrite``, ``export``) while it is being read is read again,
        so what is returned is the old or the new bundle, never a mix of both; a missing one is looked for
        again after a moment, as where no atomic exchange exists the path is absent between the two renames.
        """
        path = Path(path)
        for attempt in range(OPEN_ATTEMPTS):
            before = _dir_id(path)
            try:
                bundle = cls._read(path, verify)
            except (BundleError, OSError):
                if attempt == OPEN_ATTEMPTS - 1 or (before is not None and _dir_id(path) == before):
                    raise
                if before is None:
                    time.sleep(SWAP_GAP_WAIT_S)
                continue
            if bundle._dir_id == before and not bundle.replaced():
                return bundle
        raise BundleError(f"bundle {path} kept changing while it was read ({OPEN_ATTEMPTS} attempts); "
                          f"wait for the writer (train / export) to finish")

    @classmethod
    def _read(cls, path: Path, verify: bool) -> Bundle:
        manifest_path = path / MANIFEST
        if not path.is_dir():
            raise BundleError(f"bundle not found: {path} is not a directory")
        if not manifest_path.is_file():
            raise BundleError(f"bundle {path} has no {MANIFEST}")
        try:
            manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise BundleError(f"{manifest_path} is not valid JSON ({' '.join(str(exc).split())}); "
                              f"the bundle is damaged: train or copy it again") from None
        check_manifest(manifest, manifest_path)
        bundle = cls(path, manifest)
        if verify:
            for entry in [*manifest.get("files", {}).values(), *manifest.get("engines", [])]:
                bundle._verify(entry)
        return bundle

    def replaced(self) -> bool:
        """Whether another bundle was swapped in at this path since this one was opened."""
        return _dir_id(self.path) != self._dir_id

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
        """The decision an engine applies: its own when export gave it one (INT8, faiss), else the bundle's."""
        return entry.get("decision") or self.decision

    # ---------------------------------------------------------------- writing
    def add_file(self, key: str, relpath: str, data: bytes) -> None:
        """Write a file into the bundle and list it under ``files`` with its sha256."""
        atomic_write_bytes(self.path / relpath, data)
        self.manifest.setdefault("files", {})[key] = {
            "file": relpath, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        self._verified.add(relpath)

    def add_report(self, key: str, relpath: str, data: bytes) -> None:
        """Write a file for people (a plot) and list it under ``reports``; the runtime never reads these."""
        atomic_write_bytes(self.path / relpath, data)
        self.manifest.setdefault("reports", {})[key] = {"file": relpath, "sha256": hashlib.sha256(data).hexdigest()}

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
        """Write manifest.json atomically; BundleError, the old one kept, when a figure is NaN or infinity."""
        try:
            text = json.dumps(self.manifest, indent=2, sort_keys=False, allow_nan=False)
        except ValueError as exc:  # an undefined figure is recorded as null, never NaN
            raise BundleError(f"{self.path / MANIFEST} not written: a figure is NaN or infinity, which JSON cannot "
                              f"hold ({exc})") from None
        atomic_write_bytes(self.path / MANIFEST, (text + "\n").encode())

    def staged_copy(self, staged: Path) -> Bundle:
        """A copy of this bundle in ``staged`` (from :func:`staging_dir`), its checked files known as checked."""
        shutil.copytree(self.path, staged, symlinks=True, dirs_exist_ok=True)
        copy = Bundle(staged, json.loads(json.dumps(self.manifest)))
        copy._verified = set(self._verified)
        return copy

    def size_bytes(self) -> int:
        """Total size of every file in the bundle directory."""
        return size_path(self.path)


# -------------------------------------------------------------------- whole-bundle replacement
def _stale(path: Path) -> bool:
    """Whether ``path`` is a staging or set-aside sibling (``.<name>.partial|old-<pid>-<token>``) whose
    writer is no longer running."""
    kind, _, rest = path.name.rsplit(".", 1)[-1].partition("-")
    pid = rest.partition("-")[0]
    if kind not in ("partial", "old") or not path.is_dir():
        return False
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def bundle_target(path: str | Path) -> Path:
    """The directory a writer replaces: where a symlinked bundle path points, else the path itself."""
    path = Path(path)
    return path.resolve() if path.is_symlink() else path


def staging_dir(target: str | Path) -> Path:
    """A new empty sibling ``.<name>.partial-<pid>-<token>`` of ``target`` to build a bundle in.

    Siblings left by a writer that was killed (kill -9, power loss) are removed first, with a log line.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*-*-*"):
        if _stale(leftover):
            log.warning("removing %s, left by an interrupted train / export", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
    staged = target.parent / f".{target.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    staged.mkdir()
    return staged


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE, macOS renamex_np RENAME_SWAP).

    False where the system or file system cannot; OSError on a real failure.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2
        rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), 0x2)  # RENAME_SWAP
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(staged: Path, target: str | Path, *, sync_files: bool = True) -> None:
    """Put the complete bundle ``staged`` at ``target``; an existing bundle there is replaced atomically.

    With an atomic exchange a reader sees the old or the new directory at every instant. Without one
    (other systems, some network file systems) the old bundle is renamed aside first, so for a moment
    ``target`` does not exist; :meth:`Bundle.open` retries in that case. ``sync_files=False`` skips the
    per-file fsync (for folders of thousands of files that can be rebuilt, e.g. converted datasets).
    """
    target = Path(target)
    for path in (*staged.rglob("*"), staged) if sync_files else (staged,):  # on disk before the rename
        _fsync(path)
    if not target.exists():
        os.rename(staged, target)
    elif _exchange(staged, target):
        shutil.rmtree(staged)  # now the old bundle
    else:
        aside = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(target, aside)
        os.rename(staged, target)
        shutil.rmtree(aside)
    _fsync(target.parent)


@contextmanager
def staged_output(out: str | Path) -> Iterator[Path]:
    """A staging sibling of ``out`` to write a folder that can be rebuilt in (a dataset, a report), swapped in
    at ``out`` when the block ends without an error and removed when it raises: ``out`` is never left
    half-written. (No per-file fsync: such a folder can be rebuilt, and thousands of fsyncs cost seconds.)"""
    staged = staging_dir(out)
    try:
        yield staged
        swap_in(staged, out, sync_files=False)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
