"""Per-image latency, throughput and memory of bundles: preprocess, PyTorch, ONNX Runtime, runtime Predictor.

Usage::

    python -m benchmarks.latency BUNDLE [BUNDLE...] [--images DIR] [--warmup 5] [--runs 50]
                                 [--rounds 5] [--threads N] [--json OUT]

Every figure is per image at batch 1 on the CPU, on the same decoded images (decoding is not timed):

* ``preprocess``: ``bundle.preprocess(rgb)`` (resize, normalise, to NCHW float32);
* ``torch_forward``: the PyTorch model rebuilt with ``load_model`` (``torch.no_grad``);
* ``onnx_engine``: ``OnnxRuntimeBackend.run`` on the bundle's ONNX engine;
* ``predictor``: ``Predictor.predict(rgb)`` - preprocess + engine + post-processing (regions).

Each stage gets ``--warmup`` untimed calls, then ``--runs`` timed calls that cycle through the images
in sorted order, split into ``--rounds`` rounds that alternate the stages (see
:func:`time_interleaved`). Throughput is 1000 / mean Predictor ms (one camera stream, batch 1).
Peak RSS is measured in a child process that imports only the runtime (no torch), loads the
:class:`~edgeinspect.runtime.predictor.Predictor` and predicts ``warmup + runs`` images read one at a
time, so it is the memory a deployed daemon would need.

This module imports only the standard library and numpy at the top (torch is imported inside the
functions that need it), so the RSS child process can import it without pulling in torch.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
MB = 1e6  # sizes are reported in decimal megabytes


# ------------------------------------------------------------------------------------ shared helpers
def find_images(folder: str | Path) -> list[Path]:
    """Every ``*.png`` under ``folder`` (recursively), sorted; mask files (``*_mask.png``) are skipped."""
    return sorted(p for p in Path(folder).rglob("*.png") if p.is_file() and not p.stem.endswith("_mask"))


def bundle_test_dir(manifest: dict[str, Any]) -> Path:
    """``<data root>/<category>/test`` recorded in a bundle manifest."""
    data = manifest["data"]
    return Path(data["root"]) / data["category"] / "test"


def load_images(paths: Sequence[Path]) -> list[np.ndarray]:
    """Decode image files to HxWx3 uint8 RGB arrays (done once, outside any timing)."""
    from edgeinspect.imageio import read_image

    return [read_image(p) for p in paths]


def images_for(manifest: dict[str, Any], images_dir: str | Path | None) -> list[Path]:
    """The benchmark images: ``images_dir`` if given, else the bundle's own test images."""
    folder = Path(images_dir) if images_dir else bundle_test_dir(manifest)
    paths = find_images(folder)
    if not paths:
        raise SystemExit(f"no *.png images under {folder}")
    return paths


def summarize(ms: Sequence[float]) -> dict[str, float]:
    """Mean, median, 95th percentile, min and max of a list of milliseconds."""
    a = np.asarray(ms, np.float64)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


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
            ms, results = out[name]
            for i in range(start, stop):
                item = inputs[i % len(inputs)]
                t0 = time.perf_counter()
                result = fn(item)
                ms.append(1e3 * (time.perf_counter() - t0))
                results.append(result)
    return out


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """Platform, CPU and library versions (imports torch/onnxruntime lazily; missing ones are None)."""
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu_model(),
                            "cpu_count": os.cpu_count(), "python": platform.python_version(),
                            "numpy": np.__version__,
                            "loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    for name in ("onnxruntime", "torch", "cv2", "faiss"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "unknown")
        except ImportError:
            info[name] = None
    return info


def maxrss_mb() -> float:
    """Peak resident set size of this process in MB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / MB if sys.platform == "darwin" else rss * 1024 / MB


# ----------------------------------------------------------------------------------- RSS child process
def rss_child(bundle_path: str, image_paths: Sequence[str], threads: int | None, runs: int) -> dict[str, Any]:
    """Run in a fresh interpreter: load the runtime Predictor, predict ``runs`` times, report peak RSS."""
    start = maxrss_mb()
    from edgeinspect.imageio import read_image
    from edgeinspect.runtime.predictor import Predictor

    after_import = maxrss_mb()
    predictor = Predictor(bundle_path, threads=threads)
    after_load = maxrss_mb()
    for i in range(runs):  # images are read one at a time, as a camera delivers them
        predictor.predict(read_image(image_paths[i % len(image_paths)]))
    return {"rss_start_mb": start, "rss_after_import_mb": after_import, "rss_after_load_mb": after_load,
            "peak_rss_mb": maxrss_mb(), "predictions": runs, "torch_imported": "torch" in sys.modules}


def measure_rss(bundle_path: Path, image_paths: Sequence[Path], threads: int | None, runs: int) -> dict[str, Any]:
    """Peak RSS of the runtime alone, measured in a child interpreter without torch."""
    args = json.dumps([str(bundle_path), [str(p) for p in image_paths], threads, runs])
    code = ("import json, sys; from benchmarks.latency import rss_child; "
            "print(json.dumps(rss_child(*json.loads(sys.argv[1]))))")
    # Linux carries ru_maxrss over execve, so a child exec'd straight from this (torch-sized) process would
    # report at least our peak. A small shell in between forks the interpreter from its own small image.
    proc = subprocess.run(["/bin/sh", "-c", '"$0" "$@"; exit $?', sys.executable, "-c", code, args],
                          cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS child process failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- benchmark
def torch_forward(bundle: Any, threads: int) -> Callable[[np.ndarray], Any]:
    """The bundle's PyTorch model as a function of a preprocessed array (CPU, batch 1, no_grad)."""
    import torch

    from edgeinspect.train.trainer import load_model

    torch.set_num_threads(threads)
    model = load_model(bundle, "cpu")

    def forward(x: np.ndarray) -> Any:
        with torch.no_grad():
            return model(torch.from_numpy(x))

    return forward


