"""CAM: the class activation map as defined, its supervised split, training, ONNX parity."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SYNTH_CATEGORY

from edgeinspect.bundle import Bundle
from edgeinspect.config import load_config
from edgeinspect.export.exporter import ExportJob, export_bundle
from edgeinspect.train.data import MVTecCategory, synthesize
from edgeinspect.train.data.split import all_samples, relative_paths
from edgeinspect.train.evaluate import evaluate
from edgeinspect.train.models import Cam
from edgeinspect.train.trainer import bundle_split, train

SIZE = 96  # small images keep the training near half a minute on one core (stage5: 6 x 6 maps)
# The paper's learning rate (1e-4) moves the randomly initialised dense layer too little in the few
# steps this small set gives; 3e-4 with batches of 4 learns it within the ten epochs.
OVERRIDES = [f"preprocess.input_size=[{SIZE},{SIZE}]", "model.learning_rate=0.0003", "train.batch_size=4"]
# A supervised model is tested on its own 20 % hold-out: conftest's synth_root (24 defective images)
# would leave 4 defective test images, too few for a floor. These synthetic parts have 80 (16 tested).
N_TRAIN, N_TEST_GOOD, N_PER_DEFECT = 40, 30, 20
# Image AUROC floor on the 30 held-out images (14 good, 16 defective): a model that scores noise or a
# constant has expected AUROC 0.5 and a random ranking reaches 0.8 with a probability below 1 %; mean
# brightness alone stays below 0.75 on these parts (tests/test_synth.py). Measured: 0.92.
SYNTH_IMAGE_AUROC_FLOOR = 0.8


@pytest.fixture(scope="module")
def cam_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic washers with enough defective images for a supervised split (deterministic)."""
    root = tmp_path_factory.mktemp("cam-synth")
    synthesize(root, SYNTH_CATEGORY, seed=1, n_train=N_TRAIN, n_test_good=N_TEST_GOOD,
               n_test_per_defect=N_PER_DEFECT, size=SIZE)
    return root


