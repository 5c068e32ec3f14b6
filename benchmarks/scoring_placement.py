"""Where should the anomaly scoring run: inside the ONNX graph, or in the runtime after a features-only engine?

Usage::

    python -m benchmarks.scoring_placement BUNDLE [BUNDLE...] [--images DIR] [--warmup 5] [--runs 50]
                                           [--rounds 5] [--threads 2] [--json OUT]

For every PatchCore or PaDiM bundle, per image at batch 1 on the same decoded images:

(A) ``in-graph``: the bundle's full ONNX engine (features, nearest-neighbour / Mahalanobis scoring,
    bilinear upsample, Gaussian blur and max, all in one graph) - the current design.
(B) ``runtime``: an ONNX engine that outputs only the patch features (``model.embed``, exported here
    to a temporary directory), then the scoring in the runtime - FAISS ``IndexFlatL2`` k=1 over the
    memory bank for PatchCore; numpy (batched matmul, and einsum) over the per-position Gaussians for
    PaDiM - then the same map head with OpenCV (``cv2.resize`` INTER_LINEAR, ``cv2.GaussianBlur``
    with the model's sigma and kernel radius, reflect-101 border) and the max.

B's parts (features, scoring, map head) are timed separately and as a total. ``--runs`` timed calls
per placement after ``--warmup`` untimed ones, in ``--rounds`` rounds that alternate A and the B
variants (see :func:`edgeinspect.bench.time_interleaved`). An untimed pass over
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

from edgeinspect.bench import MB, Case, device_info, find_images, load_images, summarize, time_interleaved

Scorer = Callable[[np.ndarray], np.ndarray]


def images_for(manifest: dict[str, Any], images_dir: str | Path | None) -> list[Path]:
    """The benchmark images: ``images_dir`` if given, else the bundle's own test images."""
    data = manifest["data"]
    folder = Path(images_dir) if images_dir else Path(data["root"]) / data["category"] / "test"
    paths = find_images(folder)
    if not paths:
        raise SystemExit(f"no *.png images under {folder}")
    return paths


def add_timing_arguments(parser: argparse.ArgumentParser, unit: str) -> None:
    """The image and timing options."""
    parser.add_argument("--images", default=None, help="folder of *.png images (default: each bundle's test images)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls before each timed loop")
    parser.add_argument("--runs", type=int, default=50, help=f"timed calls per {unit} (cycling through the images)")
    parser.add_argument("--rounds", type=int, default=5,
                        help=f"split the runs into this many rounds that alternate the {unit}s (see time_interleaved)")


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


