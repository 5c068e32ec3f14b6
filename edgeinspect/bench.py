"""``edgeinspect bench``: one row per engine of a bundle, measured side by side on this device.

For each engine: whether it runs here (or why not), size, image AUROC and OK/NOK agreement with the
FP32 engine on the test split, latency of the engine alone and of the whole runtime path
(``Predictor.predict``: preprocess of a decoded frame + engine + post-processing), FPS and the peak
RSS of a torch-free runtime process. Two reference rows time the frozen backbone alone as its own
ONNX graph (FP32 and INT8): the floor the anomaly engines are measured against (``x_backbone``).

Timings are batch 1, each engine alone in a fresh torch-free process of its own (:func:`time_isolated`),
``--runs`` timed calls split into ``--rounds`` rounds that alternate the engines (each after
``--warmup`` untimed calls), so drifts of a shared machine hit every row alike. This module imports
only the standard library and numpy at the top, so its child processes import no torch.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeinspect.device import cpu_flags, cpu_model

MB = 1e6  # sizes are reported in decimal megabytes
ROW_KEYS = ("format", "precision", "status", "size_mb", "image_auroc", "verdict_agreement", "engine_p50_ms",
            "runtime_p50_ms", "runtime_p90_ms", "runtime_p99_ms", "fps", "peak_rss_mb", "x_backbone")


# ------------------------------------------------------------------------------------ timing helpers
def find_images(folder: str | Path) -> list[Path]:
    """Every ``*.png`` under ``folder`` (recursively), sorted; mask files (``*_mask.png``) are skipped."""
    return sorted(p for p in Path(folder).rglob("*.png") if p.is_file() and not p.stem.endswith("_mask"))


def load_images(paths: Sequence[Path]) -> list[np.ndarray]:
    """Decode image files to HxWx3 uint8 RGB arrays (done once, outside any timing)."""
    from edgeinspect.imageio import read_image

    return [read_image(p) for p in paths]


def summarize(ms: Sequence[float]) -> dict[str, float]:
    """Mean, p50, p90, p95, p99, min and max of a list of milliseconds."""
    a = np.asarray(ms, np.float64)
    pct = {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 95, 99)}
    return {"mean": float(a.mean()), **pct, "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


Case = tuple[Callable[[Any], Any], Sequence[Any]]


def time_interleaved(cases: dict[str, Case], warmup: int, runs: int, rounds: int
                     ) -> dict[str, tuple[list[float], list[Any]]]:
    """Time several ``(fn, inputs)`` cases in alternating rounds; per case the ms and return value of each call.

    Each case first gets ``warmup`` untimed calls. Then ``runs`` timed calls per case are split into
    ``rounds`` rounds; in every round each case runs its share back to back (after one untimed call
    that re-warms its caches and thread pools), so slow drifts of the machine hit all cases alike
    while each case still runs as it would on its own. Call ``i`` of a case gets
    ``inputs[i % len(inputs)]``, so every case sees the same images in the same order.
    """
    rounds = max(1, min(rounds, runs))
    out: dict[str, tuple[list[float], list[Any]]] = {name: ([], []) for name in cases}
    for fn, inputs in cases.values():
        for i in range(warmup):
            fn(inputs[i % len(inputs)])
    for r in range(rounds):
        start, stop = r * runs // rounds, (r + 1) * runs // rounds
        for name, (fn, inputs) in cases.items():
            if r:
                fn(inputs[start % len(inputs)])
            ms, results = timed_calls(fn, inputs, start, stop)
            out[name][0].extend(ms)
            out[name][1].extend(results)
    return out


def timed_calls(fn: Callable[[Any], Any], inputs: Sequence[Any], start: int, stop: int
                ) -> tuple[list[float], list[Any]]:
    """Calls ``start`` to ``stop`` of ``fn`` (call ``i`` on ``inputs[i % len(inputs)]``): ms and return values."""
    ms, results = [], []
    for i in range(start, stop):
        item = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        results.append(fn(item))
        ms.append(1e3 * (time.perf_counter() - t0))
    return ms, results


# ------------------------------------------------------------------------------------ the device
def gpu_name() -> str | None:
    """The NVIDIA GPU(s) nvidia-smi reports, or None."""
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip().replace("\n", "; ") or None


def device_info() -> dict[str, Any]:
    """Platform, CPU (model, feature flags, cores), GPU and library versions (missing ones are None)."""
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu_model(),
                            "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(), "gpu": gpu_name(),
                            "python": platform.python_version(), "numpy": np.__version__,
                            "loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    for name in ("onnxruntime", "torch", "cv2", "faiss", "tensorrt", "coremltools"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "unknown")
        except ImportError:
            info[name] = None
    return info


# ----------------------------------------------------------------------------------- RSS child process
def maxrss_mb() -> float:
    """Peak resident set size of this process in MB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / MB if sys.platform == "darwin" else rss * 1024 / MB


