"""SSD: the family on synthetic parts turned into a small COCO folder (a short training run that learns,
the bundle, resume, evaluation), the detection metrics on hand-made cases, the config and the CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeinspect.bundle import Bundle
from edgeinspect.config import load_config
from edgeinspect.errors import BundleError, ConfigError
from edgeinspect.train.data import synthesize
from edgeinspect.train.data.coco import convert_mvtec
from edgeinspect.train.detection import open_split
from edgeinspect.train.trainer import load_model

SIZE = 128  # synthetic image side and model input: small enough for one CPU core
FAST = ["preprocess.input_size=[128,128]", "train.epochs=12", "train.batch_size=8", "train.lr=0.003",
        "train.map_every=6", "train.warmup_epochs=0.5", "model.neck_channels=64",
        "model.extra_channels=[64,64]", "model.aspect_ratios=[[2],[2],[2],[2],[2]]", "model.min_ratio=0.1",
        "model.train_backbone_stages=0"]  # the frozen trunk with its cached features (the default trains it all)


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth_det")
    synthesize(root, "washer", seed=1, n_train=1, n_test_good=6, n_test_per_defect=15, size=SIZE)
    convert_mvtec(root, "washer", root / "coco", classes_mode="single", good_images="test", train_ratio=0.9,
                  test_ratio=0.0, progress=False)  # no test split: training reports on val, evaluate defaults to it
    return root / "coco"


@pytest.fixture(scope="module")
def ssd_bundle(coco_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgeinspect.train.detection import train

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("bundles") / "ssd"
    train("ssd", coco_dir, out, load_config("ssd", overrides=FAST), device="cpu", progress=False)
    return out


def test_config_defaults_and_schema() -> None:
    config = load_config("ssd")
    assert config["preprocess"]["input_size"] == [300, 300] and config["decision"]["conf"] == 0.5
    assert config["model"]["train_backbone_stages"] == 7 and config["train"]["crop"] == 0.0
    with pytest.raises(ConfigError, match="aspect_ratios"):
        load_config("ssd", overrides=["model.aspect_ratios=[[2]]"])
    with pytest.raises(ConfigError, match="conf"):
        load_config("ssd", overrides=["decision.conf=1.5"])


def test_default_ssd300_layout_and_detect_is_torchvision_postprocess() -> None:
    from torchvision.models.detection.ssd import SSD

    from edgeinspect.train.trainer import build_model

    config = load_config("ssd")
    model = build_model("ssd", {**config["model"], "classes": ["a", "b"]}, (300, 300), pretrained=False).eval()
    assert model.anchors.shape == (8732, 4)  # SSD300's 38/19/10/5/3/1 maps with 4/6/6/6/4/4 boxes per cell
    assert model.statistics()["anchors"].dtype == np.float32
    x = torch.randn(2, 3, 300, 300)
    bbox, logits = model(x)
    assert bbox.shape == (2, 8732, 4) and logits.shape == (2, 8732, 3)
    ours = model.detect(x)
    theirs = SSD.postprocess_detections(model.ssd, {"bbox_regression": bbox, "cls_logits": logits},
                                        [model.anchors] * 2, [(300, 300)] * 2)
    for a, b in zip(ours, theirs, strict=True):
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(a[key], b[key])
    trainable = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert {"extractor", "extras"} <= trainable or "head" in {n.split(".")[1] for n, p in model.named_parameters()}
    frozen_stem = model.ssd.backbone.extractor.trunk._conv_stem.weight
    assert not frozen_stem.requires_grad


def test_fpn_neck_feeds_deep_features_to_the_fine_maps_and_exports(tmp_path: Path) -> None:
    """``model.neck: fpn``: the finest map changes with the deepest stage (the conv neck's does not), the
    layout and anchors stay the conv neck's, and the traced ONNX graph gives the PyTorch outputs."""
    import onnxruntime as ort

    from edgeinspect.export.onnx import write_fp32
    from edgeinspect.train.trainer import build_model

    overrides = ["model.extra_channels=[64,64]", "model.aspect_ratios=[[2],[2],[2],[2],[2]]"]
    models = {neck: build_model("ssd", {**load_config("ssd", overrides=[*overrides, f"model.neck={neck}"])["model"],
                                        "classes": ["a"]}, (128, 128), pretrained=False).eval()
              for neck in ("conv", "fpn")}
    assert models["fpn"].anchors.shape == models["conv"].anchors.shape
    x = torch.randn(1, 3, 128, 128)
    for neck, model in models.items():
        with torch.no_grad():
            stages = model.frozen_features(x)
            finest = model.ssd.backbone.tail(stages)["0"]
            deeper = model.ssd.backbone.tail([*stages[:-1], stages[-1] + 1.0])["0"]
        assert finest.shape[1] == 128
        assert (not torch.equal(finest, deeper)) == (neck == "fpn")
    path = tmp_path / "fpn.onnx"
    write_fp32(models["fpn"], path, (1, 3, 128, 128), ["bbox_regression", "cls_logits"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = models["fpn"](x)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-4)


def test_vgg16_without_weights_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    from edgeinspect.train.trainer import build_model

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("no internet")

    monkeypatch.setattr(torchvision.models.VGG16_Weights.IMAGENET1K_FEATURES.__class__, "get_state_dict", offline)
    config = load_config("ssd", overrides=["model.backbone=vgg16"])
    with pytest.raises(ConfigError, match="--weights PATH"):
        build_model("ssd", {**config["model"], "classes": ["a"]}, (300, 300))
    with pytest.raises(ConfigError, match="300, 300"):
        build_model("ssd", {**config["model"], "classes": ["a"]}, (256, 256), pretrained=False)


def test_vgg16_is_torchvisions_ssd300(tmp_path: Path) -> None:
    import torchvision

    from edgeinspect.train.trainer import build_model

    reference = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=3)
    weights = tmp_path / "ssd300.pth"
    torch.save(reference.state_dict(), weights)  # a whole SSD300 checkpoint: all but the class scores load
    config = load_config("ssd", overrides=["model.backbone=vgg16", f"model.weights={weights}"])
    model = build_model("ssd", {**config["model"], "classes": ["a", "b"]}, (300, 300)).eval()
    assert model.anchors.shape == (8732, 4)
    ours = model.ssd.state_dict()
    assert ours.keys() == reference.state_dict().keys()
    assert all(torch.equal(ours[k], v) for k, v in reference.state_dict().items())


def test_detection_metrics_on_known_cases() -> None:
    from pycocotools.coco import COCO

    from edgeinspect.train.detection import detection_metrics

    coco = COCO()  # two images: one with a defect box, one good
    coco.dataset = {"images": [{"id": 1, "height": 100, "width": 100}, {"id": 2, "height": 100, "width": 100}],
                    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20],
                                     "area": 400, "iscrowd": 0}],
                    "categories": [{"id": 1, "name": "scratch"}, {"id": 2, "name": "good"}]}
    coco.createIndex()
    hit = {"image_id": 1, "boxes": np.array([[10, 10, 30, 30]], np.float32), "labels": np.array([1]),
           "scores": np.array([0.9], np.float32)}
    good_ok = {"image_id": 2, "boxes": np.array([[0, 0, 100, 100]], np.float32), "labels": np.array([2]),
               "scores": np.array([0.99], np.float32)}
    m = detection_metrics(coco, [hit, good_ok], 0.5, ["good"])
    assert m["bbox"]["map50"] == pytest.approx(1.0)
    assert m["bbox"]["ap50_per_class"] == {"scratch": pytest.approx(1.0)}  # `good` has no ground truth
    # a second scratch the model misses: that class's AP@0.5 halves (one of two found, at the top score)
    coco.dataset["annotations"].append({"id": 2, "image_id": 2, "category_id": 1, "bbox": [50, 50, 20, 20],
                                        "area": 400, "iscrowd": 0})
    coco.createIndex()
    half = detection_metrics(coco, [hit, good_ok], 0.5, ["good"])["bbox"]
    assert half["ap50_per_class"]["scratch"] == pytest.approx(0.5, abs=0.01) == half["map50"]
    coco.dataset["annotations"].pop()
    coco.createIndex()
    assert m["confusion"] == {"tp": 1, "fn": 0, "fp": 0, "tn": 1}
    assert m["f1"] == 1.0 and m["defect_detection_rate"] == 1.0 and m["mean_confidence"] == pytest.approx(0.9)
    # without `good` being ok, the full-image good box makes the good image NOK
    assert detection_metrics(coco, [hit, good_ok], 0.5, [])["confusion"]["fp"] == 1
    # below conf: the defect is missed at image level, mAP (no conf cut) is unchanged
    low = {**hit, "scores": np.array([0.3], np.float32)}
    m = detection_metrics(coco, [low, good_ok], 0.5, ["good"])
    assert m["confusion"]["fn"] == 1 and m["defect_detection_rate"] == 0.0 and m["bbox"]["map50"] == pytest.approx(1.0)


