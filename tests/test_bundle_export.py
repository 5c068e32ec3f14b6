"""Bundle format, re-loading the PyTorch model, ONNX export and its parity gate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import SYNTH_CATEGORY

from edgeinspect.bundle import Bundle
from edgeinspect.config import load_config
from edgeinspect.errors import BundleError, ExportError
from edgeinspect.export.exporter import export_bundle
from edgeinspect.runtime.backends import OnnxRuntimeBackend
from edgeinspect.train.trainer import load_model


def test_manifest_has_the_contract(patchcore_bundle: Path) -> None:
    m = json.loads((patchcore_bundle / "manifest.json").read_text())
    assert m["schema_version"] == 1 and m["model"]["family"] == "patchcore"
    assert m["model"]["backbone"] == "efficientnet_lite0"
    assert m["preprocess"]["resize"] == [224, 224] and m["preprocess"]["color_order"] == "RGB"
    assert m["decision"]["threshold"] > 0 and m["decision"]["normalization"]["center"] == m["decision"]["threshold"]
    assert {"image_auroc", "pixel_auroc", "f1", "n_images"} <= set(m["metrics"])
    assert m["data"]["category"] == "washer" and m["data"]["train_good"] == 60
    engine = m["engines"][0]
    assert engine["format"] == "onnx" and engine["precision"] == "fp32" and len(engine["sha256"]) == 64
    assert engine["parity"]["passed"] and engine["parity"]["verdict_agreement"] == 1.0
    assert engine["parity"]["status"] == "passed" and engine["parity"]["gate"]["tolerance"] == 1e-3


def test_bundle_holds_no_pickles(patchcore_bundle: Path, padim_bundle: Path) -> None:
    for bundle in (patchcore_bundle, padim_bundle):
        files = [p for p in bundle.rglob("*") if p.is_file()]
        assert {p.suffix for p in files} <= {".json", ".npz", ".npy", ".onnx", ".png"}
        assert (bundle / "reports" / "roc.png").read_bytes().startswith(b"\x89PNG")
        for p in files:
            if p.suffix in (".npy", ".npz"):
                loaded = np.load(p, allow_pickle=False)  # raises if anything needs pickle
                if p.suffix == ".npz":
                    assert all(loaded[k].dtype != object for k in loaded.files)


def test_reloaded_model_reproduces_training_scores(patchcore_bundle: Path) -> None:
    bundle = Bundle.open(patchcore_bundle)
    a = load_model(bundle)
    b = load_model(bundle)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(a(x)[1], b(x)[1])
    assert a.memory_bank.shape[0] > 0


def test_tampered_or_missing_files_are_refused(patchcore_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(patchcore_bundle, copy)
    bank = copy / "stats" / "memory_bank.npy"
    data = bytearray(bank.read_bytes())
    data[-1] ^= 0xFF
    bank.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        Bundle.open(copy)
    bank.unlink()
    with pytest.raises(BundleError, match="missing stats/memory_bank.npy"):
        Bundle.open(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.open(copy)
    with pytest.raises(BundleError, match="not a directory"):
        Bundle.open(tmp_path / "nope")


def test_onnx_engine_is_checked_and_carries_metadata(patchcore_bundle: Path) -> None:
    bundle = Bundle.open(patchcore_bundle)
    path, _ = bundle.engine("onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 17
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 224, 224]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["bundle_id"] == bundle.bundle_id and meta["family"] == "patchcore"
    assert json.loads(meta["decision"]) == bundle.decision


def test_onnx_matches_torch_on_a_random_input(patchcore_bundle: Path) -> None:
    bundle = Bundle.open(patchcore_bundle)
    model = load_model(bundle)
    path, _ = bundle.engine("onnx")
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    amap, score = OnnxRuntimeBackend(path).run(x)
    with torch.no_grad():
        tmap, tscore = model(torch.from_numpy(x))
    assert np.abs(amap - tmap.numpy()).max() <= 1e-3 * bundle.decision["threshold"]
    assert abs(float(score[0]) - float(tscore[0])) <= 1e-3 * bundle.decision["threshold"]


def test_padim_exports_with_parity(padim_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "padim"
    shutil.copytree(padim_bundle, copy)
    [result] = export_bundle(copy, "onnx", progress=False)
    assert result.status == "written" and result.path.is_file()
    assert result.parity.passed and result.parity.verdict_agreement == 1.0
    assert result.parity.max_rel_score_delta < 1e-3


def test_a_check_set_of_one_class_leaves_the_auroc_unchecked(padim_bundle: Path, synth_root: Path,
                                                             tmp_path: Path) -> None:
    """Good images only: no image AUROC to compare (recorded as null with the reason); the verdicts gate."""
    good_only = tmp_path / "data" / SYNTH_CATEGORY
    (good_only / "test").mkdir(parents=True)
    (good_only / "train").symlink_to(synth_root / SYNTH_CATEGORY / "train")
    (good_only / "test" / "good").symlink_to(synth_root / SYNTH_CATEGORY / "test" / "good")
    copy = tmp_path / "padim"
    shutil.copytree(padim_bundle, copy)
    results = export_bundle(copy, "onnx", "fp16", data_root=tmp_path / "data", category=SYNTH_CATEGORY,
                            progress=False)  # FP16's gate bounds the AUROC drop
    assert [r.status for r in results] == ["written"] and "image AUROC not checked" in results[0].detail
    for entry in Bundle.open(copy).engines:  # the FP32 engine it is built from too
        assert entry["parity"]["passed"] and entry["parity"]["image_auroc"] is None
        assert entry["parity"]["auroc_not_checked"] == "one class in the check set"
        assert entry["parity"]["n_images"] == len(list((good_only / "test" / "good").glob("*.png")))


def test_failed_parity_refuses_the_engine(padim_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "padim"
    shutil.copytree(padim_bundle, copy)
    settings = load_config("export", overrides=["fp32.tolerance=0.0"])  # no float engine can be bit-exact
    with pytest.raises(ExportError, match="gate failed: .*max \\|d map\\|.*tolerance 0"):
        export_bundle(copy, "onnx", settings=settings, progress=False)
    assert not list((copy / "engines").glob("*.onnx"))
    assert Bundle.open(copy).manifest["engines"] == []


def test_unknown_format_and_precision(patchcore_bundle: Path) -> None:
    from edgeinspect.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown engine format"):
        export_bundle(patchcore_bundle, "tflite", progress=False)
    with pytest.raises(ConfigError, match="unknown precision"):
        export_bundle(patchcore_bundle, "onnx", "int4", progress=False)
