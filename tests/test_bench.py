"""``edgeinspect bench``'s harness: every engine timed alone in a fresh torch-free process, the backbone floor;
an engine that cannot be opened is its row's status (and ``--engine auto`` takes the next one)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from edgeinspect.bench import bench, find_images, measure_rss, time_isolated
from edgeinspect.bundle import Bundle
from edgeinspect.errors import BundleError
from edgeinspect.runtime.predictor import Predictor


@pytest.fixture(scope="module")
def damaged_int8(padim_engine_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the PaDiM bundle whose onnx:int8 engine (gate passed, sha256 matching) is no ONNX model."""
    copy = tmp_path_factory.mktemp("damaged") / "padim"
    shutil.copytree(padim_engine_bundle, copy)
    bundle = Bundle.open(copy)
    (copy / "engines" / "model_int8.onnx").write_bytes(b"not an ONNX model")
    bundle.set_engine({**bundle.find_engine("onnx", "fp32"), "file": "engines/model_int8.onnx", "precision": "int8"})
    bundle.save()
    return copy


def test_bench_rows_time_each_engine_against_the_backbone_floor(padim_engine_bundle: Path) -> None:
    report = bench(padim_engine_bundle, warmup=1, runs=4, rounds=2)
    rows = {(r["format"], r["precision"]): r for r in report["rows"]}
    assert set(rows) == {("onnx", "fp32"), ("backbone alone", "fp32"), ("backbone alone", "int8")}
    floor = rows["backbone alone", "fp32"]["engine_p50_ms"]
    assert floor > 0 and rows["backbone alone", "int8"]["engine_p50_ms"] > 0
    engine = rows["onnx", "fp32"]
    assert engine["status"] == "ok" and engine["verdict_agreement"] == 1.0 and engine["peak_rss_mb"] > 0
    assert engine["runtime_p50_ms"] > 0 and engine["engine_p50_ms"] > 0
    assert engine["x_backbone"] == pytest.approx(engine["runtime_p50_ms"] / floor, abs=0.01)
    assert "file" not in rows["backbone alone", "fp32"]  # the temporary graph's path is not reported


def test_each_round_is_a_fresh_process_without_torch(padim_engine_bundle: Path) -> None:
    from edgeinspect.bundle import Bundle

    root = Path(Bundle.open(padim_engine_bundle).manifest["data"]["root"])
    images = find_images(root)[:3]
    timed = time_isolated(padim_engine_bundle, ["onnx:fp32"], images, 1, warmup=1, runs=5, rounds=2)
    assert {k: len(v) for k, v in timed["onnx:fp32"].items()} == {"engine": 5, "runtime": 5}
    assert all(ms > 0 for ms in timed["onnx:fp32"]["runtime"])
    assert measure_rss(padim_engine_bundle, "onnx:fp32", images, 1, 2)["torch_imported"] is False


def test_an_engine_that_cannot_be_opened_is_its_rows_status(damaged_int8: Path) -> None:
    report = bench(damaged_int8, warmup=1, runs=2, rounds=1, backbone=False, rss=False)
    rows = {(r["format"], r["precision"]): r for r in report["rows"]}
    damaged, fp32 = rows["onnx", "int8"], rows["onnx", "fp32"]
    assert damaged["status"].startswith("cannot be opened: ONNX Runtime cannot load engine") and "\n" not in \
        damaged["status"]
    assert "runtime_p50_ms" not in damaged and "image_auroc" not in damaged
    assert fp32["status"] == "ok" and fp32["runtime_p50_ms"] > 0 and fp32["image_auroc"] is not None


def test_engine_auto_skips_an_engine_that_cannot_be_opened(damaged_int8: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edgeinspect.runtime.backends")
    assert Predictor(damaged_int8).engine == "onnx:fp32"  # onnx:int8 comes first in the auto order
    assert "--engine auto: skipping onnx:int8, which cannot be opened: ONNX Runtime cannot load engine" in caplog.text
    with pytest.raises(BundleError, match="ONNX Runtime cannot load engine"):  # named, it is not replaced
        Predictor(damaged_int8, engine="onnx:int8")
