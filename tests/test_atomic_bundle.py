"""Bundles are never lost: built beside the target, swapped in whole; kill -9 leaves the old one intact."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import SYNTH_CATEGORY

from edgeinspect.bundle import MANIFEST, Bundle, bundle_target, staging_dir, swap_in
from edgeinspect.errors import BundleError


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path (directories and links included)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def _fake_bundle(path: Path, tag: str) -> None:
    """A small valid bundle whose every file says ``tag`` (to detect a mix of two bundles)."""
    bundle = Bundle(path, {
        "schema_version": 1, "bundle_id": tag, "model": {"family": "patchcore"},
        "preprocess": {"resize": [8, 8], "crop": None, "mean": [0, 0, 0], "std": [1, 1, 1]},
        "decision": {"threshold": 1.0, "normalization": {"center": 1.0, "scale": 1.0}, "min_region_area": 1},
        "files": {}, "engines": []})
    for i in range(5):
        bundle.add_file(f"f{i}", f"stats/f{i}.bin", (tag * 20_000).encode())
    bundle.save()


def test_a_reader_sees_the_old_or_the_new_bundle_never_a_mix(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    staged = staging_dir(target)
    _fake_bundle(staged, "v0")
    swap_in(staged, target)
    seen, errors, done = set(), [], threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                bundle = Bundle.open(target)
            except BundleError as exc:  # only when it changed on every one of the attempts
                errors.append(str(exc))
                continue
            seen.add(bundle.bundle_id)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(1, 40):
            staged = staging_dir(target)
            _fake_bundle(staged, f"v{i % 2}")
            swap_in(staged, target)
    finally:
        done.set()
        reader.join()
    assert seen == {"v0", "v1"}
    assert all("kept changing" in e for e in errors)
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging or old copies left


def test_without_an_atomic_exchange_the_old_bundle_is_renamed_aside(tmp_path: Path, monkeypatch) -> None:
    import edgeinspect.bundle as bundle_module

    monkeypatch.setattr(bundle_module, "_exchange", lambda a, b: False)
    target = tmp_path / "bundle"
    for tag in ("v0", "v1"):
        staged = staging_dir(target)
        _fake_bundle(staged, tag)
        swap_in(staged, target)
    assert Bundle.open(target).bundle_id == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_a_reader_in_the_gap_of_a_non_atomic_swap_waits_for_the_new_bundle(tmp_path: Path, monkeypatch) -> None:
    """Without an atomic exchange the path is absent between the two renames: Bundle.open looks again after a
    moment instead of reporting a missing bundle. The rename in happens during that moment (the wait itself)."""
    import edgeinspect.bundle as bundle_module

    target, staged = tmp_path / "bundle", tmp_path / "staged"
    _fake_bundle(staged, "v1")
    waits = []
    monkeypatch.setattr(bundle_module.time, "sleep", lambda s: (waits.append(s), staged.rename(target)))
    assert Bundle.open(target).bundle_id == "v1"
    assert waits == [bundle_module.SWAP_GAP_WAIT_S]
    monkeypatch.setattr(bundle_module.time, "sleep", lambda s: waits.append(s))  # nobody swaps it in this time
    with pytest.raises(BundleError, match="bundle not found"):
        Bundle.open(tmp_path / "never")
    assert len(waits) == 1 + (bundle_module.OPEN_ATTEMPTS - 1)  # the first test's wait, then one per retry


def test_leftovers_of_a_killed_writer_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    target = tmp_path / "b"
    dead = tmp_path / ".b.partial-999999999-dead"   # no such pid
    dead_old = tmp_path / ".b.old-999999999-dead"
    alive = tmp_path / f".b.partial-{os.getpid()}-live"
    other = tmp_path / ".bb.partial-999999999-x"     # another bundle's
    for path in (dead, dead_old, alive, other):
        path.mkdir()
    staged = staging_dir(target)
    assert not dead.exists() and not dead_old.exists() and alive.exists() and other.exists()
    assert staged.parent == tmp_path and staged.name.startswith(f".b.partial-{os.getpid()}-")


def _wait_for_staging(parent: Path, name: str, proc: subprocess.Popen, what: str, timeout: float = 240) -> Path:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = [p for p in parent.glob(f".{name}.partial-{proc.pid}-*") if (p / what).exists()]
        if found:
            return found[0]
        assert proc.poll() is None, f"the writer ended (rc {proc.returncode}) before its staging folder appeared"
        time.sleep(0.05)
    raise AssertionError(f"no staging folder with {what} after {timeout} s")


def _kill_and_check_unchanged(proc: subprocess.Popen, bundle: Path, before: dict[str, str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert tree_digest(bundle) == before
    info = subprocess.run([sys.executable, "-m", "edgeinspect", "info", str(bundle)], capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["bundle_id"] == json.loads((bundle / MANIFEST).read_text())["bundle_id"]


def test_kill_9_mid_train_overwrite_leaves_the_previous_bundle(patchcore_bundle: Path, synth_root: Path,
                                                              tmp_path: Path) -> None:
    bundle = tmp_path / "line" / "washer"
    shutil.copytree(patchcore_bundle, bundle)
    before = tree_digest(bundle)
    proc = subprocess.Popen([sys.executable, "-m", "edgeinspect", "-q", "train", "patchcore", "--data",
                             str(synth_root), "--category", SYNTH_CATEGORY, "--out", str(bundle), "--overwrite",
                             "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged = _wait_for_staging(bundle.parent, bundle.name, proc, ".")
    time.sleep(2.0)  # well inside feature extraction / coreset selection
    assert proc.poll() is None, "training finished before it could be killed"
    _kill_and_check_unchanged(proc, bundle, before)
    assert staged.exists()  # the half bundle is only ever in the staging folder ...
    staging_dir(bundle).rmdir()  # ... which the next writer removes
    assert not staged.exists()
    assert [p.name for p in bundle.parent.iterdir()] == ["washer"]


def test_kill_9_mid_export_leaves_the_previous_bundle(patchcore_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "washer"
    shutil.copytree(patchcore_bundle, bundle)
    before = tree_digest(bundle)
    proc = subprocess.Popen([sys.executable, "-m", "edgeinspect", "-q", "export", str(bundle), "--format", "onnx",
                             "--precision", "fp16"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # killed while the engine is written or checked in the staging copy (a fixed wait raced a quick export)
    _wait_for_staging(tmp_path, bundle.name, proc, "engines/.tmp-model_fp16.onnx")
    assert proc.poll() is None, "export finished before it could be killed"
    _kill_and_check_unchanged(proc, bundle, before)


def test_train_overwrite_replaces_the_whole_bundle(patchcore_bundle: Path, synth_root: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgeinspect.cli import main

    bundle = tmp_path / "b"
    shutil.copytree(patchcore_bundle, bundle)
    old_id = Bundle.open(bundle).bundle_id
    result = CliRunner().invoke(main, ["-q", "train", "padim", "--data", str(synth_root), "--category",
                                       SYNTH_CATEGORY, "--out", str(bundle), "--overwrite", "--device", "cpu",
                                       "--set", "model.n_features=20"])
    assert result.exit_code == 0, result.output
    new = Bundle.open(bundle)
    assert new.family == "padim" and new.bundle_id != old_id
    listed = {e["file"] for e in [*new.manifest["files"].values(), *new.engines,
                                  *new.manifest.get("reports", {}).values()]} | {MANIFEST}
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert on_disk == listed  # no orphaned engine of the old bundle
    assert [p.name for p in tmp_path.iterdir()] == ["b"]
    spec = new.manifest["input_images"]
    assert spec == {"height": [256, 256], "width": [256, 256], "channels": 3, "bit_depth": 8, "grayscale": False}


def test_export_writes_beside_and_swaps(padim_bundle: Path, tmp_path: Path) -> None:
    from edgeinspect.export.exporter import export_bundle

    bundle = tmp_path / "p"
    shutil.copytree(padim_bundle, bundle)
    [result] = export_bundle(bundle, "onnx", progress=False)
    assert result.path == bundle / "engines" / "model_fp32.onnx" and result.path.is_file()
    assert str(bundle) in result.detail and ".partial-" not in result.detail
    assert Bundle.open(bundle).find_engine("onnx", "fp32") is not None
    assert [p.name for p in tmp_path.iterdir()] == ["p"]


def test_a_symlinked_bundle_is_replaced_where_it_points(tmp_path: Path) -> None:
    real, link = tmp_path / "v1", tmp_path / "current"
    staged = staging_dir(real)
    _fake_bundle(staged, "old")
    swap_in(staged, real)
    link.symlink_to(real)
    target = bundle_target(link)
    staged = staging_dir(target)
    _fake_bundle(staged, "new")
    swap_in(staged, target)
    assert link.is_symlink() and Bundle.open(link).bundle_id == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v1"]