def test_crops_leave_the_order_and_flips_of_a_run_without_them(coco_dir: Path) -> None:
    """The crops draw from their own stream: turning ``train.crop`` on changes which images are cropped, not the
    order or the flips of the epochs (the same images in the same order as the run without crops)."""
    from edgeinspect.preprocess import Preprocess
    from edgeinspect.train.detection import DetectionBatches

    split = open_split(coco_dir, "train")
    preprocess = Preprocess(resize=(SIZE, SIZE), crop=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    runs = [DetectionBatches(split, preprocess, 4, shuffle=True, hflip=0.5, vflip=0.5, crop=crop, seed=3)
            for crop in (0.0, 0.5)]
    for epoch in range(2):
        plain, cropped = ([key for _, _, keys in run.epoch(epoch) for key in keys] for run in runs)
        assert plain == cropped and len(plain) == len(split)


def test_random_iou_crop_moves_boxes_and_masks_with_the_image() -> None:
    from edgeinspect.train.detection import DetectionBatches, _iou_crop

    x = torch.zeros(3, 96, 96)
    masks = torch.zeros(2, 96, 96, dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 20.0, 40.0, 50.0], [60.0, 8.0, 90.0, 30.0]])
    for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        masks[k, y0:y1, x0:x1] = 1
        x[k, y0:y1, x0:x1] = 1.0  # channel k shows instance k
    target = {"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks}
    generator = torch.Generator().manual_seed(0)
    cropped_any = False
    for _ in range(30):
        xi, ti = _iou_crop(x, target, generator)
        assert xi.shape == x.shape and ti["masks"].shape[1:] == (96, 96)
        assert len(ti["boxes"]) == len(ti["labels"]) == len(ti["masks"]) >= 1
        cropped_any |= len(ti["boxes"]) < 2 or not torch.equal(ti["boxes"], boxes)
        for box, label, mask in zip(ti["boxes"], ti["labels"], ti["masks"], strict=True):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            drawn = torch.nonzero(xi[int(label) - 1] > 0.5, as_tuple=True)
            for found in ((xs, ys), (drawn[1], drawn[0])):  # the mask and the image's own instance
                span = torch.tensor([found[0].min(), found[1].min(), found[0].max() + 1, found[1].max() + 1])
                assert torch.allclose(span.float(), box, atol=2.5), (span, box)
    assert cropped_any
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    assert _iou_crop(x, empty, generator)[0] is x  # a negative image is left whole
    assert DetectionBatches.__init__.__kwdefaults__["crop"] == 0.0


def test_training_learns_boxes_on_the_defects(ssd_bundle: Path, coco_dir: Path) -> None:
    from edgeinspect.train.detection import _iou, predict
    from edgeinspect.train.trainer import load_model

    bundle = Bundle.open(ssd_bundle)
    history = bundle.manifest["training"]["history"]
    assert history["train_loss"][-1] < 0.6 * history["train_loss"][0]
    assert history["val_loss"][-1] < 0.6 * history["val_loss"][0]
    assert history["val_map50"][-1] > history["val_map50"][0]
    model = load_model(bundle)
    split = open_split(coco_dir, "train")
    predictions = predict(model, split, bundle.preprocess, progress=False)
    hits = total = 0
    for i, p in enumerate(predictions):
        gt = split.load(i)[1]["boxes"]
        if len(gt) == 0:
            continue
        total += 1
        top = p["boxes"][:3]  # the three most confident detections
        hits += bool(len(top)) and float(_iou(gt, top).max()) >= 0.3
    assert total >= 40 and hits / total >= 0.6, (hits, total)  # 0.8 measured


def test_a_bundle_trained_from_a_weights_file_reloads_without_it(ssd_bundle: Path, tmp_path: Path) -> None:
    """A detector's manifest names the file it was trained from (``model.weights``); the bundle's own weights.npz
    holds every tensor, so it reloads on a machine without that file and predicts the same."""
    copy = tmp_path / "ssd"
    shutil.copytree(ssd_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["model"]["weights"] = str(tmp_path / "gone" / "lite0.pth")  # not on this machine
    (copy / "manifest.json").write_text(json.dumps(manifest))
    x = torch.rand(1, 3, *Bundle.open(ssd_bundle).manifest["model"]["input_size"])
    with torch.no_grad():
        expected, reloaded = load_model(Bundle.open(ssd_bundle))(x), load_model(Bundle.open(copy))(x)
    for a, b in zip(expected, reloaded, strict=True):
        torch.testing.assert_close(a, b)


def test_bundle_contents(ssd_bundle: Path) -> None:
    bundle = Bundle.open(ssd_bundle)
    m = bundle.manifest
    assert m["task"] == "detections" and m["model"]["family"] == "ssd" and m["model"]["classes"] == ["defect"]
    anchors = bundle.load_array("anchors")
    assert m["outputs"] == {"bbox_regression": [1, len(anchors), 4], "cls_logits": [1, len(anchors), 2]}
    assert m["detection"]["decoder"] == "anchor_boxes" and m["detection"]["ok_classes"] == []
    assert m["detection"]["box_coder_weights"] == [10.0, 10.0, 5.0, 5.0]
    assert m["decision"]["threshold"] == 0.5 and m["decision"]["normalization"]["center"] == 0.5
    for name in ("config.json", "history.json", "checkpoints/best.pt", "checkpoints/last.pt",
                 "reports/training_curves.png", "reports/predictions.json", "weights.npz"):
        assert (ssd_bundle / name).is_file(), name
    assert json.loads((ssd_bundle / "history.json").read_text())["val_loss"] == m["training"]["history"]["val_loss"]
    assert "val_map50" in m["training"]["history"] and m["metrics"]["split"] == "val"
    assert not (ssd_bundle.parent / "ssd.work").exists()
    assert m["bundle_id"].startswith("ssd-efficientnet_lite0-")


def test_resume_continues_an_interrupted_run(coco_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    from edgeinspect.train import detection

    config = load_config("ssd", overrides=[*FAST, "train.epochs=2", "train.map_every=0", "train.save_every=1",
                                           "train.best_by=val_loss", "train.ema_epochs=1"])
    out = tmp_path / "b"
    calls = {"n": 0}
    real = detection.validation_loss

    def crash_in_second_epoch(*args: object, **kwargs: object) -> dict[str, float]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(detection, "validation_loss", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        detection.train("ssd", coco_dir, out, config, device="cpu", progress=False)
    assert (tmp_path / "b.work" / "checkpoints" / "last.pt").is_file() and not out.exists()
    with pytest.raises(BundleError, match="--resume"):
        detection.train("ssd", coco_dir, out, config, device="cpu", progress=False)
    monkeypatch.setattr(detection, "validation_loss", real)
    bundle = detection.train("ssd", coco_dir, out, config, device="cpu", progress=False, resume=True)
    history = bundle.manifest["training"]["history"]
    assert len(history["val_loss"]) == 2 and bundle.manifest["metrics"]["epochs"] == 2
    assert (out / "checkpoints" / "epoch_1.pt").is_file() and (out / "checkpoints" / "epoch_2.pt").is_file()
    with pytest.raises(ConfigError, match="map_every"):  # nothing to rank the epochs by
        by_map = {**config, "train": {**config["train"], "best_by": "val_map50"}}
        detection.train("ssd", coco_dir, tmp_path / "c", by_map, device="cpu", progress=False)
    # a finished run is extended from the bundle's own checkpoints (replacing the bundle: --overwrite); the
    # rule that picks the kept checkpoint comes from this call: here the last epoch, whose weight average
    # (train.ema_epochs, carried through both resumes) is what the bundle keeps
    longer = load_config("ssd", overrides=[*FAST, "train.epochs=3", "train.best_by=last"])
    with pytest.raises(BundleError, match="--overwrite"):
        detection.train("ssd", coco_dir, out, longer, device="cpu", progress=False, resume=True)
    extended = detection.train("ssd", coco_dir, out, longer, device="cpu", progress=False, resume=True,
                               overwrite=True)
    assert extended.manifest["training"]["history"]["val_loss"][:2] == history["val_loss"]
    assert len(extended.manifest["training"]["history"]["val_loss"]) == 3
    assert extended.manifest["metrics"]["epochs"] == 3
    assert extended.manifest["metrics"]["best_epoch"] == 3 and extended.manifest["metrics"]["best_by"] == "last"
    last = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    kept = load_model(extended, "cpu").state_dict()
    assert all(torch.equal(kept[k], v) for k, v in last["average"].items() if k in kept)
    assert last["average_updates"] == 3 * math.ceil(len(detection.open_split(coco_dir, "train")) / 8)  # steps
    assert any(not torch.equal(kept[k], v) for k, v in last["model"].items() if k in kept)  # not the raw weights


def test_weight_average_follows_the_weights_with_a_capped_decay() -> None:
    from edgeinspect.train.detection import WeightAverage

    model = torch.nn.Linear(2, 1)
    torch.nn.init.zeros_(model.weight)
    average = WeightAverage(model, span_steps=100)  # decay 0.99, capped early by (1 + n) / (10 + n)
    assert average.decay == pytest.approx(0.99)
    expected = torch.zeros(1, 2)
    for n in range(1, 4):
        with torch.no_grad():
            model.weight.fill_(float(n))
        average.update(model)
        decay = (1 + n) / (10 + n)
        expected = decay * expected + (1 - decay) * n
        assert torch.allclose(average.model.weight, expected)
    assert not average.model.weight.requires_grad and model.weight.requires_grad


def test_selection_score_ranks_epochs_by_the_rule() -> None:
    from edgeinspect.train.detection import selection_score

    epochs = [{"val_loss": 3.0}, {"val_loss": 2.0, "val_map50": 0.4}, {"val_loss": 2.5, "val_map50": 0.6}]
    def kept(rule: str) -> int:
        scored = [(s, e) for e, entry in enumerate(epochs, 1)
                  if (s := selection_score(entry, e, rule)) is not None]
        return min(scored)[1]
    assert kept("val_loss") == 2 and kept("val_map50") == 3 and kept("last") == 3
    assert selection_score(epochs[0], 1, "val_map50") is None  # not measured that epoch


def test_evaluate_and_cli(ssd_bundle: Path, coco_dir: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgeinspect.cli import main

    # no --split: the folder has no test split (data coco --test-ratio 0), so val, as training reported
    result = CliRunner().invoke(main, ["-q", "evaluate", str(ssd_bundle), "--data", str(coco_dir),
                                       "--save-viz", str(tmp_path / "viz"), "--json", str(tmp_path / "m.json"),
                                       "--predictions", str(tmp_path / "p.json")])
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert not (coco_dir / "test").exists() and m["split"] == "val"
    manifest = Bundle.open(ssd_bundle).manifest["metrics"]
    assert m["bbox"] == manifest["bbox"] and m["confusion"] == manifest["confusion"]
    n_val = len(open_split(coco_dir, "val"))
    assert sum(m["confusion"].values()) == m["n_images"] == n_val
    assert "mAP@0.5" in result.output and "composite" in result.output
    assert len(list((tmp_path / "viz").glob("*.png"))) == n_val
    assert isinstance(json.loads((tmp_path / "p.json").read_text()), list)
    result = CliRunner().invoke(main, ["-q", "evaluate", str(ssd_bundle), "--data", str(coco_dir), "--split", "val",
                                       "--engine", "onnx"])
    assert result.exit_code == 1 and "edgeinspect export" in result.output  # no engine exported yet
    result = CliRunner().invoke(main, ["-q", "train", "ssd", "--data", str(coco_dir), "--out", str(tmp_path / "o"),
                                       "--category", "x"])
    assert result.exit_code == 2 and "--category" in result.output


def test_exported_ssd_matches_pytorch_and_the_daemon_serves_it(ssd_bundle: Path, coco_dir: Path,
                                                              tmp_path: Path) -> None:
    """The trained family the whole way: ONNX engine through its parity gate, then a real daemon over ZeroMQ."""
    from test_daemon import _serve_to_end

    from edgeinspect.export.exporter import export_bundle

    out = tmp_path / "ssd"
    shutil.copytree(ssd_bundle, out)
    [result] = export_bundle(out, "onnx", progress=False)
    parity = result.parity.to_dict()
    assert result.status == "written" and parity["passed"] and parity["n_matched"] == parity["n_reference"] > 0
    assert parity["min_matched_iou"] >= 0.99 and parity["verdict_agreement"] == 1.0
    folder = tmp_path / "frames"
    folder.mkdir()
    split = open_split(coco_dir, "val")
    for i in range(len(split)):
        shutil.copy(split.path_of(i), folder / f"{i:02d}.png")
    verdicts, statuses = _serve_to_end(out, folder)
    assert len(verdicts) == len(split) and statuses[-1]["errors"] == 0
    from edgeinspect.train.detection import predict
    from edgeinspect.train.trainer import load_model

    bundle = Bundle.open(out)
    threshold = bundle.decision["threshold"]
    torch_nok = [bool((p["scores"] >= threshold).any())
                 for p in predict(load_model(bundle), split, bundle.preprocess, progress=False)]
    assert [v["verdict"] == "NOK" for v in verdicts] == torch_nok  # served as the PyTorch model decides
    for v in verdicts:
        assert all(r["label"] == "defect" and r["score"] >= v["raw_threshold"] for r in v["regions"])
