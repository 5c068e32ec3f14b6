"""Where should the anomaly scoring run: inside the ONNX graph, or in the runtime after a features-only engine?

Usage::

    python -m benchmarks.scoring_placement BUNDLE [BUNDLE...] [--images DIR] [--warmup 5] [--runs 50]
                                           [--threads 2] [--json OUT]

For every PatchCore or PaDiM bundle, per image at batch 1 on the same decoded images:

(A) ``in-graph``: the bundle's full ONNX engine (features, nearest-neighbour / Mahalanobis scoring,
    bilinear upsample, Gaussian blur and max, all in one graph) - the current design.
(B) ``runtime``: an ONNX engine that outputs only the patch features (``model.embed``, exported here
    to a temporary directory), then the scoring in the runtime - FAISS ``IndexFlatL2`` k=1 over the
    memory bank for PatchCore; numpy (batched matmul, and einsum) over the per-position Gaussians for
    PaDiM - then the same map head with OpenCV (``cv2.resize`` INTER_LINEAR, ``cv2.GaussianBlur``
    with the model's sigma and kernel radius, reflect-101 border) and the max.

B's parts (features, scoring, map head) are timed separately and as a total. An untimed pass over
every image compares A and B (max |difference| of image scores and maps) to show they compute the
same thing. ONNX Runtime intra-op threads, FAISS OpenMP threads, numpy's BLAS threads and OpenCV
threads are all set to ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.latency import MB, images_for, load_images, machine_info, summarize

Scorer = Callable[[np.ndarray], np.ndarray]


# ------------------------------------------------------------------------------ features-only engine
def export_features_onnx(model: Any, path: Path, input_shape: Sequence[int]) -> Path:
    """Export ``model.embed`` (image -> N x D x h x w patch features) as an ONNX graph, opset 17."""
    import torch

    class Features(torch.nn.Module):
        """The anomaly model without scoring and map head."""

        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """Patch features of a batch of images."""
            return self.inner.embed(x)

    dummy = torch.zeros(tuple(input_shape), dtype=torch.float32)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings, as in export/onnx.py
        torch.onnx.export(Features(model.eval().cpu()), (dummy,), str(path), input_names=["image"],
                          output_names=["features"], opset_version=17, dynamo=False, do_constant_folding=True)
    return path


def ort_session(path: Path, threads: int) -> Any:
    """A CPU ONNX Runtime session with ``threads`` intra-op threads (as OnnxRuntimeBackend makes it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------- runtime scoring
def patchcore_scorer(memory_bank: np.ndarray) -> Scorer:
    """FAISS exact L2 search (k=1): D x h x w features -> h x w distances to the nearest bank entry."""
    import faiss

    index = faiss.IndexFlatL2(memory_bank.shape[1])
    index.add(np.ascontiguousarray(memory_bank, dtype=np.float32))

    def score(features: np.ndarray) -> np.ndarray:
        d, h, w = features.shape
        patches = np.ascontiguousarray(features.reshape(d, h * w).T)
        sq, _ = index.search(patches, 1)
        return np.sqrt(np.maximum(sq[:, 0], 0.0)).reshape(h, w)

    return score


def padim_scorer(mean: np.ndarray, inv_cov: np.ndarray, method: str) -> Scorer:
    """Mahalanobis distance per position with numpy: D x h x w features -> h x w distances.

    ``matmul``: ``(delta[:, None, :] @ inv_cov)[:, 0] * delta`` summed; ``einsum``: one
    ``einsum("pd,pde,pe->p")`` call (numpy's C loop, no BLAS).
    """
    mean = np.ascontiguousarray(mean, dtype=np.float32)
    inv_cov = np.ascontiguousarray(inv_cov, dtype=np.float32)

    def score(features: np.ndarray) -> np.ndarray:
        d, h, w = features.shape
        delta = features.reshape(d, h * w).T - mean                                   # P x D
        if method == "matmul":
            dist_sq = (np.matmul(delta[:, None, :], inv_cov)[:, 0, :] * delta).sum(1)
        else:
            dist_sq = np.einsum("pd,pde,pe->p", delta, inv_cov, delta)
        return np.sqrt(np.maximum(dist_sq, 0.0)).reshape(h, w)

    return score


def map_head(sigma: float, size: tuple[int, int]) -> Callable[[np.ndarray], tuple[np.ndarray, float]]:
    """OpenCV twin of AnomalyModel's head: bilinear upsample to ``size``, Gaussian blur, max."""
    import cv2

    radius = max(1, int(4.0 * sigma + 0.5))   # the kernel radius of train.models.base.GaussianBlur
    ksize = (2 * radius + 1, 2 * radius + 1)
    height, width = size

    def head(patch_scores: np.ndarray) -> tuple[np.ndarray, float]:
        amap = cv2.resize(patch_scores.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        if sigma > 0:
            amap = cv2.GaussianBlur(amap, ksize, sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
        return amap, float(amap.max())

    return head


# ------------------------------------------------------------------------------------------ benchmark
def time_runtime_variant(features_session: Any, scorer: Scorer, head: Callable, tensors: Sequence[np.ndarray],
                         warmup: int, runs: int) -> dict[str, dict[str, float]]:
    """Per-image ms of (B): features engine, scoring, map head and their total."""
    def once(x: np.ndarray) -> tuple[float, float, float, float]:
        t0 = time.perf_counter()
        (features,) = features_session.run(["features"], {"image": x})
        t1 = time.perf_counter()
        patch = scorer(features[0])
        t2 = time.perf_counter()
        head(patch)
        t3 = time.perf_counter()
        return 1e3 * (t1 - t0), 1e3 * (t2 - t1), 1e3 * (t3 - t2), 1e3 * (t3 - t0)

    for i in range(warmup):
        once(tensors[i % len(tensors)])
    parts = np.array([once(tensors[i % len(tensors)]) for i in range(runs)])
    return {name: summarize(parts[:, k]) for k, name in enumerate(("features", "scoring", "map_head", "total"))}


def bench_bundle(bundle_path: str | Path, images_dir: str | Path | None, warmup: int, runs: int,
                 threads: int) -> dict[str, Any]:
    """A vs B timings, sizes and agreement for one PatchCore or PaDiM bundle."""
    from edgeinspect.bundle import Bundle
    from edgeinspect.runtime.backends import OnnxRuntimeBackend
    from edgeinspect.train.trainer import load_model

    bundle = Bundle.open(bundle_path)
    if bundle.family == "patchcore":
        stats_keys = ["memory_bank"]
        scorers = {"faiss IndexFlatL2": patchcore_scorer(bundle.load_array("memory_bank"))}
    elif bundle.family == "padim":
        stats_keys = ["padim_mean", "padim_inv_cov", "padim_channel_idx"]
        mean, inv_cov = bundle.load_array("padim_mean"), bundle.load_array("padim_inv_cov")
        scorers = {f"numpy {m}": padim_scorer(mean, inv_cov, m) for m in ("matmul", "einsum")}
    else:
        raise SystemExit(f"{bundle_path}: family {bundle.family!r} has no runtime scorer here")
    paths = images_for(bundle.manifest, images_dir)
    preprocess = bundle.preprocess
    tensors = [preprocess(rgb) for rgb in load_images(paths)]
    input_size = tuple(preprocess.input_size)
    head = map_head(float(bundle.manifest["model"]["smoothing_sigma"]), input_size)
    full_path, _ = bundle.engine("onnx")
    full = OnnxRuntimeBackend(full_path, ("cpu",), threads)

    with tempfile.TemporaryDirectory(prefix="scoring_placement_") as tmp:
        features_path = export_features_onnx(load_model(bundle, "cpu"), Path(tmp) / "features.onnx",
                                             bundle.manifest["input"]["shape"])
        features_mb = features_path.stat().st_size / MB
        features_session = ort_session(features_path, threads)

    # Agreement, untimed: every image once through A and through every B variant.
    agreement = {}
    a_out = [full.run(x) for x in tensors]
    feats = [features_session.run(["features"], {"image": x})[0][0] for x in tensors]
    for name, scorer in scorers.items():
        b_out = [head(scorer(f)) for f in feats]
        agreement[name] = {
            "max_abs_score_diff": max(abs(float(a[1][0]) - b[1]) for a, b in zip(a_out, b_out, strict=True)),
            "max_abs_map_diff": max(float(np.abs(a[0][0, 0] - b[0]).max()) for a, b in zip(a_out, b_out,
                                                                                             strict=True)),
            "n_images": len(tensors)}
    threshold = float(bundle.decision["threshold"])
    for entry in agreement.values():
        entry["max_abs_score_diff_over_threshold"] = entry["max_abs_score_diff"] / threshold

    def run_full(x: np.ndarray) -> None:
        full.run(x)

    for i in range(warmup):
        run_full(tensors[i % len(tensors)])
    a_ms = []
    for i in range(runs):
        t0 = time.perf_counter()
        run_full(tensors[i % len(tensors)])
        a_ms.append(1e3 * (time.perf_counter() - t0))
    in_graph = {"total": summarize(a_ms)}
    runtime = {name: time_runtime_variant(features_session, scorer, head, tensors, warmup, runs)
               for name, scorer in scorers.items()}
    features_mean = float(np.mean([v["features"]["mean"] for v in runtime.values()]))
    stats_mb = sum(bundle.file(k).stat().st_size for k in stats_keys) / MB
    return {"bundle": str(bundle_path), "bundle_id": bundle.bundle_id, "family": bundle.family,
            "category": bundle.manifest["data"]["category"], "n_images": len(paths), "warmup": warmup,
            "runs": runs, "threads": threads, "threshold": threshold,
            "statistics_shapes": {k: list(bundle.load_array(k).shape) for k in stats_keys},
            "A_in_graph_ms": in_graph,
            "A_scoring_and_head_estimate_ms": in_graph["total"]["mean"] - features_mean,
            "B_runtime_ms": runtime, "agreement": agreement,
            "sizes_mb": {"full_onnx": full_path.stat().st_size / MB, "features_onnx": features_mb,
                         "statistics_npy": stats_mb}}


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """Plain-text table: per bundle, A's total, each B variant's parts and total, and the agreement."""
    lines = [f"{'bundle':<24}{'placement':<32}{'features':>9}{'scoring':>9}{'map head':>9}{'total':>9}"
             f"{'p95':>8}{'max|dscore|':>13}"]
    for r in results:
        label = f"{Path(r['bundle']).name} ({r['family']})"
        a = r["A_in_graph_ms"]["total"]
        est = r["A_scoring_and_head_estimate_ms"]
        lines.append(f"{label:<24}{'A in graph (ONNX)':<32}{'':>9}{'':>9}{'':>9}{a['mean']:>9.2f}{a['p95']:>8.2f}"
                     f"{'-':>13}")
        lines.append(f"{'':<24}{'  of which scoring+head (est.)':<32}{'':>9}{est:>18.2f}")
        for name, parts in r["B_runtime_ms"].items():
            agree = r["agreement"][name]["max_abs_score_diff"]
            lines.append(f"{'':<24}{'B runtime: ' + name:<32}{parts['features']['mean']:>9.2f}"
                         f"{parts['scoring']['mean']:>9.2f}{parts['map_head']['mean']:>9.2f}"
                         f"{parts['total']['mean']:>9.2f}{parts['total']['p95']:>8.2f}{agree:>13.2e}")
    lines.append("")
    lines.append(f"{'bundle':<24}{'full onnx MB':>13}{'features onnx MB':>18}{'stats .npy MB':>15}"
                 f"{'threshold':>11}{'images':>8}")
    for r in results:
        s = r["sizes_mb"]
        lines.append(f"{Path(r['bundle']).name + ' (' + r['family'] + ')':<24}{s['full_onnx']:>13.1f}"
                     f"{s['features_onnx']:>18.1f}{s['statistics_npy']:>15.1f}{r['threshold']:>11.4g}"
                     f"{r['n_images']:>8}")
    return "\n".join(lines)


def set_threads(threads: int) -> dict[str, Any]:
    """Give FAISS (OpenMP), numpy's BLAS and OpenCV ``threads`` threads; returns what was set."""
    import cv2
    import faiss

    faiss.omp_set_num_threads(threads)
    cv2.setNumThreads(threads)
    done: dict[str, Any] = {"faiss_omp": threads, "opencv": threads, "onnxruntime_intra_op": threads}
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads, user_api="blas")
        done["numpy_blas"] = threads
    except ImportError:
        done["numpy_blas"] = "unchanged (threadpoolctl not installed)"
    return done


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scoring_placement",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("bundles", nargs="+", metavar="BUNDLE", help="PatchCore / PaDiM bundles with an ONNX engine")
    parser.add_argument("--images", default=None, help="folder of *.png images (default: each bundle's test images)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls before each timed loop")
    parser.add_argument("--runs", type=int, default=50, help="timed calls per placement (cycling through the images)")
    parser.add_argument("--threads", type=int, default=2, help="threads for ONNX Runtime, FAISS, BLAS and OpenCV")
    parser.add_argument("--json", dest="json_out", default=None, help="write every figure and machine info here")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--runs and --threads must be >= 1 and --warmup >= 0")

    threads = set_threads(args.threads)
    info = machine_info()  # load average before the run: other processes skew timings
    results = [bench_bundle(b, args.images, args.warmup, args.runs, args.threads) for b in args.bundles]
    info["loadavg_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(f"{info['cpu']} ({info['cpu_count']} CPUs), {info['platform']}; onnxruntime {info['onnxruntime']}, "
          f"faiss {info['faiss']}, numpy {info['numpy']}; ms per image (mean; p95 of the total), batch 1, "
          f"{args.runs} runs after {args.warmup} warm-up, {args.threads} threads")
    print(format_table(results))
    if args.json_out:
        report = {"benchmark": "scoring_placement", "machine": info, "threads": threads, "argv": sys.argv,
                  "results": results}
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