def ort_session(path: Path, threads: int, spinning: bool = True) -> Any:
    """A CPU ONNX Runtime session with ``threads`` intra-op threads, as OnnxRuntimeBackend makes it.

    ``spinning`` False sets ``session.intra_op.allow_spinning`` to 0: ONNX Runtime's worker threads
    then sleep right after a run instead of busy-waiting for the next one, which leaves the cores
    to work done after the run in the same process (FAISS / numpy scoring, post-processing).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------- runtime scoring
def patchcore_scorer(memory_bank: np.ndarray, project: Callable[[np.ndarray], np.ndarray]) -> Scorer:
    """FAISS exact L2 search (k=1): D x h x w features -> h x w distances to the nearest bank entry, the
    patches first passed through ``project`` (the bundle's search subspace: ``memory_bank`` is in it)."""
    import faiss

    index = faiss.IndexFlatL2(memory_bank.shape[1])
    index.add(np.ascontiguousarray(memory_bank, dtype=np.float32))

    def score(features: np.ndarray) -> np.ndarray:
        d, h, w = features.shape
        patches = np.ascontiguousarray(project(features.reshape(d, h * w).T), np.float32)
        sq, _ = index.search(patches, 1)
        return np.sqrt(np.maximum(sq[:, 0], 0.0)).reshape(h, w)

    return score


def torch_projection(model: Any, patches: np.ndarray) -> np.ndarray:
    """P x D patches through a PatchCore model's search subspace (the identity for an exact-search bundle)."""
    import torch

    with torch.no_grad():
        return model.subspace(torch.from_numpy(patches)).numpy()


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
def runtime_pipeline(features_session: Any, scorer: Scorer, head: Callable[[np.ndarray], tuple[np.ndarray, float]]
                     ) -> Callable[[np.ndarray], tuple[float, float, float]]:
    """(B) as one function of a preprocessed image; returns the ms of features, scoring and map head."""
    def run(x: np.ndarray) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        (features,) = features_session.run(["features"], {"image": x})
        t1 = time.perf_counter()
        patch = scorer(features[0])
        t2 = time.perf_counter()
        head(patch)
        t3 = time.perf_counter()
        return 1e3 * (t1 - t0), 1e3 * (t2 - t1), 1e3 * (t3 - t2)

    return run


def bench_bundle(bundle_path: str | Path, images_dir: str | Path | None, warmup: int, runs: int,
                 threads: int, rounds: int, spinning: Sequence[bool] = (True, False)) -> dict[str, Any]:
    """A vs B timings (for each ONNX Runtime spinning setting), sizes and agreement for one bundle."""
    from edgeinspect.bundle import Bundle
    from edgeinspect.train.trainer import load_model

    bundle = Bundle.open(bundle_path)
    if bundle.family == "patchcore":
        stats_keys = ["memory_bank"]
        search = load_model(bundle, "cpu")  # its bank as searched, and the projection into that subspace
        scorers = {"faiss IndexFlatL2": patchcore_scorer(search.search.bank(), lambda p: torch_projection(search, p))}
    elif bundle.family == "padim":
        stats_keys = ["padim_mean", "padim_inv_cov", "padim_channel_idx"]
        mean, inv_cov = bundle.load_array("padim_mean"), bundle.load_array("padim_inv_cov")
        scorers = {f"numpy {m}": padim_scorer(mean, inv_cov, m) for m in ("matmul", "einsum")}
    else:
        raise SystemExit(f"{bundle_path}: family {bundle.family!r} has no runtime scorer here")
    paths = images_for(bundle.manifest, images_dir)
    preprocess = bundle.preprocess
    tensors = [preprocess(rgb) for rgb in load_images(paths)]
    head = map_head(float(bundle.manifest["model"]["smoothing_sigma"]), tuple(preprocess.input_size))
    full_path, _ = bundle.engine("onnx")

    with tempfile.TemporaryDirectory(prefix="scoring_placement_") as tmp:
        features_path = export_features_onnx(load_model(bundle, "cpu"), Path(tmp) / "features.onnx",
                                             bundle.manifest["input"]["shape"])
        features_mb = features_path.stat().st_size / MB
        full = {spin: ort_session(full_path, threads, spin) for spin in spinning}
        features = {spin: ort_session(features_path, threads, spin) for spin in spinning}

    # Agreement, untimed: every image once through A and through every B variant.
    threshold = float(bundle.decision["threshold"])
    a_session, f_session = full[spinning[0]], features[spinning[0]]
    a_out = [a_session.run(["anomaly_map", "score"], {"image": x}) for x in tensors]
    feats = [f_session.run(["features"], {"image": x})[0][0] for x in tensors]
    agreement = {}
    for name, scorer in scorers.items():
        b_out = [head(scorer(f)) for f in feats]
        pairs = list(zip(a_out, b_out, strict=True))
        score_diff = max(abs(float(a[1][0]) - b[1]) for a, b in pairs)
        agreement[name] = {"max_abs_score_diff": score_diff,
                           "max_abs_score_diff_over_threshold": score_diff / threshold,
                           "max_abs_map_diff": max(float(np.abs(a[0][0, 0] - b[0]).max()) for a, b in pairs),
                           "n_images": len(tensors)}

    cases: dict[str, Case] = {}
    for spin in spinning:
        session = full[spin]
        cases[f"A|{spin}"] = (lambda x, s=session: s.run(["anomaly_map", "score"], {"image": x}), tensors)
        for name, scorer in scorers.items():
            cases[f"{name}|{spin}"] = (runtime_pipeline(features[spin], scorer, head), tensors)
    timed = time_interleaved(cases, warmup, runs, rounds)

    placements = []
    for spin in spinning:
        a_ms = summarize(timed[f"A|{spin}"][0])
        features_mean = []
        for name in scorers:
            total_ms, parts = timed[f"{name}|{spin}"]
            parts = np.asarray(parts)
            features_mean.append(float(parts[:, 0].mean()))
            placements.append({"placement": "B", "scorer": name, "ort_spinning": spin,
                               "ms": {"features": summarize(parts[:, 0]), "scoring": summarize(parts[:, 1]),
                                      "map_head": summarize(parts[:, 2]), "total": summarize(total_ms)}})
        placements.insert(len(placements) - len(scorers), {
            "placement": "A", "scorer": "in graph", "ort_spinning": spin, "ms": {"total": a_ms},
            "scoring_and_head_estimate_ms": a_ms["mean"] - float(np.mean(features_mean))})
    stats_mb = sum(bundle.file(k).stat().st_size for k in stats_keys) / MB
    return {"bundle": str(bundle_path), "bundle_id": bundle.bundle_id, "family": bundle.family,
            "category": bundle.manifest["data"]["category"], "n_images": len(paths), "warmup": warmup,
            "runs": runs, "rounds": rounds, "threads": threads, "threshold": threshold,
            "statistics_shapes": {k: list(bundle.load_array(k).shape) for k in stats_keys},
            "placements": placements, "agreement": agreement,
            "sizes_mb": {"full_onnx": full_path.stat().st_size / MB, "features_onnx": features_mb,
                         "statistics_npy": stats_mb}}


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """Plain-text table: per bundle and spinning setting, A's total, each B variant's parts and total."""
    lines = [f"{'bundle':<22}{'placement':<30}{'spin':>5}{'features':>9}{'scoring':>9}{'head':>7}{'total':>8}"
             f"{'p95':>8}{'max|dscore|':>12}"]
    for r in results:
        label = f"{Path(r['bundle']).name} ({r['family']})"
        for p in r["placements"]:
            t = p["ms"]["total"]
            spin = "on" if p["ort_spinning"] else "off"
            if p["placement"] == "A":
                est = p["scoring_and_head_estimate_ms"]
                lines.append(f"{label:<22}{'A in graph':<30}{spin:>5}{'':>9}{f'~{est:.2f}':>9}{'':>7}"
                             f"{t['mean']:>8.2f}{t['p95']:>8.2f}{'-':>12}")
            else:
                ms, agree = p["ms"], r["agreement"][p["scorer"]]["max_abs_score_diff"]
                lines.append(f"{label:<22}{'B ' + p['scorer']:<30}{spin:>5}{ms['features']['mean']:>9.2f}"
                             f"{ms['scoring']['mean']:>9.2f}{ms['map_head']['mean']:>7.2f}{t['mean']:>8.2f}"
                             f"{t['p95']:>8.2f}{agree:>12.2e}")
            label = ""
    lines.append("(A's scoring column: A total minus B's features engine, an estimate of scoring + head in the graph)")
    lines.append("")
    lines.append(f"{'bundle':<22}{'full onnx MB':>13}{'features onnx MB':>18}{'stats .npy MB':>15}"
                 f"{'threshold':>11}{'images':>8}")
    for r in results:
        s = r["sizes_mb"]
        lines.append(f"{Path(r['bundle']).name + ' (' + r['family'] + ')':<22}{s['full_onnx']:>13.1f}"
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
    add_timing_arguments(parser, "placement")
    parser.add_argument("--threads", type=int, default=2, help="threads for ONNX Runtime, FAISS, BLAS and OpenCV")
    parser.add_argument("--spinning", choices=("both", "on", "off"), default="both",
                        help="ONNX Runtime intra-op spinning for A and B sessions (default: time both settings)")
    parser.add_argument("--json", dest="json_out", default=None, help="write every figure and machine info here")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--runs and --threads must be >= 1 and --warmup >= 0")

    threads = set_threads(args.threads)
    spinning = {"both": (True, False), "on": (True,), "off": (False,)}[args.spinning]
    info = device_info()  # load average before the run: other processes skew timings
    results = [bench_bundle(b, args.images, args.warmup, args.runs, args.threads, args.rounds, spinning)
               for b in args.bundles]
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
