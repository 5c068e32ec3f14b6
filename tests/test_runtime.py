"""Runtime without torch: predictor, post-processing, predict CLI."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import SYNTH_CATEGORY

from edgeinspect.bundle import Bundle
from edgeinspect.errors import EngineError
from edgeinspect.imageio import read_image
from edgeinspect.preprocess import Preprocess
from edgeinspect.runtime.postprocess import find_regions, map_regions, normalize
from edgeinspect.runtime.predictor import Predictor


def test_runtime_and_camera_import_without_torch_or_training_code() -> None:
    code = ("import sys, edgeinspect.runtime.daemon, edgeinspect.runtime.predictor, edgeinspect.camera, "
            "edgeinspect.cli; assert 'torch' not in sys.modules, 'torch was imported'; "
            "extra = [m for m in sys.modules if m.startswith('edgeinspect.train') or "
            "(m.startswith('edgeinspect.export') and m not in ('edgeinspect.export', 'edgeinspect.export.formats'))]; "
            "assert not extra, f'the runtime imported {extra}'")
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


def test_a_non_finite_engine_output_is_an_engine_error(patchcore_bundle: Path) -> None:
    postprocess = Predictor(patchcore_bundle).postprocess
    amap, finite = np.zeros((1, 1, 224, 224), np.float32), np.array([0.0], np.float32)
    assert not postprocess((amap, finite), (256, 256)).nok
    for outputs in ((amap, finite * np.nan), (amap, finite + np.inf), (amap * np.nan, finite)):  # an FP16 overflow
        with pytest.raises(EngineError, match="non-finite anomaly (score|map) \\(NaN or infinity\\)"):
            postprocess(outputs, (256, 256))


def _host(address: int, nbytes: int) -> np.ndarray:
    """The host memory at ``address`` (what cuda-python is given) as bytes."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(address))


class _FakeCuda:
    """cuda-python's runtime and a TensorRT engine as a fake that behaves like them across threads (no GPU
    here): work is queued on the stream and runs in order at synchronize, a host-to-device copy reads the
    host buffer when it is queued, and every call lets other threads run (the real ones release the GIL).
    The engine's output is the mean of its input."""

    cudaError_t = types.SimpleNamespace(cudaSuccess=0)
    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice="h2d", cudaMemcpyDeviceToHost="d2h")

    def __init__(self) -> None:
        self.memory: dict[int, np.ndarray] = {}
        self.stream: list[Callable[[], None]] = []
        self.lock = threading.Lock()

    def _queue(self, work: Callable[[], None]) -> tuple[int]:
        time.sleep(0.001)
        with self.lock:
            self.stream.append(work)
        return (0,)

    def cudaGetDeviceCount(self) -> tuple[int, int]:
        return 0, 1

    def cudaStreamCreate(self) -> tuple[int, int]:
        return 0, 7

    def cudaMalloc(self, nbytes: int) -> tuple[int, int]:
        self.memory[len(self.memory) + 1] = np.zeros(nbytes, np.uint8)
        return 0, len(self.memory)

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: str, stream: int) -> tuple[int]:
        if kind == "h2d":
            data = _host(src, nbytes).copy()
            return self._queue(lambda: self.memory[dst].__setitem__(slice(None), data))
        return self._queue(lambda: _host(dst, nbytes).__setitem__(slice(None), self.memory[src]))

    def execute(self, x: int, score: int) -> bool:
        self._queue(lambda: self.memory[score].view(np.float32).fill(self.memory[x].view(np.float32).mean()))
        return True

    def cudaStreamSynchronize(self, stream: int) -> tuple[int]:
        time.sleep(0.001)
        with self.lock:
            while self.stream:
                self.stream.pop(0)()
        return (0,)

    def cudaFree(self, ptr: int) -> tuple[int]:
        return (0,)

    cudaStreamDestroy = cudaFree

    def tensorrt(self) -> types.ModuleType:
        """A ``tensorrt`` module whose engine has input ``x`` (1x3x8x8) and output ``score`` (1)."""
        shapes, address = {"x": (1, 3, 8, 8), "score": (1,)}, {}
        context = types.SimpleNamespace(set_tensor_address=address.__setitem__,
                                        execute_async_v3=lambda stream: self.execute(address["x"], address["score"]))
        engine = types.SimpleNamespace(num_io_tensors=2, get_tensor_name=list(shapes).__getitem__,
                                       get_tensor_shape=shapes.__getitem__, get_tensor_dtype=lambda name: "float32",
                                       get_tensor_mode=lambda name: "in" if name == "x" else "out",
                                       create_execution_context=lambda: context)
        trt = types.ModuleType("tensorrt")
        trt.__version__, trt.nptype = "10.0-fake", lambda dtype: np.float32
        trt.TensorIOMode = types.SimpleNamespace(INPUT="in")
        trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
        trt.Runtime = type("Runtime", (), {"__init__": lambda self, logger: None,
                                           "deserialize_cuda_engine": lambda self, plan: engine})
        return trt


def test_a_tensorrt_engine_shared_by_cameras_judges_each_frame_alone(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeinspect.runtime.backends import tensorrt

    cuda = _FakeCuda()
    monkeypatch.setitem(sys.modules, "tensorrt", cuda.tensorrt())
    monkeypatch.setattr(tensorrt, "cudart", lambda: cuda)
    plan = tmp_path / "model_fp16.engine"
    plan.write_bytes(tensorrt.pack_plan({"tensorrt_version": "10.0-fake", "gpu": "fake GPU"}, b"plan"))
    backend = tensorrt.TensorRTBackend(plan)  # one engine, as the daemon's cameras with one bundle share it
    scores: dict[float, list[float]] = {}

    def camera(value: float) -> None:
        scores[value] = [float(backend.run(np.full((1, 3, 8, 8), value, np.float32))[0][0]) for _ in range(100)]

    threads = [threading.Thread(target=camera, args=(value,)) for value in (1.0, 2.0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert scores == {1.0: [1.0] * 100, 2.0: [2.0] * 100}  # never the other camera's image or output
