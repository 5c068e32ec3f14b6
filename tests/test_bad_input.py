"""The bad-input suite: every wrong invocation or file gets one clear line and changes nothing on disk.

Each case runs the real CLI (click's CliRunner, in process) in a fresh workspace holding a copy of the
session's PatchCore bundle (with its ONNX engine) and files the case writes; the synthetic dataset is
shared. A case asserts the exit status, that the output is one line containing the expected words,
that no exception escaped, and that no file under the workspace or the dataset changed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SYNTH_CATEGORY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_atomic_bundle import tree_digest
from test_daemon import png_claiming

from edgeinspect.bundle import Bundle
from edgeinspect.cli import main
from edgeinspect.errors import BundleError

GOOD_IMAGE = "good/000.png"  # relative to <data>/washer/test


@dataclass(frozen=True)
class Case:
    """One wrong input: the command line, what it must answer, and the files it needs."""

    id: str
    args: str                 # {bundle} {data} {ws} {cat} are filled in; split on spaces
    code: int
    expect: str               # a regular expression the one output line must match
    setup: Callable[[Path, Path], None] | None = None  # (workspace, bundle) -> writes the bad files

    def argv(self, ws: Path, bundle: Path, data: Path) -> list[str]:
        """The command line in this workspace."""
        return [a.format(bundle=bundle, data=data, ws=ws, cat=SYNTH_CATEGORY) for a in self.args.split()]


# ------------------------------------------------------------------------------ file writers
def _write(rel: str, content: bytes | str) -> Callable[[Path, Path], None]:
    def setup(ws: Path, _bundle: Path) -> None:
        path = ws / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return setup


def _image(rel: str, image: np.ndarray) -> Callable[[Path, Path], None]:
    def setup(ws: Path, _bundle: Path) -> None:
        assert cv2.imwrite(str(ws / rel), image)
    return setup


def _manifest(edit: Callable[[dict], object]) -> Callable[[Path, Path], None]:
    def setup(_ws: Path, bundle: Path) -> None:
        manifest = json.loads((bundle / "manifest.json").read_text())
        result = edit(manifest)
        (bundle / "manifest.json").write_text(json.dumps(manifest if result is None else result))
    return setup


def _set(path: str, value: object) -> Callable[[dict], None]:
    def edit(manifest: dict) -> None:
        *parents, last = path.split(".")
        node = manifest
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value
    return edit


def _dataset(train_good: str) -> Callable[[Path, Path], None]:
    """A dataset at <ws>/ds/washer whose train/good is 'empty' or a 'loop' (symlink to itself)."""
    def setup(ws: Path, _bundle: Path) -> None:
        (ws / "ds" / "washer" / "train").mkdir(parents=True)
        good = ws / "ds" / "washer" / "train" / "good"
        if train_good == "empty":
            good.mkdir()
        else:
            good.symlink_to(good)
    return setup


def _link(rel: str, to: str) -> Callable[[Path, Path], None]:
    """A link to a file that exists but cannot be read (/proc/self/mem: EIO at offset 0, also for root)."""
    def setup(ws: Path, _bundle: Path) -> None:
        (ws / rel).symlink_to(to)
    return setup


def _symlink_loop(rel: str) -> Callable[[Path, Path], None]:
    def setup(ws: Path, _bundle: Path) -> None:
        (ws / rel).symlink_to(ws / rel)
    return setup


def _truncate(rel: str) -> Callable[[Path, Path], None]:
    def setup(_ws: Path, bundle: Path) -> None:
        path = bundle / rel
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return setup


def _remove(rel: str) -> Callable[[Path, Path], None]:
    def setup(_ws: Path, bundle: Path) -> None:
        (bundle / rel).unlink()
    return setup


def _non_utf8_name(ws: Path, _bundle: Path) -> None:
    data = Path(os.environ["EDGEINSPECT_TEST_DATA"])
    shutil.copy(data / SYNTH_CATEGORY / "test" / GOOD_IMAGE, ws / os.fsdecode(b"part-\xff\xfe.png"))


def _both(*setups: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    def setup(ws: Path, bundle: Path) -> None:
        for s in setups:
            s(ws, bundle)
    return setup


TRAIN = "-q train patchcore --data {data} --category {cat} --out {ws}/new --device cpu"
TRAIN_PADIM = "-q train padim --data {data} --category {cat} --out {ws}/new --device cpu"
RGB = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)

CASES = [
    # --- the table of the issue
    Case("coreset_ratio_abc", f"{TRAIN} --set model.coreset_ratio=abc", 1,
         r"model\.coreset_ratio: 'abc' is not a finite number in \(0, 1\] \(--set model\.coreset_ratio=abc\)"),
    Case("padim_n_features_huge", f"{TRAIN_PADIM} --set model.n_features=100000", 1,
         r"model\.n_features: 100000 is not in \[1, 232\]"),
    Case("input_size_zero", f"{TRAIN} --set preprocess.input_size=[0,0]", 1,
         r"preprocess\.input_size\[0\]: 0 is not in \[32, 4096\].*preprocess\.input_size\[1\]"),
    Case("threshold_quantile_5", f"{TRAIN} --set decision.threshold_quantile=5", 1,
         r"decision\.threshold_quantile: 5 is not in \[0, 1\]"),
    Case("batch_size_zero", f"{TRAIN} --set train.batch_size=0", 1, r"train\.batch_size: 0 is not in \[1, 1024\]"),
    Case("coreset_ratio_zero", f"{TRAIN} --set model.coreset_ratio=0", 1,
         r"model\.coreset_ratio: 0 is not in \(0, 1\]"),
    Case("coreset_ratio_negative", f"{TRAIN} --set model.coreset_ratio=-1", 1,
         r"model\.coreset_ratio: -1 is not in \(0, 1\]"),
    Case("out_is_an_existing_bundle", "-q train padim --data {data} --category {cat} --out {bundle} --device cpu", 1,
         r"--out .*bundle is already a bundle; pass --overwrite to replace it"),
    Case("yaml_does_not_parse", f"{TRAIN} --config {{ws}}/bad.yaml", 1,
         r"^Error: .*bad\.yaml is not valid YAML at line 2, column 1: found character '\\t' that cannot start any "
         r"token; fix the file", _write("bad.yaml", "model:\n\tcoreset_ratio: 0.2\n")),
    Case("predict_1x1_png", "predict {bundle} {ws}/tiny.png", 1,
         r"tiny\.png: ERROR frame is 1x1 pixels, below the minimum of 16", _image("tiny.png", RGB[:1, :1])),
    Case("predict_16_bit_png", "predict {bundle} {ws}/deep.png", 1,
         r"deep\.png: ERROR frame is 16-bit; the model was trained on 256x256 8-bit colour images",
         _image("deep.png", RGB.astype(np.uint16) * 257)),
    Case("predict_4_channel_png", "predict {bundle} {ws}/rgba.png", 1, r"rgba\.png: ERROR frame has transparent pixels",
         _image("rgba.png", np.dstack([RGB, np.full((256, 256), 100, np.uint8)]))),
    # --- more configuration mistakes
    Case("yaml_key_typo_set", f"{TRAIN} --set model.coreset=0.1", 1,
         r"model: unknown key 'coreset'; known keys: \['backbone', 'coreset_chunk', 'coreset_ratio'"),
    Case("yaml_key_typo_file", f"{TRAIN} --config {{ws}}/typo.yaml", 1,
         r"model: unknown key 'coreset_ration'.*\(.*typo\.yaml\)",
         _write("typo.yaml", "model:\n  coreset_ration: 0.2\n")),
    Case("nan_in_set", f"{TRAIN} --set model.coreset_ratio=.nan", 1,
         r"model\.coreset_ratio: nan is not a finite number"),
    Case("inf_in_file", f"{TRAIN} --config {{ws}}/inf.yaml", 1,
         r"decision\.threshold_margin: inf is not a finite number in \(0, 100\]",
         _write("inf.yaml", "decision:\n  threshold_margin: .inf\n")),
    Case("negative_infinity_sigma", f"{TRAIN} --set model.smoothing_sigma=-.inf", 1,
         r"model\.smoothing_sigma: -inf is not a finite number in \[0, 64\]"),
    Case("set_without_equals", f"{TRAIN} --set model.coreset_ratio", 1, r"must look like section\.key=value"),
    Case("set_value_not_yaml", f"{TRAIN} --set model.stages=[stage3", 1,
         r"--set model\.stages=\[stage3: the value is not valid YAML"),
    Case("config_not_utf8", f"{TRAIN} --config {{ws}}/latin1.yaml", 1, r"latin1\.yaml is not UTF-8 text",
         _write("latin1.yaml", "model:\n  backbone: caf\xe9\n".encode("latin-1"))),
    Case("config_is_a_list", f"{TRAIN} --config {{ws}}/list.yaml", 1, r"list\.yaml must be a mapping of sections",
         _write("list.yaml", "- model\n- train\n")),
    Case("config_section_not_mapping", f"{TRAIN} --set model=3", 1, r"model: 3 is not a mapping of backbone"),
    Case("unknown_stage", f"{TRAIN} --set model.stages=[stage3,stage9]", 1,
         r"model\.stages: \['stage3', 'stage9'\] is not a non-empty list of distinct stages of efficientnet_lite0"),
    Case("unknown_interpolation", f"{TRAIN} --set preprocess.interpolation=bicubic", 1,
         r"preprocess\.interpolation: 'bicubic' is not one of area, linear, cubic, nearest, auto"),
    Case("resize_smaller_than_crop", f"{TRAIN} --set preprocess.resize=[100,100]", 1,
         r"preprocess\.resize: \[100, 100\] is smaller than input_size \[224, 224\]"),
    Case("even_neighbourhood", f"{TRAIN} --set model.neighbourhood=4", 1, r"model\.neighbourhood: 4 is not odd"),
    Case("bool_for_number", f"{TRAIN} --set model.coreset_ratio=true", 1,
         r"model\.coreset_ratio: true is not a finite number"),
    Case("float_for_integer", f"{TRAIN} --set train.batch_size=2.5", 1,
         r"train\.batch_size: 2\.5 is not an integer in \[1, 1024\]"),
    Case("weights_file_missing", f"{TRAIN} --set model.weights={{ws}}/nope.pth", 1,
         r"model\.weights: weights file not found: .*nope\.pth"),
    Case("unknown_backbone", f"{TRAIN} --backbone vgg99", 1, r"model\.backbone: unknown backbone 'vgg99'"),
    Case("every_error_at_once", f"{TRAIN} --set model.coreset_ratio=0 --set train.batch_size=0 --set model.seed=-3",
         1, r"(?=.*model\.coreset_ratio: 0 is)(?=.*model\.seed: -3 is not in \[0, )(?=.*train\.batch_size: 0 is)"),
    Case("unknown_family", "-q train no_such_family --data {data} --category {cat} --out {ws}/new", 2,
         r"Invalid value for FAMILY: 'no_such_family' is not one of patchcore, padim, .*glass.*; see `main train"),
    Case("config_show_unknown", "config show no_such_family", 1,
         r"no configuration named 'no_such_family'; choose one of"),
    Case("config_show_bad_override", "config show padim --set decision.min_region_area=-5", 1,
         r"decision\.min_region_area: -5 is not in \[0, "),
    Case("export_bad_calibration_method", "-q export {bundle} --precision int8 --set int8.calibration_method=kmeans", 1,
         r"int8\.calibration_method: 'kmeans' is not one of minmax, entropy, percentile"),
    Case("export_agreement_above_one", "-q export {bundle} --precision fp16 --set fp16.min_verdict_agreement=2", 1,
         r"fp16\.min_verdict_agreement: 2 is not in \[0, 1\]"),
    Case("export_dla_core_3", "-q export {bundle} --format tensorrt --set tensorrt.dla_core=3", 1,
         r"tensorrt\.dla_core: 3 is not one of 0, 1 or null"),
    # --- where the bundle goes
    Case("out_is_a_foreign_folder", "-q train padim --data {data} --category {cat} --out {ws}/docs --overwrite", 1,
         r"--out .*docs exists and is not a bundle \(it has no manifest\.json\)", _write("docs/notes.txt", "mine")),
    Case("out_is_a_file", "-q train padim --data {data} --category {cat} --out {ws}/file.txt", 2,
         r"Invalid value for '--out': Directory '.*file\.txt' is a file\.; see `main train --help`",
         _write("file.txt", "x")),
    # --- data
    Case("missing_category", "-q train padim --data {data} --category nope --out {ws}/new --device cpu", 1,
         r"category folder not found: .*nope \(categories in .*: washer\)"),
    Case("empty_data_root", "-q train padim --data {ws}/empty --category washer --out {ws}/new --device cpu", 1,
         r"category folder not found: .*empty/washer \(categories in .*: none\)", _write("empty/.keep", "")),
    Case("empty_train_good", "-q train padim --data {ws}/ds --category washer --out {ws}/new --device cpu", 1,
         r"no images in .*ds/washer/train/good", _dataset("empty")),
    Case("train_good_symlink_loop", "-q train padim --data {ws}/ds --category washer --out {ws}/new --device cpu", 1,
         r"folder not found: .*ds/washer/train/good", _dataset("loop")),
    # --- bundles
    Case("manifest_file_outside_bundle", "info {bundle}", 1,
         r"files\.weights\.file: '\.\./\.\./etc/passwd' is outside the bundle",
         _manifest(_set("files.weights.file", "../../etc/passwd"))),
    Case("manifest_absolute_engine_path", "predict {bundle} {data}/washer/test/good/000.png", 1,
         r"engines\[0\]\.file: '/tmp/model\.onnx' is outside the bundle",
         _manifest(_set("engines.0.file", "/tmp/model.onnx"))),
    Case("manifest_future_version", "info {bundle}", 1,
         r"schema_version 99 is not supported \(this edgeinspect reads 1\)",
         _manifest(_set("schema_version", 99))),
    Case("manifest_not_json", "info {bundle}", 1, r"manifest\.json is not valid JSON",
         lambda _ws, b: (b / "manifest.json").write_text("{not json")),
    Case("manifest_is_a_list", "info {bundle}", 1, r"manifest\.json is not a manifest \(a JSON object\), but a list",
         _manifest(lambda m: [m])),
    Case("manifest_missing_decision", "predict {bundle} {data}/washer/test/good/000.png", 1, r"decision: missing",
         _manifest(lambda m: m.pop("decision") and None)),
    Case("manifest_nan_threshold", "info {bundle}", 1, r"decision\.threshold: nan is not a finite number",
         _manifest(_set("decision.threshold", float("nan")))),
    Case("manifest_bad_sha256", "info {bundle}", 1, r"files\.weights\.sha256: 'zz' is not a sha256",
         _manifest(_set("files.weights.sha256", "zz"))),
    Case("bundle_of_unknown_family", "-q export {bundle} --precision fp16", 1,
         r"unknown model family 'no_such_family'; choose one of \[.*'padim', 'patchcore'.*\]",
         _manifest(_set("model.family", "no_such_family"))),
    Case("truncated_engine", "predict {bundle} {data}/washer/test/good/000.png", 1,
         r"model_fp32\.onnx does not match the sha256 in manifest\.json", _truncate("engines/model_fp32.onnx")),
    Case("missing_stats_file", "info {bundle}", 1, r"is missing stats/memory_bank\.npy \(listed in manifest\.json\)",
         _remove("stats/memory_bank.npy")),
    Case("bundle_is_an_empty_folder", "info {ws}/empty", 1, r"bundle .*empty has no manifest\.json",
         lambda ws, _b: (ws / "empty").mkdir()),
    Case("bundle_dataset_gone", "-q export {bundle} --precision fp16", 1,
         r"the bundle's dataset /nonexistent/data is not here; give --data ROOT",
         _manifest(_set("data.root", "/nonexistent/data"))),
    Case("unknown_engine_format", "-q export {bundle} --format tflite", 1, r"unknown engine format 'tflite'"),
    # --- images and frames
    Case("predict_empty_file", "predict {bundle} {ws}/empty.png", 1,
         r"empty\.png: ERROR cannot decode image \(corrupt or not an image\)", _write("empty.png", b"")),
    Case("predict_truncated_png", "predict {bundle} {ws}/half.png", 1, r"half\.png: ERROR cannot decode image",
         lambda ws, _b: (ws / "half.png").write_bytes(cv2.imencode(".png", RGB)[1].tobytes()[:200])),
    Case("predict_header_claims_a_huge_image", "predict {bundle} {ws}/huge.png", 1,
         r"huge\.png: ERROR cannot decode image \(OpenCV refused it: .*\): .*huge\.png$",
         _write("huge.png", png_claiming(200_000, 200_000))),
    Case("predict_text_file", "predict {bundle} {ws}/notes.png", 1, r"notes\.png: ERROR cannot decode image",
         _write("notes.png", "hello")),
    Case("predict_directory", "predict {bundle} {ws}", 1, r": ERROR image not found: "),
    Case("predict_missing_file", "predict {bundle} {ws}/nope.png", 1, r"nope\.png: ERROR image not found"),
    Case("predict_symlink_loop", "predict {bundle} {ws}/loop.png", 1, r"loop\.png: ERROR image not found",
         _symlink_loop("loop.png")),
    Case("predict_unreadable_file", "predict {bundle} {ws}/unreadable.png", 1,
         r"unreadable\.png: ERROR cannot read image .*unreadable\.png: Input/output error",
         _link("unreadable.png", "/proc/self/mem")),
    Case("config_unreadable_file", f"{TRAIN} --config {{ws}}/unreadable.yaml", 1,
         r"cannot read config file .*unreadable\.yaml: Input/output error", _link("unreadable.yaml", "/proc/self/mem")),
    Case("predict_grayscale_on_colour_model", "predict {bundle} {ws}/gray.png", 1,
         r"gray\.png: ERROR frame is grayscale; the model was trained on 256x256 8-bit colour images; pass --frames "
         r"convert", _image("gray.png", RGB[..., 0])),
    Case("predict_thumbnail", "predict {bundle} {ws}/small.png", 1,
         r"small\.png: ERROR frame is 64x64 pixels: height 64 is outside 128-1024", _image("small.png", RGB[:64, :64])),
    Case("predict_panorama", "predict {bundle} {ws}/wide.png", 1, r"wide\.png: ERROR frame is 1000x250 pixels: aspect",
         _image("wide.png", cv2.resize(RGB, (1000, 250)))),
    Case("predict_non_utf8_name", "predict {bundle} {ws}/part-\udcff\udcfe.png", 0,
         r"part-\\udcff\\udcfe\.png: (OK|NOK) score", _non_utf8_name),
    Case("predict_16_bit_converted", "predict {bundle} {ws}/deep.png --frames convert", 0,
         r"deep\.png: (OK|NOK) score .*; converted: 16-bit -> 8-bit", _image("deep.png", RGB.astype(np.uint16) * 257)),
    Case("predict_opaque_bgra_converted", "predict {bundle} {ws}/opaque.png", 0,
         r"opaque\.png: (OK|NOK) score .*; converted: BGRA -> BGR \(opaque alpha dropped\)",
         _image("opaque.png", np.dstack([RGB, np.full((256, 256), 255, np.uint8)]))),
    # --- serve
    Case("serve_missing_camera", "-q serve --bundle {bundle} --camera {ws}/nocam --publish tcp://127.0.0.1:0", 1,
         r"no such file, folder, device or URL: .*nocam"),
    Case("serve_negative_max_frames", "-q serve --bundle {bundle} --camera {ws} --max-frames -1", 2,
         r"Invalid value for '--max-frames': -1 is not in the range x>=0\.; see `main serve --help`"),
    Case("serve_empty_folder", "-q serve --bundle {bundle} --camera {ws}/frames --publish tcp://127.0.0.1:0", 1,
         r"no images \(.*\) in folder .*frames", _write("frames/readme.txt", "no images here")),
]


@pytest.fixture(scope="module")
def dataset(synth_root: Path) -> Path:
    os.environ["EDGEINSPECT_TEST_DATA"] = str(synth_root)
    return synth_root


@pytest.fixture
def workspace(patchcore_bundle: Path, tmp_path: Path) -> tuple[Path, Path]:
    ws = tmp_path / "ws"
    ws.mkdir()
    bundle = ws / "bundle"
    shutil.copytree(patchcore_bundle, bundle)
    return ws, bundle


def _invoke(argv: list[str], ws: Path, dataset: Path) -> tuple[int, list[str], BaseException | None]:
    before = tree_digest(ws), tree_digest(dataset)
    result = CliRunner().invoke(main, argv)
    after = tree_digest(ws), tree_digest(dataset)
    assert after == before, "the command changed files on disk"
    lines = [line for line in result.output.splitlines() if line.strip()]
    return result.exit_code, lines, result.exception


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, workspace: tuple[Path, Path], dataset: Path) -> None:
    ws, bundle = workspace
    if case.setup:
        case.setup(ws, bundle)
    code, lines, exception = _invoke(case.argv(ws, bundle, dataset), ws, dataset)
    assert exception is None or isinstance(exception, SystemExit), f"unhandled {exception!r}"
    assert code == case.code, lines
    assert len(lines) == 1, lines
    assert re.search(case.expect, lines[0]), lines[0]
    if code:
        assert lines[0].startswith("Error: ") or ": ERROR " in lines[0]


def test_the_suite_counts_its_cases() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 60


def test_port_in_use_is_one_line(workspace: tuple[Path, Path], dataset: Path) -> None:
    ws, bundle = workspace
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        endpoint = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        code, lines, _ = _invoke(["-q", "serve", "--bundle", str(bundle), "--camera",
                                  str(dataset / SYNTH_CATEGORY / "test" / "good"), "--publish", endpoint], ws, dataset)
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith(f"Error: cannot bind verdict publisher to {endpoint}")


def test_bad_frames_get_error_verdicts_from_the_daemon(workspace: tuple[Path, Path], dataset: Path) -> None:
    from conftest import free_tcp_endpoint
    from test_daemon import _collect, _subscriber

    ws, bundle = workspace
    frames = ws / "frames"
    frames.mkdir()
    shutil.copy(dataset / SYNTH_CATEGORY / "test" / GOOD_IMAGE, frames / "0-good.png")
    cv2.imwrite(str(frames / "1-tiny.png"), RGB[:1, :1])
    cv2.imwrite(str(frames / "2-deep.png"), RGB.astype(np.uint16) * 257)
    cv2.imwrite(str(frames / "3-gray.png"), RGB[..., 0])
    endpoint = free_tcp_endpoint()
    sub = _subscriber(endpoint)
    proc = subprocess.Popen([sys.executable, "-m", "edgeinspect", "-q", "serve", "--bundle", str(bundle), "--camera",
                             str(frames), "--publish", endpoint, "--line", "L7", "--camera-id", "camA",
                             "--wait-subscribers", "1"], stderr=subprocess.PIPE, text=True)
    try:
        verdicts, statuses = _collect(sub)
    finally:
        sub.close(linger=0)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert [v["verdict"] for v in verdicts][0] in ("OK", "NOK")
    assert [v["verdict"] for v in verdicts][1:] == ["ERROR"] * 3
    assert "frame is 1x1 pixels" in verdicts[1]["error"] and "frame is 16-bit" in verdicts[2]["error"]
    assert "frame is grayscale" in verdicts[3]["error"]
    assert statuses[-1]["errors"] == 3 and statuses[-1]["ok"] + statuses[-1]["nok"] == 1
    assert "Traceback" not in stderr


def test_a_traceback_only_with_debug(workspace: tuple[Path, Path], dataset: Path) -> None:
    ws, bundle = workspace
    base = [sys.executable, "-m", "edgeinspect"]
    plain = subprocess.run([*base, "info", str(ws / "nope")], capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr  # click's usage error: exit 2
    (ws / "empty").mkdir()
    plain = subprocess.run([*base, "info", str(ws / "empty")], capture_output=True, text=True)
    assert plain.returncode == 1 and plain.stderr.strip().count("\n") == 0 and "Traceback" not in plain.stderr
    debug = subprocess.run([*base, "--debug", "info", str(ws / "empty")], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "BundleError" in debug.stderr


# ------------------------------------------------------------------------ property-based: manifests
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                  max_size=4), max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_manifest_opens_or_gives_a_clean_error(patchcore_bundle: Path, tmp_path_factory: pytest.TempPathFactory,
                                                   data: st.DataObject) -> None:
    real = json.loads((patchcore_bundle / "manifest.json").read_text())
    bundle = tmp_path_factory.mktemp("m")
    choice = data.draw(st.sampled_from(["anything", "one key", "bytes"]))
    if choice == "anything":
        text = json.dumps(data.draw(_json))
    elif choice == "one key":  # the real manifest with one top-level value replaced
        key = data.draw(st.sampled_from(sorted(real)))
        text = json.dumps({**real, key: data.draw(_json)})
    else:
        text = data.draw(st.binary(max_size=200)).decode("latin-1")
    (bundle / "manifest.json").write_text(text, encoding="latin-1")
    try:
        opened = Bundle.open(bundle, verify=False)
    except BundleError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert isinstance(opened.bundle_id, str) and opened.preprocess.input_size
