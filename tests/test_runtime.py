"""Runtime without torch: predictor, post-processing, predict CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SYNTH_CATEGORY

from edgeinspect.bundle import Bundle
from edgeinspect.imageio import read_image
from edgeinspect.preprocess import Preprocess
from edgeinspect.runtime.postprocess import find_regions, map_regions, normalize
from edgeinspect.runtime.predictor import Predictor


def test_runtime_and_camera_import_without_torch() -> None:
    code = ("import sys, edgeinspect.runtime.daemon, edgeinspect.runtime.predictor, edgeinspect.camera, "
            "edgeinspect.cli; assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_predictor_verdicts_follow_the_bundle_threshold(patchcore_bundle: Path, synth_root: Path) -> None:
    predictor = Predictor(patchcore_bundle)
    test = synth_root / SYNTH_CATEGORY / "test"
    results = {p: predictor.predict(read_image(p)) for p in sorted(test.glob("*/*.png"))}
    for r in results.values():
        assert (r.verdict == "NOK") == (r.raw_score > r.raw_threshold)
        assert (r.score > 0.5) == (r.verdict == "NOK")
        assert r.anomaly_map.shape == (224, 224)
        assert set(r.latency_ms) == {"preprocess", "inference", "postprocess"}
        assert not (r.regions and r.verdict == "OK")  # an OK part carries no defect boxes
        for region in r.regions:  # boxes are in frame pixels (256 x 256 images)
            x0, y0, x1, y1 = region.box
            assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
    defective = [r for p, r in results.items() if p.parent.name != "good"]
    good = [r for p, r in results.items() if p.parent.name == "good"]
    # most defects are caught and most good parts pass (exact rates depend on the data; the default
    # threshold, mean + 2 sd of only 6 held-out good images here, trades some false rejects for catches)
    assert np.mean([r.verdict == "NOK" for r in defective]) >= 0.7
    assert np.mean([r.verdict == "OK" for r in good]) >= 0.6


def test_regions_map_back_to_frame_pixels() -> None:
    pre = Preprocess(resize=(100, 200), crop=None, mean=(0, 0, 0), std=(1, 1, 1))
    amap = np.zeros((100, 200), np.float32)
    amap[10:20, 50:70] = 5.0   # 10 x 20 input pixels
    amap[80:81, 0:3] = 5.0     # 3 pixels: below min_area
    regions = find_regions(amap, 1.0, 4, {"center": 1.0, "scale": 1.0}, pre, frame_hw=(200, 400))
    assert len(regions) == 1
    assert regions[0].box == (100, 20, 140, 40) and regions[0].area == 200 and regions[0].score == 1.0
    assert normalize(1.0, {"center": 1.0, "scale": 2.0}) == 0.5


def test_map_regions_labels_the_window_above_the_threshold_like_the_whole_map() -> None:
    import cv2

    rng = np.random.default_rng(0)
    for trial in range(20):
        amap = cv2.GaussianBlur(rng.random((64, 96), dtype=np.float32), (0, 0), 2 + trial % 3)
        threshold = float(np.quantile(amap, 0.9 + 0.005 * trial))
        n, labels, stats, _ = cv2.connectedComponentsWithStats((amap > threshold).astype(np.uint8), connectivity=8)
        whole = sorted(((int(x), int(y), int(x + w), int(y + h)), int(area), float(amap[labels == i].max()))
                       for i, (x, y, w, h, area) in enumerate(stats) if i and area >= 3)
        regions = map_regions(amap, threshold, 3)
        assert sorted(regions) == whole and len(whole) >= 1
        assert [area for _, area, _ in regions] == sorted((area for _, area, _ in regions), reverse=True)
    assert map_regions(np.zeros((8, 8), np.float32), 0.0, 1) == []
    with_nan = np.zeros((8, 8), np.float32)
    with_nan[2, 2] = np.nan  # a NaN maximum: nothing compares above the threshold, as with the whole map
    assert map_regions(with_nan, 0.5, 1) == [] and map_regions(np.ones((8, 8), np.float32), float("nan"), 1) == []


def test_auto_interpolation_shrinks_by_area_only_from_twice_the_input() -> None:
    import cv2

    pre = Preprocess(resize=(224, 224), crop=None, mean=(0, 0, 0), std=(1, 1, 1), interpolation="auto")
    rng = np.random.default_rng(0)
    for side, flag in ((256, cv2.INTER_LINEAR), (447, cv2.INTER_LINEAR), (448, cv2.INTER_AREA), (1080, cv2.INTER_AREA),
                       (200, cv2.INTER_LINEAR)):
        rgb = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        assert pre.cv2_flag(rgb.shape[:2]) == flag
        np.testing.assert_array_equal(pre.view(rgb), cv2.resize(rgb, (224, 224), interpolation=flag))
    assert Preprocess.from_dict(pre.to_dict()).interpolation == "auto"


def test_predict_cli_json_and_corrupt_image(patchcore_bundle: Path, synth_root: Path, tmp_path: Path) -> None:
    good = sorted((synth_root / SYNTH_CATEGORY / "test" / "good").glob("*.png"))[0]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    proc = subprocess.run([sys.executable, "-m", "edgeinspect", "-q", "predict", str(patchcore_bundle), str(good),
                           str(corrupt), "--json"], capture_output=True, text=True)
    assert proc.returncode == 1  # one image failed
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["image"] == str(good) and lines[0]["verdict"] in ("OK", "NOK")
    assert lines[0]["threshold"] == 0.5 and "raw_score" in lines[0]
    assert lines[1]["verdict"] == "ERROR" and str(corrupt) in lines[1]["error"]


def test_predictor_without_engine_says_how_to_export(padim_bundle: Path) -> None:
    from edgeinspect.errors import BundleError

    with pytest.raises(BundleError, match="edgeinspect export"):
        Predictor(padim_bundle)


def test_bundle_opens_without_optional_verification(patchcore_bundle: Path) -> None:
    assert Bundle.open(patchcore_bundle, verify=False).family == "patchcore"