@pytest.fixture(scope="module")
def cam_bundle(cam_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CAM trained on those parts, with its FP32 ONNX engine exported (parity checked)."""
    out = tmp_path_factory.mktemp("bundles") / "cam"
    train("cam", cam_root, SYNTH_CATEGORY, out, load_config("cam", overrides=OVERRIDES), device="cpu",
          progress=False)
    export_bundle(out, "onnx", progress=False)
    return out


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_heatmap_is_the_dense_weighted_sum_of_the_last_conv_maps() -> None:
    torch.manual_seed(0)
    model = Cam(input_size=(SIZE, SIZE)).eval()
    with torch.no_grad():
        model.dense.weight.normal_(0, 0.1)
        model.dense.bias.normal_(0, 0.5)
        x = torch.randn(2, 3, SIZE, SIZE)
        f = model.embed(x)                              # N x C x h x w, the last conv layer's maps
        w, b = model.dense.weight, model.dense.bias     # 2 x C, 2
        by_hand = torch.stack([sum(w[c, k] * f[:, k] for k in range(f.shape[1])) + b[c] for c in (0, 1)], 1)
        amap, score = model(x)
        patch = model.patch_scores(f)
    assert f.shape == (2, 112, SIZE // 16, SIZE // 16)
    assert torch.allclose(model.class_maps(f), by_hand, atol=1e-4)
    m = by_hand[:, 1] - by_hand[:, 0]                   # anomaly map minus good map
    assert torch.allclose(patch[:, 0], torch.sigmoid(m), atol=1e-5)
    # the map is that grid upsampled (sigma 0: bilinear only) ...
    assert torch.allclose(amap, F.interpolate(patch, size=(SIZE, SIZE), mode="bilinear", align_corners=False),
                          atol=1e-5)
    # ... and the score the classifier's anomaly probability, = sigmoid of the map's logit mean
    probs = torch.softmax(f.mean((2, 3)) @ w.T + b, 1)[:, 1]
    assert torch.allclose(score, probs, atol=1e-6)
    assert torch.allclose(score, torch.sigmoid(m.mean((1, 2))), atol=1e-5)


def test_only_the_last_three_convs_and_the_dense_layer_train(cam_bundle: Path) -> None:
    model = Cam(input_size=(SIZE, SIZE))
    assert model.tuned_layers == [f"trunk._blocks.10.{c}" for c in ("_expand_conv", "_depthwise_conv",
                                                                    "_project_conv")]
    tuned = {f"extractor.{name}.weight" for name in model.tuned_layers} | {"dense.weight", "dense.bias"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == tuned
    before = {k: v.numpy() for k, v in model.state_dict().items() if not k.startswith("dense.")}
    with np.load(cam_bundle / "weights.npz") as npz:
        changed = {k for k in before if not np.array_equal(npz[k], before[k])}
    assert changed == tuned - {"dense.weight", "dense.bias"}  # every tuned conv moved, nothing else did


def test_split_is_stratified_seeded_recorded_and_used(cam_root: Path, cam_bundle: Path) -> None:
    dataset = MVTecCategory(cam_root, SYNTH_CATEGORY)
    config = load_config("cam", overrides=OVERRIDES)
    split = Cam.data_split(dataset, config)
    assert Cam.data_split(dataset, config) == split  # same seed, same split
    other = Cam.data_split(dataset, load_config("cam", overrides=[*OVERRIDES, "model.seed=1"]))
    assert set(relative_paths(dataset, other.test)) != set(relative_paths(dataset, split.test))
    # every image is in exactly one part; each defect type gives round(20 %) of its images to the test
    parts = [relative_paths(dataset, p) for p in (split.fit, split.calibration, split.test)]
    assert sorted(sum(parts, [])) == sorted(relative_paths(dataset, all_samples(dataset)))
    per_type = Counter(s.defect_type for s in all_samples(dataset))
    assert Counter(s.defect_type for s in split.test) == {t: round(0.2 * n) for t, n in per_type.items()}
    assert split.labelled and any(s.label for s in split.calibration)

    recorded = _manifest(cam_bundle)["data"]["split"]
    assert [recorded[k] for k in ("fit", "calibration", "test")] == parts
    assert _manifest(cam_bundle)["metrics"]["split"] == recorded["description"] == split.description
    bundle = Bundle.open(cam_bundle)
    assert bundle_split(bundle, dataset) == split
    job = ExportJob(bundle, dataset, {})
    assert job.task.split.test == split.test and job.task.split.fit == split.fit
    result = evaluate(cam_bundle, cam_root, SYNTH_CATEGORY, progress=False)
    assert result["n_images"] == len(split.test) and result["split"] == split.description
    assert not set(parts[0]) & set(parts[2])  # no test image was fit on


def test_trained_on_the_synthetic_parts_it_beats_a_floor(cam_bundle: Path) -> None:
    m = _manifest(cam_bundle)
    history = m["training"]["history"]
    assert 1 <= len(history["loss"]) <= 10 and history["loss"][-1] < history["loss"][0]
    metrics = m["metrics"]
    assert (metrics["n_images"], metrics["n_defective"]) == (30, 16)
    assert metrics["image_auroc"] >= SYNTH_IMAGE_AUROC_FLOOR, metrics
    assert m["decision"]["calibration"]["source"] == "labelled validation split"


def test_onnx_export_passes_the_fp32_parity_gate(cam_bundle: Path) -> None:
    engines = _manifest(cam_bundle)["engines"]
    (entry,) = [e for e in engines if e["format"] == "onnx" and e["precision"] == "fp32"]
    assert entry["parity"]["status"] == "passed"
    assert (cam_bundle / entry["file"]).is_file()


def test_vgg16_as_in_the_paper_tunes_conv5_1_to_conv5_3() -> None:
    model = Cam("vgg16", ["block5"], (64, 64), pretrained=False)  # random init: no weights needed
    assert model.extractor(torch.zeros(1, 3, 64, 64))[0].shape == (1, 512, 4, 4)  # conv5_3 + ReLU, /16
    assert model.tuned_layers == ["trunk.blocks.block5.1", "trunk.blocks.block5.3", "trunk.blocks.block5.5"]
    assert model.dense.in_features == 512


def test_bench_measures_the_recorded_hold_out(cam_bundle: Path) -> None:
    from edgeinspect.bench import bench

    result = bench(cam_bundle, ["onnx:fp32"], warmup=0, runs=2, rounds=1, backbone=False, rss=False)
    recorded = _manifest(cam_bundle)["data"]["split"]["test"]
    assert result["bundle"]["n_images"] == len(recorded) == 30  # the 20 % hold-out, not test/ (fit on)
    (row,) = result["rows"]
    expected = _manifest(cam_bundle)["metrics"]["image_auroc"]
    assert row["status"] == "ok" and row["image_auroc"] == pytest.approx(expected, abs=1e-3)


def test_runtime_verdicts_on_the_hold_out_have_regions_only_when_nok(cam_bundle: Path, cam_root: Path) -> None:
    """CAM's image score is the sigmoid of the mean logit, its map the sigmoid of each one: a part it
    passes can have map positions above the threshold. The runtime reports regions only with NOK."""
    from edgeinspect.imageio import read_image
    from edgeinspect.runtime.predictor import Predictor

    predictor = Predictor(cam_bundle, engine="onnx:fp32")
    category = cam_root / SYNTH_CATEGORY
    results = [predictor.predict(read_image(category / p)) for p in _manifest(cam_bundle)["data"]["split"]["test"]]
    above = [r for r in results if r.verdict == "OK" and (r.anomaly_map > r.raw_threshold).any()]
    assert {r.verdict for r in results} == {"OK", "NOK"} and above  # the case exists on these parts
    assert all(not r.regions for r in results if r.verdict == "OK")
    assert any(r.regions for r in results if r.verdict == "NOK")
