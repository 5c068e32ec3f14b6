"""Bundle writes are atomic: a failing disk leaves the previous file intact."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from edgeinspect.bundle import MANIFEST, Bundle, atomic_write_bytes, sha256_file
from edgeinspect.errors import BundleError


def test_full_disk_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "manifest.json"
    atomic_write_bytes(target, b'{"old": true}')

    def no_space(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, b'{"new": true}')
    assert target.read_bytes() == b'{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_sha256_of_written_file(tmp_path: Path) -> None:
    import hashlib

    atomic_write_bytes(tmp_path / "sub" / "x.bin", b"abc")
    assert sha256_file(tmp_path / "sub" / "x.bin") == hashlib.sha256(b"abc").hexdigest()


def test_a_nan_figure_is_refused_and_the_manifest_kept(tmp_path: Path) -> None:
    bundle = Bundle(tmp_path, {"bundle_id": "b", "metrics": {"image_auroc": 0.9}})
    bundle.save()
    before = (tmp_path / MANIFEST).read_bytes()
    bundle.manifest["metrics"]["image_auroc"] = float("nan")
    with pytest.raises(BundleError, match="manifest.json not written: a figure is NaN or infinity"):
        bundle.save()
    assert (tmp_path / MANIFEST).read_bytes() == before
