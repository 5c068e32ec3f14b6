"""``edgeinspect bench``'s harness: every engine timed alone in a fresh torch-free process, the backbone floor."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeinspect.bench import bench, find_images, measure_rss, time_isolated


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
