"""Mask R-CNN: the family's contract, a short training run on synthetic parts that learns (loss falls,
detections and masks land on the defects), and the ONNX engine against torchvision's own detections."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import SYNTH_CATEGORY

SIZE = 128  # small input and light heads keep the always-on run short (the defaults are for 320 x 320)
SMALL = {"fpn_channels": 64, "anchor_sizes": [8, 16, 32, 64, 128], "rpn_pre_nms_top_n_train": 200,
         "rpn_post_nms_top_n_train": 100, "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50,
         "box_batch_size_per_image": 32, "detections_per_img": 5, "score_thresh": 0.05}
# the shared trainer on the synthetic parts at SIZE (measured: loss 1.57 -> 0.64 in 8 epochs, the top-3 boxes
# on 12 of 24 training defect images at IoU >= 0.3, no false alarm on good parts)
FAST = [f"preprocess.input_size=[{SIZE},{SIZE}]", "train.epochs=8", "train.batch_size=2", "train.map_every=0",
        "train.best_by=val_loss",
        "train.warmup_epochs=0.5", *(f"model.{k}={v}" for k, v in SMALL.items())]


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic parts as a COCO folder: one ``defect`` class, masks as polygons, good parts as negatives."""
    from edgeinspect.train.data import synthesize
    from edgeinspect.train.data.coco import convert_mvtec

    root = tmp_path_factory.mktemp("synth_mask")
    synthesize(root, SYNTH_CATEGORY, seed=1, n_train=1, n_test_good=6, n_test_per_defect=8)
    convert_mvtec(root, SYNTH_CATEGORY, root / "coco", classes_mode="single", good_images="test", train_ratio=0.8,
                  test_ratio=0.0, progress=False)
    return root / "coco"


