"""Where the INT8 backbone gains over FP32, by kind of operator:
`python -m benchmarks.kernel_split BUNDLE [--data ROOT --category CAT] [--runs 300] [--rounds 4] [--threads 2]`.

The bundle's backbone-alone graphs are built as ``edgeinspect bench`` builds its reference rows
(``backbone_engines``: FP32, and INT8 with the engines' own weights, calibrated on 16 test images). Each round
runs both graphs, one after the other in alternating order, under ONNX Runtime's profiler on the test images,
and takes each node's median kernel time. The nodes are summed by kind: the stem (the first convolution),
depthwise convolutions, 1x1 (pointwise) convolutions, other convolutions, and everything else (layout reorders,
Quantize/Dequantize, the residual Adds that FP32 fuses into its convolutions). ONNX Runtime prepacks the INT8
weights, so its profile does not show their shapes: the INT8 graph's convolutions take their kinds from the FP32
graph's, matched in execution order. Prints the ms of each kind in both graphs and the INT8 / FP32 ratio (median
and range over the rounds). A kernel sum, not the wall time of a run: the ratio of the totals is the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgeinspect.bench import backbone_engines, bundle_test_images, load_images
from edgeinspect.bundle import Bundle

KINDS = ("stem", "depthwise", "pointwise 1x1", "other convolutions", "everything else")


def node_medians(path: Path, tensors: list[np.ndarray], runs: int, threads: int) -> list[tuple[str, str, list, float]]:
    """(node, operator, input shapes, median kernel us) of every node of one profiled session, in execution order."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for i in range(runs):
        session.run(None, {name: tensors[i % len(tensors)]})
    profile = Path(session.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    durations: dict[str, list[float]] = defaultdict(list)
    first: dict[str, tuple[str, list]] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            node = event["name"][: -len("_kernel_time")]
            durations[node].append(event["dur"])
            shapes = [next(iter(s.values())) for s in event["args"].get("input_type_shape", [])]
            first.setdefault(node, (event["args"]["op_name"], shapes))
    return [(node, *first[node], float(np.median(d))) for node, d in durations.items()]


def conv_kind(weight_shape: list[int], index: int) -> str:
    """The kind of a convolution from its weight shape (O, I / groups, kh, kw) and its place in the graph."""
    if index == 0:
        return "stem"
    if weight_shape[1] == 1 and weight_shape[2] * weight_shape[3] > 1:
        return "depthwise"
    return "pointwise 1x1" if weight_shape[2:] == [1, 1] else "other convolutions"


def split_by_kind(fp32: list, int8: list) -> tuple[dict[str, float], dict[str, float]]:
    """The microseconds of each kind in the FP32 and the INT8 profile."""
    fp32_convs = [n for n in fp32 if "Conv" in n[1]]
    int8_convs = [n for n in int8 if "Conv" in n[1]]
    if len(fp32_convs) != len(int8_convs):
        raise SystemExit(f"the graphs have {len(fp32_convs)} FP32 and {len(int8_convs)} INT8 convolutions: "
                         "they cannot be matched in order")
    kinds = [conv_kind(n[2][1], i) for i, n in enumerate(fp32_convs)]
    totals = []
    for nodes, convs in ((fp32, fp32_convs), (int8, int8_convs)):
        kind_of = {n[0]: k for n, k in zip(convs, kinds, strict=True)}
        total = dict.fromkeys(KINDS, 0.0)
        for node, _, _, us in nodes:
            total[kind_of.get(node, "everything else")] += us
        totals.append(total)
    return totals[0], totals[1]


def kernel_split(bundle: Bundle, tensors: list[np.ndarray], runs: int, rounds: int, threads: int
                 ) -> dict[str, tuple[list[float], list[float]]]:
    """Per kind (and ``total``): the kernel microseconds per run of the FP32 and the INT8 backbone, one per round."""
    split: dict[str, tuple[list[float], list[float]]] = {kind: ([], []) for kind in (*KINDS, "total")}
    with tempfile.TemporaryDirectory() as tmp:
        graphs = backbone_engines(bundle, Path(tmp), tensors[:16])
        for r in range(rounds):
            order = ["fp32", "int8"] if r % 2 == 0 else ["int8", "fp32"]
            profiles = {p: node_medians(graphs[p], tensors, runs, threads) for p in order}
            for i, totals in enumerate(split_by_kind(profiles["fp32"], profiles["int8"])):
                for kind, us in (*totals.items(), ("total", sum(totals.values()))):
                    split[kind][i].append(us)
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--data", help="dataset root, if not the one the bundle records")
    parser.add_argument("--category")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    bundle = Bundle.open(args.bundle)
    paths = bundle_test_images(bundle, args.data, args.category).paths
    tensors = [bundle.preprocess(rgb) for rgb in load_images(paths)]
    split = kernel_split(bundle, tensors, args.runs, args.rounds, args.threads)
    print(f"{bundle.path.name}: backbone alone, kernel time per run, {args.rounds} rounds of {args.runs} runs, "
          f"{args.threads} threads, {os.cpu_count()} CPUs")
    print("| kind | FP32 ms | INT8 ms | INT8 / FP32 (median, range) |\n|---|---:|---:|---|")
    for kind, (fp32, int8) in split.items():
        if not any(fp32) and not any(int8):
            continue  # no node of that kind in this backbone
        ratios = [i / f for i, f in zip(int8, fp32, strict=True) if f > 0]
        ratio = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "-"
        print(f"| {kind} | {statistics.median(fp32) / 1000:.3f} | {statistics.median(int8) / 1000:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