def bench_bundle(bundle_path: str | Path, images_dir: str | Path | None, warmup: int, runs: int,
                 threads: int, rounds: int) -> dict[str, Any]:
    """All latency, throughput, size and memory figures of one bundle."""
    from edgeinspect.bundle import Bundle
    from edgeinspect.runtime.backends import OnnxRuntimeBackend
    from edgeinspect.runtime.predictor import Predictor

    bundle = Bundle.open(bundle_path)
    paths = images_for(bundle.manifest, images_dir)
    images = load_images(paths)
    preprocess = bundle.preprocess
    engine_path, _ = bundle.engine("onnx")
    tensors = [preprocess(rgb) for rgb in images]

    predictor = Predictor(bundle, threads=threads)
    timed = time_interleaved({
        "preprocess": (preprocess, images),
        "torch_forward": (torch_forward(bundle, threads), tensors),
        "onnx_engine": (OnnxRuntimeBackend(engine_path, ("cpu",), threads).run, tensors),
        "predictor": (predictor.predict, images),
    }, warmup, runs, rounds)
    stages = {name: summarize(ms) for name, (ms, _) in timed.items()}
    stages["predictor_postprocess"] = summarize([p.latency_ms["postprocess"] for p in timed["predictor"][1]])
    del timed
    gc.collect()

    rss = measure_rss(Path(bundle_path), paths, threads, warmup + runs)
    return {"bundle": str(bundle_path), "bundle_id": bundle.bundle_id, "family": bundle.family,
            "category": bundle.manifest["data"]["category"], "input_shape": bundle.manifest["input"]["shape"],
            "images_dir": str(Path(images_dir) if images_dir else bundle_test_dir(bundle.manifest)),
            "n_images": len(paths), "image_hw": sorted({tuple(im.shape[:2]) for im in images}),
            "warmup": warmup, "runs": runs, "rounds": rounds, "threads": threads, "ms": stages,
            "throughput_img_per_s": 1e3 / stages["predictor"]["mean"], "bundle_mb": bundle.size_bytes() / MB,
            "onnx_mb": engine_path.stat().st_size / MB, "runtime_rss": rss}


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """A plain-text table: one row per bundle and stage, then throughput, memory and sizes."""
    lines = [f"{'bundle':<28}{'stage':<24}{'mean ms':>9}{'p50 ms':>9}{'p95 ms':>9}"]
    names = {"preprocess": "preprocess", "torch_forward": "torch forward", "onnx_engine": "onnx engine",
             "predictor": "Predictor.predict", "predictor_postprocess": "  of which postprocess"}
    for r in results:
        label = f"{Path(r['bundle']).name} ({r['family']})"
        for key, name in names.items():
            s = r["ms"][key]
            lines.append(f"{label:<28}{name:<24}{s['mean']:>9.2f}{s['p50']:>9.2f}{s['p95']:>9.2f}")
            label = ""
    lines.append("")
    lines.append(f"{'bundle':<28}{'images/s':>9}{'peak RSS MB':>13}{'bundle MB':>11}{'onnx MB':>9}"
                 f"{'images':>8}{'threads':>9}")
    for r in results:
        label = f"{Path(r['bundle']).name} ({r['family']})"
        lines.append(f"{label:<28}{r['throughput_img_per_s']:>9.1f}{r['runtime_rss']['peak_rss_mb']:>13.1f}"
                     f"{r['bundle_mb']:>11.1f}{r['onnx_mb']:>9.1f}{r['n_images']:>8}{r['threads']:>9}")
    return "\n".join(lines)


def add_timing_arguments(parser: argparse.ArgumentParser, unit: str) -> None:
    """The image and timing options both benchmarks share (``unit``: what is being alternated)."""
    parser.add_argument("--images", default=None, help="folder of *.png images (default: each bundle's test images)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls before each timed loop")
    parser.add_argument("--runs", type=int, default=50, help=f"timed calls per {unit} (cycling through the images)")
    parser.add_argument("--rounds", type=int, default=5,
                        help=f"split the runs into this many rounds that alternate the {unit}s (see time_interleaved)")


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.split("\n")[0])
    parser.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle directories with an ONNX engine")
    add_timing_arguments(parser, "stage")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch and ONNX Runtime intra-op threads (default: all CPUs)")
    parser.add_argument("--json", dest="json_out", default=None, help="write every figure and machine info here")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--runs and --threads must be >= 1 and --warmup >= 0")

    info = machine_info()  # load average before the run: other processes skew timings
    results = [bench_bundle(b, args.images, args.warmup, args.runs, args.threads, args.rounds) for b in args.bundles]
    info["loadavg_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(f"{info['cpu']} ({info['cpu_count']} CPUs), {info['platform']}; onnxruntime {info['onnxruntime']}, "
          f"torch {info['torch']}; {args.runs} runs after {args.warmup} warm-up, batch 1, {args.threads} threads")
    print(format_table(results))
    if args.json_out:
        report = {"benchmark": "latency", "machine": info, "argv": sys.argv, "results": results}
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