def in_child(function: str, *args: Any) -> Any:
    """``function(*args)`` of this module run in a fresh interpreter (which imports no torch); its JSON result."""
    code = ("import json, sys; from edgeinspect import bench; "
            "print(json.dumps(getattr(bench, sys.argv[1])(*json.loads(sys.argv[2]))))")
    # Linux carries ru_maxrss over execve, so a child exec'd straight from this (torch-sized) process would
    # report at least our peak. A small shell in between forks the interpreter from its own small image.
    proc = subprocess.run(["/bin/sh", "-c", '"$0" "$@"; exit $?', sys.executable, "-c", code, function,
                           json.dumps(args)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{function} child process failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_child(bundle_path: str, engine: str, image_paths: Sequence[str], threads: int | None, runs: int
              ) -> dict[str, Any]:
    """In a fresh interpreter: load the runtime Predictor, predict ``runs`` times, report the peak RSS."""
    start = maxrss_mb()
    from edgeinspect.imageio import read_image
    from edgeinspect.runtime.predictor import Predictor

    predictor = Predictor(bundle_path, engine=engine, threads=threads)
    for i in range(runs):  # images are read one at a time, as a camera delivers them
        predictor.predict(read_image(image_paths[i % len(image_paths)]))
    return {"rss_start_mb": start, "peak_rss_mb": maxrss_mb(), "torch_imported": "torch" in sys.modules}


def timing_child(bundle_path: str, engine: str, image_paths: Sequence[str], threads: int | None, warmup: int,
                 start: int, stop: int) -> dict[str, list[float]]:
    """In a fresh interpreter: the milliseconds of calls ``start`` to ``stop`` of one engine, alone.

    ``engine`` is a bundle engine (``format:precision``: timed as the engine call on preprocessed tensors,
    ``"engine"``, and as the whole runtime path on decoded frames, ``"runtime"``) or an ONNX file (the
    engine call only). Call ``i`` gets image ``i % len(image_paths)``, after ``warmup`` untimed calls."""
    from edgeinspect.bundle import Bundle
    from edgeinspect.imageio import read_image
    from edgeinspect.runtime.backends import OnnxRuntimeBackend
    from edgeinspect.runtime.predictor import Predictor

    bundle = Bundle.open(bundle_path)
    images = [read_image(p) for p in image_paths]
    tensors = [bundle.preprocess(rgb) for rgb in images]
    if engine.endswith(".onnx"):
        cases: dict[str, Case] = {"engine": (OnnxRuntimeBackend(Path(engine), threads=threads).run, tensors)}
    else:
        predictor = Predictor(bundle, engine=engine, threads=threads)
        cases = {"engine": (predictor.backend.run, tensors), "runtime": (predictor.predict, images)}
    out: dict[str, list[float]] = {}
    for name, (fn, inputs) in cases.items():
        for i in range(warmup):
            fn(inputs[(start + i) % len(inputs)])
        out[name] = timed_calls(fn, inputs, start, stop)[0]
    return out


def time_isolated(bundle_path: Path, engines: Sequence[str], image_paths: Sequence[Path], threads: int | None,
                  warmup: int, runs: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per engine (see :func:`timing_child`) the milliseconds of ``runs`` calls, each engine timed alone.

    Every engine runs in a fresh process of its own, as on a line: ONNX Runtime sessions kept alive side
    by side in one process slowed each other, and by different factors (the spinning worker threads of the
    session that just ran compete with the next one; on this 2-core machine the FP32 backbone went from
    2.67 ms alone to 3.01 ms beside its INT8 twin). The runs are split into ``rounds`` rounds that
    alternate the engines, each round a new process after ``warmup`` untimed calls, so slow drifts of a
    shared machine hit every engine alike."""
    rounds = max(1, min(rounds, runs))
    out: dict[str, dict[str, list[float]]] = {engine: {} for engine in engines}
    for r in range(rounds):
        start, stop = r * runs // rounds, (r + 1) * runs // rounds
        for engine in engines:
            timed = in_child("timing_child", str(bundle_path), engine, [str(p) for p in image_paths], threads,
                             warmup, start, stop)
            for name, ms in timed.items():
                out[engine].setdefault(name, []).extend(ms)
    return out


def measure_rss(bundle_path: Path, engine: str, image_paths: Sequence[Path], threads: int | None, runs: int
                ) -> dict[str, Any]:
    """Peak RSS of the runtime alone, measured in a child interpreter without torch."""
    return in_child("rss_child", str(bundle_path), engine, [str(p) for p in image_paths], threads, runs)


# ------------------------------------------------------------------------------------ backbone alone
def backbone_engines(bundle: Any, workdir: Path, calibration: list[np.ndarray]) -> dict[str, Path]:
    """The bundle's frozen feature extractor as FP32 and INT8 ONNX graphs (what every engine builds on)."""
    import torch

    from edgeinspect.config import default_config
    from edgeinspect.export.onnx import write_fp32
    from edgeinspect.export.quantize import quantize_qdq
    from edgeinspect.train.trainer import load_model

    class Backbone(torch.nn.Module):
        def __init__(self, extractor: torch.nn.Module):
            super().__init__()
            self.extractor = extractor

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return self.extractor(x)

    model = load_model(bundle, "cpu")
    fp32, int8 = workdir / "backbone_fp32.onnx", workdir / "backbone_int8.onnx"
    write_fp32(Backbone(model.extractor), fp32, tuple(bundle.manifest["input"]["shape"]),
               list(model.extractor.stages))
    int8_settings = default_config("export")["int8"]  # the engines' own INT8 weights: per channel, 7 bits or 8
    quantize_qdq(fp32, int8, calibration, [], "minmax", True, bool(int8_settings["reduce_range"]))
    return {"fp32": fp32, "int8": int8}


# ------------------------------------------------------------------------------------ the test images
@dataclass
class TestImages:
    """The images a bundle is measured on, their labels (True: defective) and what they are."""

    paths: list[Path]
    labels: np.ndarray
    description: str
    frozen_backbone: bool  # the model's backbone is frozen: its engine alone is the floor (reference rows)


def anomaly_test_images(bundle: Any, data_root: str | Path | None, category: str | None) -> TestImages:
    """The test split of an anomaly bundle's MVTec category (a family's own recorded hold-out, if any)."""
    data = bundle.manifest["data"]
    category_dir = Path(data_root or data["root"]) / (category or data["category"])
    test_dir = category_dir / "test"
    # a family that splits the data itself (CAM) is measured on the hold-out its bundle records, never on
    # images it was fit on
    recorded = data.get("split")
    paths = [category_dir / p for p in recorded["test"]] if recorded else find_images(test_dir)
    missing = [p for p in paths if not p.is_file()]
    if not paths or missing:
        from edgeinspect.errors import DataError

        where = f"{missing[0]} (of the bundle's recorded test split)" if missing else f"no test images under {test_dir}"
        raise DataError(f"{where}; give --data ROOT --category CAT")
    return TestImages(paths, np.array([p.parent.name != "good" for p in paths]), category or data["category"], True)


def has_split(root: str | Path, split: str) -> bool:
    """Whether the COCO folder has that split."""
    return (Path(root) / split / "annotations.json").is_file()


def default_split(root: str | Path) -> str:
    """The split a detector is tested on (training reports on it, ``evaluate`` and this benchmark use it):
    ``test``, or ``val`` when the folder has none (``data coco --test-ratio 0`` writes train/val only)."""
    return "test" if has_split(root, "test") else "val"


def detection_test_images(bundle: Any, data_root: str | Path | None, category: str | None) -> TestImages:
    """The ``test`` split of a detector bundle's COCO folder (``val`` when it has none), images in id order; an
    image is defective when it has an annotation of a class not in the bundle's ``ok_classes``. Read with the
    standard library (no pycocotools), so the torch-free inspector lists it too."""
    from edgeinspect.errors import DataError

    root = Path(data_root or bundle.manifest["data"]["root"])
    name = default_split(root)
    if not has_split(root, name):
        raise DataError(f"{root} has no test/ or val/ annotations.json; give --data COCO_DIR")
    path = root / name / "annotations.json"
    try:
        coco = json.loads(path.read_text())
        ok = set(bundle.manifest["detection"].get("ok_classes") or [])
        defect = {c["id"] for c in coco["categories"] if c["name"] not in ok}
        flagged = {a["image_id"] for a in coco["annotations"] if a["category_id"] in defect}
        images = sorted(coco["images"], key=lambda image: image["id"])
        paths = [root / name / "images" / image["file_name"] for image in images]
        labels = np.array([image["id"] in flagged for image in images], bool)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not a COCO annotation file: {type(exc).__name__}: {exc}") from None
    return TestImages(paths, labels, f"COCO {name}", False)


TEST_IMAGES: dict[str, Callable[[Any, str | Path | None, str | None], TestImages]] = {
    "anomaly_map": anomaly_test_images, "detections": detection_test_images}


def bundle_test_images(bundle: Any, data_root: str | Path | None = None, category: str | None = None) -> TestImages:
    """The images a bundle is tested on, by its task (:data:`TEST_IMAGES`); ``data_root`` / ``category`` replace
    the ones the bundle records."""
    from edgeinspect.runtime.postprocess import bundle_task

    return TEST_IMAGES[bundle_task(bundle)](bundle, data_root, category)


# ------------------------------------------------------------------------------------------- bench
def bench(bundle_path: str | Path, engines: Sequence[str] = (), *, data_root: str | Path | None = None,
          category: str | None = None, warmup: int = 5, runs: int = 50, rounds: int = 5, threads: int | None = None,
          backbone: bool = True, rss: bool = True) -> dict[str, Any]:
    """``{"device": {...}, "rows": [...]}`` for the bundle's engines (or the ``engines`` selectors)."""
    from edgeinspect.bundle import Bundle, size_path
    from edgeinspect.errors import EdgeInspectError
    from edgeinspect.runtime.backends import backend_class, parse_selector
    from edgeinspect.runtime.predictor import Predictor
    from edgeinspect.train.metrics import image_auroc

    info = device_info()
    bundle = Bundle.open(bundle_path)
    test = bundle_test_images(bundle, data_root, category)
    paths, labels = test.paths, test.labels
    images = load_images(paths)
    tensors = [bundle.preprocess(rgb) for rgb in images]
    selected = [parse_selector(s) for s in engines] or [(e["format"], e["precision"]) for e in bundle.engines]

    rows: list[dict[str, Any]] = []
    predictors: dict[str, Predictor] = {}  # the engines that run here, opened
    for fmt, precision in selected:
        row: dict[str, Any] = {"format": fmt, "precision": precision, "status": "ok"}
        entry = bundle.find_engine(fmt, precision)
        rows.append(row)
        if entry is None:
            row["status"] = "not in the bundle (edgeinspect export)"
            continue
        row["size_mb"] = round(size_path(bundle.path / entry["file"]) / MB, 2)
        try:
            reason = backend_class(fmt).unavailable_reason()
        except Exception as exc:  # a format without runtime backend (Triton)
            reason = str(exc)
        if reason:
            row["status"] = reason
            continue
        try:  # one engine that cannot be opened (a damaged file, a plan of another TensorRT) is that row's status
            predictors[f"{fmt}:{precision}"] = Predictor(bundle, engine=f"{fmt}:{precision}", threads=threads)
        except EdgeInspectError as exc:
            row["status"] = f"cannot be opened: {' '.join(str(exc).split())}"

    with tempfile.TemporaryDirectory() as tmp:
        timed_engines = list(predictors)
        if backbone and test.frozen_backbone and "backbone" in bundle.manifest["model"]:  # none when trained
            for precision, path in backbone_engines(bundle, Path(tmp), tensors[:16]).items():
                rows.append({"format": "backbone alone", "precision": precision, "status": "ok",
                             "size_mb": round(path.stat().st_size / MB, 2), "file": str(path)})
                timed_engines.append(str(path))
        timed = time_isolated(bundle.path, timed_engines, paths, threads, warmup, runs, rounds)

    reference = None
    if "onnx:fp32" in predictors:
        reference = [predictors["onnx:fp32"].predict(rgb) for rgb in images]
    for row in rows:
        key = f"{row['format']}:{row['precision']}"
        if row["format"] == "backbone alone":
            row["engine_p50_ms"] = round(summarize(timed[row.pop("file")]["engine"])["p50"], 2)
            continue
        if key not in predictors:
            continue
        predictions = [predictors[key].predict(rgb) for rgb in images]
        row["image_auroc"] = round(image_auroc(labels, np.array([p.raw_score for p in predictions])), 4)
        if reference is not None:
            row["verdict_agreement"] = round(float(np.mean([a.verdict == b.verdict
                                                            for a, b in zip(predictions, reference, strict=True)])), 4)
        engine_ms, runtime_ms = summarize(timed[key]["engine"]), summarize(timed[key]["runtime"])
        row.update({"engine_p50_ms": round(engine_ms["p50"], 2), "runtime_p50_ms": round(runtime_ms["p50"], 2),
                    "runtime_p90_ms": round(runtime_ms["p90"], 2), "runtime_p99_ms": round(runtime_ms["p99"], 2),
                    "fps": round(1e3 / runtime_ms["mean"], 1)})
        if rss:
            row["peak_rss_mb"] = round(measure_rss(bundle.path, key, paths, threads, warmup + runs)["peak_rss_mb"], 1)
    floor = next((r["engine_p50_ms"] for r in rows if r["format"] == "backbone alone" and r["precision"] == "fp32"),
                 None)
    for row in rows:
        if floor and "runtime_p50_ms" in row:
            row["x_backbone"] = round(row["runtime_p50_ms"] / floor, 2)
        elif floor and row["format"] == "backbone alone":
            row["x_backbone"] = round(row["engine_p50_ms"] / floor, 2)
    del timed, predictors
    gc.collect()
    info["loadavg_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"device": info, "bundle": {"path": str(bundle.path), "bundle_id": bundle.bundle_id,
                                       "family": bundle.family, "category": test.description,
                                       "n_images": len(paths), "threads": threads or os.cpu_count(),
                                       "warmup": warmup, "runs": runs, "rounds": rounds},
            "rows": rows}


def markdown_table(report: dict[str, Any]) -> str:
    """The rows as a Markdown table, headed by the device and the bundle."""
    d, b = report["device"], report["bundle"]
    head = (f"{b['bundle_id']} ({b['family']}, {b['category']}, {b['n_images']} test images); {d['cpu']} "
            f"({d['cpu_count']} CPUs; {', '.join(d['cpu_flags']) or 'no listed SIMD flags'}), "
            f"GPU: {d['gpu'] or 'none'}; "
            f"onnxruntime {d['onnxruntime']}; batch 1, {b['threads']} threads, {b['runs']} runs after "
            f"{b['warmup']} warm-up in {b['rounds']} rounds")
    lines = [head, "", "| " + " | ".join(ROW_KEYS) + " |", "|" + "---|" * len(ROW_KEYS)]
    for row in report["rows"]:
        lines.append("| " + " | ".join("-" if row.get(k) is None else str(row[k]) for k in ROW_KEYS) + " |")
    return "\n".join(lines) + "\n"
