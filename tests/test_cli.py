"""The click CLI: every command listed, config overrides, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import SYNTH_CATEGORY

from edgeinspect.cli import main
from edgeinspect.config import load_config, preset_names
from edgeinspect.errors import ConfigError


def test_help_lists_every_command_and_each_has_its_own_help() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    groups = [(name, command) for name, command in main.commands.items() if isinstance(command, click.Group)]
    assert len(main.commands) >= 15 and len(groups) >= 4  # data, config, runs, ctl, journal
    for name in main.commands:
        assert f"  {name}" in result.output
        assert CliRunner().invoke(main, [name, "--help"]).exit_code == 0, name
    for group_name, group in groups:
        listed = CliRunner().invoke(main, [group_name, "--help"]).output
        for sub in group.commands:
            assert f"  {sub}" in listed, (group_name, sub)
            assert CliRunner().invoke(main, [group_name, sub, "--help"]).exit_code == 0, (group_name, sub)


def test_backbones_lists_the_default() -> None:
    result = CliRunner().invoke(main, ["backbones"])
    assert result.exit_code == 0
    assert "efficientnet_lite0 (default)" in result.output and "wide_resnet50_2" in result.output


def test_config_overrides_and_errors(tmp_path: Path) -> None:
    config = load_config("patchcore", overrides=["model.coreset_ratio=0.05", "preprocess.input_size=[256, 256]"])
    assert config["model"]["coreset_ratio"] == 0.05 and config["preprocess"]["input_size"] == [256, 256]
    assert config["model"]["stages"] == ["stage3", "stage5"]  # untouched defaults stay
    user = tmp_path / "mine.yaml"
    user.write_text("model:\n  neighbourhood: 5\n")
    assert load_config("patchcore", user)["model"]["neighbourhood"] == 5
    with pytest.raises(ConfigError, match="unknown key 'coreset'"):
        load_config("patchcore", overrides=["model.coreset=0.1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("padim", overrides=["n_features"])


def test_train_with_a_preset_gives_the_runtime_its_input(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "tall"
    runner = CliRunner()
    result = runner.invoke(main, ["-q", "train", "padim", "--data", str(synth_root), "--category", SYNTH_CATEGORY,
                                  "--out", str(out), "--preset", "tall", "--set", "model.n_features=50",
                                  "--device", "cpu"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["preprocess"]["input_size"] == [384, 160] and manifest["model"]["n_features"] == 50
    assert manifest["preprocess"]["resize"] == [384, 160]  # what the runtime resizes every frame to
    unknown = runner.invoke(main, ["train", "padim", "--data", str(synth_root), "--category", SYNTH_CATEGORY,
                                   "--out", str(tmp_path / "x"), "--preset", "accurate"])
    assert unknown.exit_code == 1 and f"no preset named 'accurate'; choose one of {preset_names()}" in unknown.output
    assert not (tmp_path / "x").exists()


def test_train_evaluate_info_via_cli(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    runner = CliRunner()
    result = runner.invoke(main, ["-q", "train", "padim", "--data", str(synth_root), "--category", SYNTH_CATEGORY,
                                  "--out", str(out), "--set", "model.n_features=50", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "image AUROC" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["n_features"] == 50
    metrics_file = tmp_path / "metrics.json"
    result = runner.invoke(main, ["-q", "evaluate", str(out), "--data", str(synth_root), "--category", SYNTH_CATEGORY,
                                  "--json", str(metrics_file)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(metrics_file.read_text())
    assert {"image_auroc", "pixel_auroc", "f1", "n_images", "engine", "aupr", "f1_max", "f1_max_threshold", "pro",
            "confusion", "accuracy", "balanced_accuracy", "box_iou"} <= set(metrics)
    assert metrics["engine"] == "torch"
    assert sum(metrics["confusion"].values()) == metrics["n_images"]
    assert metrics["f1_max"] >= metrics["f1"] and 0.0 <= metrics["pro"] <= 1.0 and 0.0 <= metrics["box_iou"] <= 1.0
    for line in ("AUPR", "F1-max", "balanced accuracy", "TP", "PRO", "mean best IoU"):
        assert line in result.output
    # evaluation reproduces the figures recorded at training time
    assert metrics["image_auroc"] == pytest.approx(manifest["metrics"]["image_auroc"], abs=1e-9)
    info = runner.invoke(main, ["info", str(out)])
    assert info.exit_code == 0 and json.loads(info.output)["bundle_id"] == manifest["bundle_id"]
    # both runs are in the run registry (conftest's private one), the train with what the bundle says
    from edgeinspect.registry import Registry

    with Registry.open() as registry:
        evaluated, trained = registry.list_runs(limit=2)
    assert (trained["command"], trained["status"], evaluated["command"]) == ("train", "finished", "evaluate")
    assert trained["bundle_id"] == evaluated["bundle_id"] == manifest["bundle_id"] and trained["family"] == "padim"
    assert trained["metrics"]["image_auroc"] == pytest.approx(manifest["metrics"]["image_auroc"])
    assert trained["config"]["model"]["n_features"] == 50 and trained["report_dir"] == str(out / "reports")
    assert evaluated["metrics"]["image_auroc"] == pytest.approx(metrics["image_auroc"])


def test_info_of_a_bundle_without_metrics(patchcore_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(patchcore_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["metrics"]  # optional: a bundle written before any evaluation
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    info = CliRunner().invoke(main, ["info", str(bundle)])
    assert info.exit_code == 0, info.output
    shown = json.loads(info.output)
    assert shown["metrics"] is None and shown["bundle_id"] == manifest["bundle_id"] and shown["engines"]


def test_evaluate_onnx_matches_torch(patchcore_bundle: Path, synth_root: Path) -> None:
    from edgeinspect.train.evaluate import evaluate

    torch_metrics = evaluate(patchcore_bundle, synth_root, SYNTH_CATEGORY, "torch", progress=False)
    onnx_metrics = evaluate(patchcore_bundle, synth_root, SYNTH_CATEGORY, "onnx", progress=False)
    for key in ("image_auroc", "pixel_auroc", "f1"):
        assert onnx_metrics[key] == pytest.approx(torch_metrics[key], abs=1e-3)


def test_bad_input_gives_one_line_errors(tmp_path: Path, synth_root: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["train", "patchcore", "--data", str(synth_root), "--category", "nope",
                                  "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and "nope" in result.output and "Traceback" not in result.output
    result = runner.invoke(main, ["train", "patchcore", "--data", str(synth_root), "--category", SYNTH_CATEGORY,
                                  "--out", str(tmp_path / "b"), "--backbone", "vgg99"])
    assert result.exit_code == 1 and "unknown backbone 'vgg99'" in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(main, ["predict", str(tmp_path / "empty"), "x.png"])
    assert result.exit_code == 1 and "manifest.json" in result.output