@pytest.fixture(scope="module")
def bundle(coco_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mask R-CNN (pretrained Lite0 + FPN) trained for a few epochs by the shared detector trainer."""
    from edgeinspect.config import load_config
    from edgeinspect.train.detection import train

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("bundles") / "maskrcnn"
    train("maskrcnn", coco_dir, out, load_config("maskrcnn", overrides=FAST), device="cpu", progress=False)
    return out


def test_contract_and_rebuild() -> None:
    """Class attributes per DETECT.md, the rebuild from hyperparameters, detect/forward shapes (untrained)."""
    from edgeinspect.train.backbones import LITE_MEAN
    from edgeinspect.train.models.maskrcnn import MaskRCNN

    model = MaskRCNN(["scratch", "good"], (SIZE, SIZE), **SMALL).eval()
    assert (model.task, model.decoder, model.fit_is_statistics) == ("detections", "final_detections", False)
    assert model.output_names == ("boxes", "labels", "scores", "masks") and model.statistics() == {}
    assert MaskRCNN.normalization(model.hyperparameters())[0] == LITE_MEAN
    cfg = model.decoder_config()
    assert cfg["classes"] == ["scratch", "good"] and cfg["ok_classes"] == ["good"]
    assert model.tag() == "efficientnet_lite0" and "efficientnet-lite0" in model.weights_source()
    # frozen batch norms; the FPN and heads train, the backbone's lower stages do not
    named = dict(model.named_parameters())
    assert not any(p.requires_grad for n, p in named.items() if "._bn" in n)
    assert not named["detector.backbone.body.trunk._blocks.0._depthwise_conv.weight"].requires_grad
    assert named["detector.backbone.body.trunk._blocks.15._project_conv.weight"].requires_grad
    assert named["detector.roi_heads.mask_predictor.mask_fcn_logits.weight"].requires_grad

    hp = model.hyperparameters()
    rebuilt = MaskRCNN(hp.pop("classes"), tuple(hp.pop("input_size")), pretrained=False, **hp).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, SIZE, SIZE)
    ref, again = model.detect(x)[0], rebuilt.detect(x)[0]
    boxes, labels, scores, masks = model(x)
    assert torch.equal(ref["boxes"], again["boxes"]) and torch.equal(ref["boxes"], boxes)
    assert masks.shape == (len(scores), 1, SIZE, SIZE) and labels.dtype == torch.int64


def test_resnet50_is_torchvisions_and_offline_error_is_clear(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    """backbone resnet50 = torchvision's maskrcnn_resnet50_fpn; a failed download is a one-line ConfigError;
    an ImageNet ResNet50 file loads into its body."""
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights, maskrcnn_resnet50_fpn

    from edgeinspect.errors import ConfigError
    from edgeinspect.train.backbones import IMAGENET_MEAN
    from edgeinspect.train.models.maskrcnn import MaskRCNN

    model = MaskRCNN(["defect"], (SIZE, SIZE), backbone="resnet50", pretrained=False)
    reference = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2)
    # the same tensors (torchvision's pretrained model has frozen batch norms: no num_batches_tracked)
    assert {k: v.shape for k, v in model.detector.state_dict().items()} == \
           {k: v.shape for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert MaskRCNN.normalization(model.hyperparameters())[0] == IMAGENET_MEAN

    def offline(self: object, *args: object, **kwargs: object) -> None:
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(type(MaskRCNN_ResNet50_FPN_Weights.COCO_V1), "get_state_dict", offline)
    with pytest.raises(ConfigError, match="torchvision's COCO Mask R-CNN weights: could not fetch") as err:
        MaskRCNN(["defect"], (SIZE, SIZE), backbone="resnet50")
    assert "\n" not in str(err.value) and "model.weights=PATH" in str(err.value)

    imagenet = resnet50(weights=None).state_dict()
    torch.save(imagenet, tmp_path / "resnet50.pth")
    loaded = MaskRCNN(["defect"], (SIZE, SIZE), backbone="resnet50", weights=str(tmp_path / "resnet50.pth"))
    assert torch.equal(loaded.detector.backbone.body.layer4[0].conv1.weight, imagenet["layer4.0.conv1.weight"])


def test_config_file_valid_and_documented() -> None:
    """configs/maskrcnn.yaml: its model section validates; every key carries a comment."""
    from edgeinspect.train.models.maskrcnn.config import MaskRcnnSection

    path = Path(__file__).resolve().parents[1] / "configs" / "maskrcnn.yaml"
    config = yaml.safe_load(path.read_text())
    section = MaskRcnnSection.model_validate(config["model"])
    assert section.backbone == "efficientnet_lite0" and config["preprocess"]["input_size"] == [320, 320]
    keys = [line for line in path.read_text().splitlines() if re.match(r"\s+\w+:", line)]
    assert keys and all("#" in line for line in keys)
    from edgeinspect.train.models.maskrcnn import MaskRCNN

    defaults = {k: v.default for k, v in inspect.signature(MaskRCNN.__init__).parameters.items()
                if k in config["model"]}
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()} == config["model"]
    with pytest.raises(ValueError, match="anchor_sizes"):
        MaskRcnnSection.model_validate({**config["model"], "anchor_sizes": [16, 32]})


def test_training_learns_defects(bundle: Path, coco_dir: Path) -> None:
    """The loss falls and, after training, detections land on the defects of most training images and masks
    come with them; good parts stay clean."""
    from edgeinspect.bundle import Bundle
    from edgeinspect.train.detection import _iou, open_split, predict
    from edgeinspect.train.trainer import load_model

    b = Bundle.open(bundle)
    history = b.manifest["training"]["history"]
    assert history["train_loss"][-1] < 0.6 * history["train_loss"][0], history["train_loss"]
    assert b.manifest["outputs"]["masks"] == [-1, 1, SIZE, SIZE]  # the detection count is the engine's
    split = open_split(coco_dir, "train")
    hits = defective = false_alarms = good = 0
    for i, p in enumerate(predict(load_model(b), split, b.preprocess, progress=False)):
        truth = split.load(i)[1]["boxes"]
        if len(truth) == 0:
            good += 1
            false_alarms += int((p["scores"] >= 0.5).any())
            continue
        defective += 1
        hits += bool(len(p["scores"])) and float(_iou(truth, p["boxes"][:3]).max()) >= 0.3
        assert p["masks"].shape[0] == len(p["scores"])
    assert hits >= 0.35 * defective and false_alarms <= good // 4, (hits, defective, false_alarms, good)


def test_exported_engine_matches_torchvision_and_gives_polygons(bundle: Path, coco_dir: Path,
                                                                tmp_path: Path) -> None:
    """The exporter's FP32 engine (dynamic detection count, RoIAlign and NMS inside) passes the detection
    gate against torchvision's own detections, Core ML refuses it with the reason, and the runtime turns
    its masks into polygons in frame pixels."""
    import shutil

    from edgeinspect.errors import ExportError
    from edgeinspect.export.exporter import export_bundle
    from edgeinspect.imageio import read_image
    from edgeinspect.runtime.predictor import Predictor
    from edgeinspect.train.detection import open_split

    out = tmp_path / "maskrcnn"
    shutil.copytree(bundle, out)
    [onnx] = export_bundle(out, "onnx", progress=False)
    parity = onnx.parity.to_dict()
    assert onnx.status == "written" and parity["passed"] and parity["n_matched"] == parity["n_reference"]
    assert parity["min_matched_iou"] >= 0.99 and parity["max_abs_score_delta"] < 1e-3
    with pytest.raises(ExportError, match="Core ML cannot take this maskrcnn model"):
        export_bundle(out, "coreml", progress=False)
    predictor = Predictor(out, engine="onnx").with_threshold(0.3)  # a few epochs: confidences are still low
    split = open_split(coco_dir, "train")
    polygons = 0
    for i in range(len(split)):
        frame = read_image(split.path_of(i))
        for region in predictor.predict(frame).regions:
            x0, y0, x1, y1 = region.box
            assert region.label == "defect" and 0 <= x0 < x1 <= frame.shape[1] and 0 <= y0 < y1 <= frame.shape[0]
            # the outline lies on its box: torchvision pastes the 28 x 28 mask over the box grown by 2/28
            margin = 2 + (max(x1 - x0, y1 - y0) + 1) / 14
            for x, y in region.polygon or []:
                assert x0 - margin <= x <= x1 + margin and y0 - margin <= y <= y1 + margin, (region, x, y)
            polygons += bool(region.polygon)
    assert polygons > 0


def test_a_resumed_run_is_the_run_that_was_not_interrupted(coco_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's RPN and RoI samplers draw from torch's global generator: ``last.pt`` keeps its state, so a
    run interrupted in its second epoch and resumed gives the same weights as one that never stopped."""
    import numpy as np

    from edgeinspect.config import load_config
    from edgeinspect.train import detection

    torch.set_num_threads(1)
    config = load_config("maskrcnn", overrides=[
        "preprocess.input_size=[64,64]", "train.epochs=2", "train.batch_size=4", "train.map_every=0",
        "train.best_by=last", "model.fpn_channels=16", "model.anchor_sizes=[8,16,32,64,128]",
        "model.rpn_pre_nms_top_n_train=50", "model.rpn_post_nms_top_n_train=30", "model.box_batch_size_per_image=16"])
    whole = detection.train("maskrcnn", coco_dir, tmp_path / "whole", config, device="cpu", progress=False)
    validation_loss, calls = detection.validation_loss, []

    def interrupted_in_epoch_2(*args: object, **kwargs: object) -> dict:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return validation_loss(*args, **kwargs)

    monkeypatch.setattr(detection, "validation_loss", interrupted_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        detection.train("maskrcnn", coco_dir, tmp_path / "resumed", config, device="cpu", progress=False)
    monkeypatch.setattr(detection, "validation_loss", validation_loss)
    resumed = detection.train("maskrcnn", coco_dir, tmp_path / "resumed", config, device="cpu", progress=False,
                              resume=True)
    assert resumed.manifest["training"]["history"] == whole.manifest["training"]["history"]
    with np.load(whole.file("weights")) as a, np.load(resumed.file("weights")) as b:
        assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
