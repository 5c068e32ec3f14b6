"""Detector runtime: decoders against torchvision, mask polygons, the verdict schema, a daemon serving a
detector bundle over ZeroMQ, and export parity of a detector."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_daemon import _serve_to_end
from tiny_detector import TinySSD

from edgeinspect.bundle import Bundle
from edgeinspect.config import load_config
from edgeinspect.errors import ConfigError, ExportError
from edgeinspect.export.exporter import export_bundle
from edgeinspect.export.parity import DetectionGate, compare_detections, match_detections
from edgeinspect.imageio import read_image
from edgeinspect.preprocess import Preprocess
from edgeinspect.runtime.detections import AnchorBoxes, Detections, FinalDetections, box_iou, mask_polygon
from edgeinspect.runtime.postprocess import find_regions, normalize, postprocess_for
from edgeinspect.runtime.predictor import Predictor
from edgeinspect.train.data.coco import CocoSplit
from edgeinspect.train.detection import predict, predict_engine
from edgeinspect.train.trainer import load_model


def _assert_same_detections(ours, theirs: dict[str, torch.Tensor]) -> None:
    """Same boxes (IoU >= 0.99, or equal where clamping left no area), labels and scores (1e-5), in order."""
    assert len(ours) == len(theirs["scores"]) > 0
    np.testing.assert_array_equal(ours.labels, theirs["labels"].numpy())
    np.testing.assert_allclose(ours.scores, theirs["scores"].numpy(), atol=1e-5)
    boxes = theirs["boxes"].numpy()
    same = (np.diag(box_iou(ours.boxes, boxes)) >= 0.99) | np.isclose(ours.boxes, boxes, atol=1e-4).all(axis=1)
    assert same.all()


def _random_heads(n_anchors: int, n_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    regression = torch.randn(1, n_anchors, 4, generator=g) * 2.0
    regression[0, :7, 2:] = 40.0  # beyond bbox_xform_clip: the clamp must apply
    return regression, torch.randn(1, n_anchors, n_classes + 1, generator=g) * 3.0


def test_anchor_decoder_matches_torchvision_ssd300() -> None:
    from torchvision.models.detection import ssd300_vgg16
    from torchvision.models.detection.image_list import ImageList

    model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=4).eval()
    x = torch.zeros(1, 3, 300, 300)
    with torch.no_grad():
        features = list(model.backbone(x).values())
    anchors = model.anchor_generator(ImageList(x, [(300, 300)]), features)[0]
    config = {"box_coder_weights": list(model.box_coder.weights), "score_thresh": model.score_thresh,
              "nms_thresh": model.nms_thresh, "topk_candidates": model.topk_candidates,
              "detections_per_img": model.detections_per_img}
    decoder = AnchorBoxes(config, anchors.numpy(), (300, 300))
    for seed in range(3):
        regression, logits = _random_heads(len(anchors), 3, seed)
        [theirs] = model.postprocess_detections({"bbox_regression": regression, "cls_logits": logits}, [anchors],
                                                [(300, 300)])
        ours = decoder({"bbox_regression": regression.numpy(), "cls_logits": logits.numpy()})
        _assert_same_detections(ours, theirs)
        assert len(ours) == model.detections_per_img  # random heads: the per-image cut applies
        assert ours.boxes.min() >= 0 and ours.boxes.max() <= 300


@pytest.mark.parametrize("score_thresh,topk", [(0.2, 5), (0.6, 400)])
def test_anchor_decoder_matches_torchvision_small_ssd(score_thresh: float, topk: int) -> None:
    model = TinySSD(["scratch", "crack"], (64, 96)).eval()
    model.ssd.score_thresh, model.ssd.topk_candidates = score_thresh, topk
    config = {**model.decoder_config(), "score_thresh": score_thresh, "topk_candidates": topk}
    decoder = AnchorBoxes(config, model.anchors.numpy(), (64, 96))
    regression, logits = _random_heads(len(model.anchors), 2, 7)
    [theirs] = model.ssd.postprocess_detections({"bbox_regression": regression, "cls_logits": logits},
                                                [model.anchors], [(64, 96)])
    _assert_same_detections(decoder({"bbox_regression": regression.numpy(), "cls_logits": logits.numpy()}), theirs)


def test_final_detections_sorted_and_polygon_follows_the_mask() -> None:
    masks = np.zeros((2, 1, 40, 60), np.float32)
    masks[0, 0, 5:15, 10:30] = 0.9     # a 10 x 20 rectangle
    masks[1, 0, 20:30, 40:50] = 0.4    # below 0.5: no pixel of the instance
    decoded = FinalDetections({}, None, (40, 60))({
        "boxes": np.array([[40, 20, 50, 30], [10, 5, 30, 15]], np.float32), "labels": np.array([2, 1]),
        "scores": np.array([0.3, 0.8], np.float32), "masks": masks[::-1].copy()})
    assert decoded.scores.tolist() == pytest.approx([0.8, 0.3]) and decoded.labels.tolist() == [1, 2]
    polygon = mask_polygon(decoded.masks[0])
    assert polygon.min(axis=0).tolist() == [10, 5] and polygon.max(axis=0).tolist() == [29, 14]
    assert mask_polygon(decoded.masks[1]) is None


# ------------------------------------------------------------------------------------ verdict schema
def _final_bundle(tmp_path: Path, threshold: float = 0.5) -> Bundle:
    """An in-memory detector bundle (final_detections decoder): 100 x 100 input, classes scratch, good."""
    manifest = {"task": "detections", "outputs": {"boxes": [-1, 4], "labels": [-1], "scores": [-1],
                                                  "masks": [-1, 1, 100, 100]},
                "preprocess": Preprocess((100, 100), None, (0, 0, 0), (1, 1, 1)).to_dict(),
                "detection": {"decoder": "final_detections", "classes": ["scratch", "good"], "ok_classes": ["good"]},
                "decision": {"threshold": threshold, "normalization": {"center": threshold, "scale": threshold},
                             "min_region_area": 0}}
    return Bundle(tmp_path, manifest)


def _outputs(scores: list[float], labels: list[int]) -> tuple[np.ndarray, ...]:
    boxes = np.array([[10, 20, 30, 60], [0, 0, 100, 100], [50, 50, 60, 70]], np.float32)[:len(scores)]
    masks = np.zeros((len(scores), 1, 100, 100), np.float32)
    for k, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        masks[k, 0, y0:y1, x0:x1] = 0.9
    return boxes, np.array(labels, np.int64), np.array(scores, np.float32), masks


def test_detection_verdict_follows_confidence_and_ok_classes(tmp_path: Path) -> None:
    bundle = _final_bundle(tmp_path)
    post = postprocess_for(bundle, bundle.decision)
    frame_hw = (200, 300)  # larger than the 100 x 100 input, not square: x scales by 3, y by 2
    nok = post(_outputs([0.8, 0.95, 0.3], [1, 2, 1]), frame_hw)
    assert nok.nok and nok.raw_score == pytest.approx(0.8) and nok.anomaly_map is None
    assert [(r.label, round(r.score, 2)) for r in nok.regions] == [("good", 0.95), ("scratch", 0.8)]
    scratch = nok.regions[1].to_dict()
    assert scratch["box"] == [30, 40, 90, 120] and scratch["area"] == 20 * 40
    xs, ys = zip(*scratch["polygon"], strict=True)
    assert (min(xs), max(xs), min(ys), max(ys)) == (30, 87, 40, 118)  # last mask pixel 29, 59 -> 87, 118
    # a good-class detection, however confident, and a scratch below the threshold: OK
    ok = post(_outputs([0.4, 0.99], [1, 2]), frame_hw)
    assert not ok.nok and ok.raw_score == pytest.approx(0.4) and [r.label for r in ok.regions] == ["good"]
    assert normalize(ok.raw_score, bundle.decision["normalization"]) < 0.5
    assert not post(_outputs([], []), frame_hw).nok
    bundle.manifest["detection"]["mask_threshold"] = 0.95  # the bundle's own mask threshold: no pixel passes
    strict = postprocess_for(bundle, bundle.decision)(_outputs([0.8], [1]), frame_hw)
    assert strict.regions[0].area == 0 and strict.regions[0].polygon is None


def test_regions_keep_their_old_keys_and_gain_a_label() -> None:
    pre = Preprocess(resize=(50, 50), crop=None, mean=(0, 0, 0), std=(1, 1, 1))
    amap = np.zeros((50, 50), np.float32)
    amap[10:20, 10:20] = 3.0
    [region] = find_regions(amap, 1.0, 1, {"center": 1.0, "scale": 1.0}, pre, (50, 50))
    assert region.to_dict() == {"box": [10, 10, 20, 20], "area": 100, "score": 1.0, "label": "anomaly"}
    assert Preprocess((50, 100), (40, 80), (0, 0, 0), (1, 1, 1)).box_to_frame((0, 0, 80, 40), (100, 200)) == \
        (20, 10, 180, 90)  # the crop offset (5, 10) then the scale 2


# ------------------------------------------------------------------------------------------ export
def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_detector_fp32_engine_passes_its_gate(detector_bundle: Path) -> None:
    [entry] = _manifest(detector_bundle)["engines"]
    parity = entry["parity"]
    assert entry["format"] == "onnx" and parity["status"] == "passed" and parity["passed"]
    assert parity["n_images"] == len(list((_manifest(detector_bundle)["data"]["root"] / Path("val/images")).glob("*")))
    assert parity["n_reference"] > 0 and parity["n_matched"] == parity["n_reference"]
    assert parity["min_matched_iou"] >= 0.99 and parity["max_abs_score_delta"] <= 1e-4
    assert parity["verdict_agreement"] == 1.0 and parity["gate"]["min_iou"] == 0.99
    assert "decision" not in entry  # a confidence threshold is kept as it is


def test_tampered_detector_engine_is_refused(detector_bundle: Path, tiny_detector_family: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import edgeinspect.export.onnx as onnx_export

    write_fp32 = onnx_export.write_fp32

    def tampered(model: torch.nn.Module, *args: object) -> None:
        model = copy.deepcopy(model)
        with torch.no_grad():
            for p in model.head.classification_head.parameters():
                p.add_(0.05 * torch.randn_like(p))
        write_fp32(model, *args)

    monkeypatch.setattr(onnx_export, "write_fp32", tampered)
    copy_path = tmp_path / "b"
    shutil.copytree(detector_bundle, copy_path)
    with pytest.raises(ExportError, match="gate failed.*(unmatched|confidence)"):
        export_bundle(copy_path, "onnx", progress=False)
    kept = Bundle.open(copy_path).find_engine("onnx", "fp32")  # the engine exported before stays, unchanged
    assert kept["sha256"] == _manifest(detector_bundle)["engines"][0]["sha256"]


def test_core_ml_refuses_a_whole_detector_graph(detector_bundle: Path, tiny_detector_family: str,
                                               tmp_path: Path) -> None:
    copy_path = tmp_path / "b"
    shutil.copytree(detector_bundle, copy_path)
    manifest = _manifest(copy_path)
    manifest["detection"]["decoder"] = "final_detections"
    (copy_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="Core ML cannot take this tinyssd model: the engine is the whole detector"):
        export_bundle(copy_path, "coreml", progress=False)
    with pytest.raises(ConfigError, match="--category washer: a detector bundle is checked on its COCO"):
        export_bundle(copy_path, "onnx", category="washer", progress=False)


def test_engine_predictions_match_the_pytorch_model(detector_bundle: Path, detector_coco: Path,
                                                    tiny_detector_family: str) -> None:
    """evaluate --engine onnx's predictions (runtime Predictor and decoder) against evaluate --engine torch's."""
    bundle = Bundle.open(detector_bundle)
    images = CocoSplit(detector_coco, "val")
    ours = predict_engine(bundle, "onnx:fp32", images, progress=False)
    theirs = predict(load_model(bundle), images, bundle.preprocess, progress=False)
    assert [p["image_id"] for p in ours] == [p["image_id"] for p in theirs] == images.image_ids
    for a, b in zip(ours, theirs, strict=True):
        assert a["boxes"].dtype == np.float32 and set(a) == {"image_id", "boxes", "labels", "scores"}
        # near-equal confidences may swap places: matched as the export gate matches (IoU >= 0.99, class)
        pairs, unmatched_ours, unmatched_theirs = match_detections(
            Detections.from_arrays(a["boxes"], a["labels"], a["scores"]),
            Detections.from_arrays(b["boxes"], b["labels"], b["scores"]), 0.99, 0.0)
        assert len(pairs) == len(b["scores"]) == len(a["scores"]) and unmatched_ours == unmatched_theirs == 0
        assert max((abs(a["scores"][i] - b["scores"][j]) for i, j, _ in pairs), default=0.0) < 1e-5


# ------------------------------------------------------------------------------------------ daemon
def test_daemon_serves_a_detector_bundle_over_zeromq(detector_bundle: Path, detector_coco: Path) -> None:
    """A real `edgeinspect serve` process, an image folder as camera, a SUB socket on loopback."""
    folder = detector_coco / "val" / "images"
    verdicts, statuses = _serve_to_end(detector_bundle, folder)
    frames = sorted(folder.glob("*.png"))
    assert [v["frame_name"] for v in verdicts] == [p.name for p in frames]
    assert statuses[-1]["state"] == "stopped" and statuses[-1]["errors"] == 0
    manifest = _manifest(detector_bundle)
    threshold = manifest["decision"]["threshold"]
    predictor = Predictor(detector_bundle)  # the same runtime in this process: the same messages
    for path, v in zip(frames, verdicts, strict=True):
        assert v["bundle_id"] == manifest["bundle_id"] and v["engine"] == "onnx:fp32"
        assert {"verdict", "score", "threshold", "raw_score", "raw_threshold", "regions", "latency_ms"} <= set(v)
        assert "anomaly_map" not in v and v["raw_threshold"] == pytest.approx(threshold, abs=1e-6)
        assert (v["verdict"] == "NOK") == (v["raw_score"] >= threshold) == (v["score"] >= 0.5)
        for region in v["regions"]:  # 256 x 256 frames, 64 x 64 input: boxes in frame pixels
            assert set(region) == {"box", "area", "score", "label"}
            assert region["label"] in manifest["detection"]["classes"]
            x0, y0, x1, y1 = region["box"]
            assert 0 <= x0 <= x1 <= 256 and 0 <= y0 <= y1 <= 256 and region["score"] >= threshold - 1e-6
        assert any(r["label"] != "good" for r in v["regions"]) == (v["verdict"] == "NOK")
        here = predictor.predict(read_image(path)).to_dict()
        assert (here["verdict"], len(here["regions"])) == (v["verdict"], len(v["regions"]))
        assert here["raw_score"] == pytest.approx(v["raw_score"], abs=1e-6)
    assert {v["verdict"] for v in verdicts} == {"OK", "NOK"}  # the bundle's threshold splits these images


def test_detector_int8_calibrates_on_the_train_split_and_keeps_its_threshold(
        detector_bundle: Path, detector_coco: Path, tiny_detector_family: str, tmp_path: Path) -> None:
    copy_path = tmp_path / "b"
    shutil.copytree(detector_bundle, copy_path)
    [result] = export_bundle(copy_path, "onnx", "int8", progress=False)
    assert result.status == "written" and result.parity.passed
    entry = Bundle.open(copy_path).find_engine("onnx", "int8")
    n_train = len(CocoSplit(detector_coco, "train"))
    assert entry["int8"]["calibration_images"] == n_train and not entry["int8"]["statistics_refit_on_int8_features"]
    assert "decision" not in entry and entry["parity"]["gate"] == load_config("export")["detections"]["int8"]
    parity, gate = entry["parity"], entry["parity"]["gate"]  # accuracy control on the val split's ground truth
    assert 0.0 <= parity["map50"] <= 1.0 and parity["reference_map50"] - parity["map50"] <= gate["max_map50_drop"]
    predictor = Predictor(copy_path, engine="onnx:int8")
    assert predictor.threshold == _manifest(copy_path)["decision"]["threshold"]


def test_detection_gate_counts_unmatched_above_min_score_and_leaves_out_borderline_images() -> None:
    def dets(boxes: list, labels: list, scores: list) -> Detections:
        return Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64),
                          np.array(scores, np.float32))

    reference = [dets([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]], [1, 1, 2], [0.9, 0.6, 0.02]),
                 dets([[0, 0, 10, 10]], [1], [0.51])]
    engine = [dets([[20, 20, 40, 40], [0, 0, 10, 10.5]], [1, 1], [0.6, 0.9]),  # one box moved: IoU 0.95
              dets([[0, 0, 10, 10]], [1], [0.49])]                               # a borderline flip
    gate = DetectionGate(min_iou=0.99, score_tolerance=1e-4, min_score=0.05, max_unmatched=0.0,
                         min_verdict_agreement=1.0, borderline_band=0.05)
    parity = compare_detections(reference, engine, np.array([True, True]), np.array([True, False]),
                                np.array([0.9, 0.51]), 0.5, gate)
    assert (parity.n_reference, parity.n_matched) == (3, 2)  # the 0.02 one is below min_score: not counted
    assert (parity.unmatched_reference, parity.unmatched_engine) == (1, 1)
    assert parity.n_borderline == 1 and parity.verdict_agreement == 1.0 and parity.verdict_agreement_all == 0.5
    assert parity.max_abs_score_delta == pytest.approx(0.02, abs=1e-6)
    assert not parity.passed and len(parity.failures) == 2 and "unmatched" in parity.failures[0]
    loose = DetectionGate(0.9, 0.05, 0.05, 0.0, 1.0, 0.05)
    assert compare_detections(reference, engine, np.array([True, True]), np.array([True, False]),
                              np.array([0.9, 0.51]), 0.5, loose).passed
    # INT8's accuracy control: unmatched detections are not counted, the mAP@0.5 drop is
    accuracy = DetectionGate(0.99, None, 0.05, None, 1.0, 0.05, max_map50_drop=0.01)
    args = (reference, engine, np.array([True, True]), np.array([True, False]), np.array([0.9, 0.51]), 0.5, accuracy)
    kept = compare_detections(*args, map50=(0.80, 0.795))
    assert kept.passed and (kept.reference_map50, kept.map50) == (0.80, 0.795) and "mAP@0.5 0.7950" in kept.describe()
    assert compare_detections(*args, map50=(0.80, 0.70)).failures == ["bbox mAP@0.5 drop 0.1000 > 0.01"]
    with pytest.raises(ValueError, match="map50"):
        compare_detections(*args)


def test_bench_measures_a_detector_bundle_on_its_coco_split(detector_bundle: Path) -> None:
    from edgeinspect.bench import bench, markdown_table

    report = bench(detector_bundle, warmup=1, runs=3, rounds=1, rss=False)
    [row] = report["rows"]  # no backbone reference rows: a detector trains its backbone
    assert (row["format"], row["precision"], row["status"]) == ("onnx", "fp32", "ok")
    assert row["runtime_p50_ms"] > 0 and row["verdict_agreement"] == 1.0
    assert 0.0 <= row["image_auroc"] <= 1.0  # untrained weights: any value, but from labelled images
    # data coco of an MVTec layout draws a test split (test_ratio), the one training reported on
    assert report["bundle"]["category"] == "COCO test" and report["bundle"]["n_images"] == len(
        CocoSplit(_manifest(detector_bundle)["data"]["root"], "test"))
    assert "COCO test" in markdown_table(report)


def test_reduced_precision_needs_nodes_under_the_low_precision_modules(
        detector_bundle: Path, tiny_detector_family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TinySSD, "low_precision_modules", ("extractor",))  # no such submodule: nothing to quantize
    copy_path = tmp_path / "b"
    shutil.copytree(detector_bundle, copy_path)
    with pytest.raises(ExportError, match="no node of the ONNX graph is under /extractor/"):
        export_bundle(copy_path, "onnx", "fp16", progress=False)
