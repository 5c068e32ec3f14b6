"""Shared fixtures: a small synthetic dataset, and PatchCore / PaDiM bundles trained on it once."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SYNTH_CATEGORY = "washer"
SYNTH_COUNTS = {"n_train": 60, "n_test_good": 12, "n_test_per_defect": 6}  # synth_root's images


def synth_test_images() -> int:
    """How many test images synth_root has: its good ones and those of every defect type."""
    from edgeinspect.train.data import DEFECT_TYPES

    return SYNTH_COUNTS["n_test_good"] + len(DEFECT_TYPES) * SYNTH_COUNTS["n_test_per_defect"]


def shared_category(relpath: str) -> Path:
    """A category folder of ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relpath
    if not path.is_dir():
        pytest.skip(f"real data not present: {path} (see the README, section Data and licences)")
    return path


def free_tcp_endpoint() -> str:
    """A tcp://127.0.0.1:<port> endpoint whose port was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


RUNNING_RUN = """
import sys, time
from edgeinspect.registry import recorded
with recorded("train", argv=["edgeinspect", "train", "padim"], registry=sys.argv[1], family="padim") as run:
    print(run.id, flush=True)
    time.sleep(600)
"""


@contextmanager
def running_run(registry: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """A process that records a run in ``registry`` and stays in it (it would finish it when it ends normally);
    yields the process and the run id. Killed with SIGKILL on the way out if the test did not end it."""
    proc = subprocess.Popen([sys.executable, "-c", RUNNING_RUN, str(registry)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        run_id = proc.stdout.readline().strip()
        assert run_id, f"the process recorded no run (exit code {proc.wait(timeout=60)})"
        yield proc, run_id
    finally:
        proc.kill()
        proc.wait(timeout=60)


@pytest.fixture(scope="session", autouse=True)
def private_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test's commands (and their subprocesses) record runs in a registry of their own, never the user's."""
    path = tmp_path_factory.mktemp("registry") / "registry.sqlite"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEINSPECT_REGISTRY", str(path))
        yield path


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic washer dataset (deterministic)."""
    from edgeinspect.train.data import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root, SYNTH_CATEGORY, seed=0, **SYNTH_COUNTS)
    return root


def _train(family: str, root: Path, out: Path, overrides: list[str] | None = None) -> Path:
    from edgeinspect.config import load_config
    from edgeinspect.train.trainer import train

    config = load_config(family, overrides=overrides or [])
    train(family, root, SYNTH_CATEGORY, out, config, device="cpu", progress=False)
    return out


@pytest.fixture(scope="session")
def patchcore_bundle(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PatchCore trained on the synthetic set, with its ONNX engine exported (parity checked)."""
    from edgeinspect.export.exporter import export_bundle

    out = _train("patchcore", synth_root, tmp_path_factory.mktemp("bundles") / "patchcore")
    export_bundle(out, "onnx", progress=False)
    return out


@pytest.fixture(scope="session")
def padim_bundle(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PaDiM trained on the synthetic set (no engine)."""
    return _train("padim", synth_root, tmp_path_factory.mktemp("bundles") / "padim")


@pytest.fixture(scope="session")
def padim_engine_bundle(padim_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the PaDiM bundle with its ONNX engine exported (a second bundle a daemon can serve)."""
    import shutil

    from edgeinspect.export.exporter import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "padim-engine"
    shutil.copytree(padim_bundle, out)
    export_bundle(out, "onnx", progress=False)
    return out


@pytest.fixture(scope="session")
def evaluated_run(patchcore_bundle: Path, synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``edgeinspect evaluate --report`` of the PatchCore bundle (ONNX engine) recorded in a registry of its own
    (read it, or copy it before adding runs): ``{"registry", "report", "run_id", "output"}``."""
    from click.testing import CliRunner

    from edgeinspect.cli import main
    from edgeinspect.registry import Registry

    tmp = tmp_path_factory.mktemp("evaluated")
    registry, report = tmp / "registry.sqlite", tmp / "report"
    result = CliRunner().invoke(main, ["-q", "--registry", str(registry), "evaluate", str(patchcore_bundle), "--data",
                                       str(synth_root), "--category", SYNTH_CATEGORY, "--engine", "onnx",
                                       "--report", str(report)])
    assert result.exit_code == 0, result.output
    with Registry.open(registry) as reg:
        (run,) = reg.list_runs()
    return {"registry": registry, "report": report, "run_id": run["id"], "output": result.output}


# ------------------------------------------------------------------------------ detectors (issue 7)
@pytest.fixture()
def tiny_detector_family(monkeypatch: pytest.MonkeyPatch) -> str:
    """tests/tiny_detector.TinySSD registered as a model family for one test."""
    from tiny_detector import FAMILY, TinySSD

    from edgeinspect.train.models import MODELS

    monkeypatch.setitem(MODELS, FAMILY, TinySSD)
    return FAMILY


@pytest.fixture(scope="session")
def detector_coco(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic parts as a COCO folder (``data coco``: one class per defect type plus ``good`` with a
    whole-image box on good images; good images of test/ only), 256 x 256 images."""
    from edgeinspect.train.data.coco import convert_mvtec

    out = tmp_path_factory.mktemp("coco") / SYNTH_CATEGORY
    convert_mvtec(synth_root, SYNTH_CATEGORY, out, good_class=True, good_images="test", progress=False)
    return out


@pytest.fixture(scope="session")
def detector_bundle(detector_coco: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A detector bundle with the contract's manifest (a small torchvision SSD's raw heads, anchors in
    stats/, the anchor_boxes decoder, ``good`` as ok class) and its ONNX FP32 engine, exported with the
    parity check on the COCO val images."""
    from tiny_detector import FAMILY, TinySSD, write_detector_bundle

    from edgeinspect.export.exporter import export_bundle
    from edgeinspect.train.data.coco import read_info
    from edgeinspect.train.models import MODELS

    out = write_detector_bundle(tmp_path_factory.mktemp("bundles") / "tinyssd", detector_coco,
                                read_info(detector_coco)["classes"], ok_classes=["good"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(MODELS, FAMILY, TinySSD)
        export_bundle(out, "onnx", progress=False)
    return out
