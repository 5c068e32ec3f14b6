"""PatchCore's nearest-neighbour search in 8-bit integers (a measurement, not a product option):
`python -m benchmarks.int8_search BUNDLE --data ROOT --category CAT [--threads 2] [--rounds 3]`.

The search alone as two ONNX Runtime graphs over the bank in blocks of ``BANK_BLOCK`` entries, as in the
engine: float, a MatMul of [-2p, 1] against the bank with its norms appended, then the min per block; int8,
the patches quantized to uint8 once per image (``DynamicQuantizeLinear``), then per block ONNX Runtime's
``MatMulIntegerToFloat`` (the bank's -2b in int8 with a scale per entry, the norms |b|^2 as the fused bias)
and the same min. Each test image's patches go
through both; the nearest distances are scored by the bundle's map head in PyTorch. Prints the image AUROC,
pixel AUROC and PRO of both, the relative error of the nearest distances, and the p50 milliseconds of each
graph per image, interleaved in rounds (the ratio is the figure; the machine is shared).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from benchmarks.reduced_search import embed_test_images
from edgeinspect.train.metrics import image_auroc, pixel_auroc, pro
from edgeinspect.train.models.patchcore.model import BANK_BLOCK


def search_graph(bank: np.ndarray, int8: bool) -> onnx.ModelProto:
    """patches (P x D float) -> squared nearest distance minus |p|^2 (P), the bank in blocks."""
    nodes, inits, minima = [], [], []
    d = bank.shape[1]
    inputs = "patches"
    if int8:  # quantized once per image, uint8 with its scale and zero point
        nodes.append(helper.make_node("DynamicQuantizeLinear", ["patches"], ["q", "q_scale", "q_zero"]))
    else:  # [-2p, 1]
        inits += [numpy_helper.from_array(np.array(-2.0, np.float32), "minus2"),
                  numpy_helper.from_array(np.array([0, 0, 0, 1], np.int64), "pad")]
        nodes += [helper.make_node("Mul", ["patches", "minus2"], ["scaled"]),
                  helper.make_node("Pad", ["scaled", "pad", "one"], ["augmented"])]
        inits.append(numpy_helper.from_array(np.array(1.0, np.float32), "one"))
        inputs = "augmented"
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis"))
    for i, start in enumerate(range(0, len(bank), BANK_BLOCK)):
        block = bank[start:start + BANK_BLOCK].astype(np.float64)
        norms = (block**2).sum(1).astype(np.float32)
        if int8:
            weights = (-2.0 * block).T  # D x n
            scale = np.maximum(np.abs(weights).max(0), 1e-12) / 127.0
            quantized = np.clip(np.round(weights / scale), -127, 127).astype(np.int8)
            inits += [numpy_helper.from_array(quantized, f"b{i}"),
                      numpy_helper.from_array(scale.astype(np.float32), f"s{i}"),
                      numpy_helper.from_array(np.zeros(len(scale), np.int8), f"z{i}"),
                      numpy_helper.from_array(norms, f"n{i}")]
            nodes.append(helper.make_node("MatMulIntegerToFloat", ["q", f"b{i}", "q_scale", f"s{i}", "q_zero", f"z{i}",
                                                                   f"n{i}"], [f"m{i}"], domain="com.microsoft"))
        else:
            inits.append(numpy_helper.from_array(np.vstack([block.T, norms[None]]).astype(np.float32), f"b{i}"))
            nodes.append(helper.make_node("MatMul", [inputs, f"b{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("ReduceMin", [f"m{i}", "axis"], [f"r{i}"], keepdims=0))
        minima.append(f"r{i}")
    nodes.append(helper.make_node("Min", minima, ["nearest"]))
    graph = helper.make_graph(nodes, "search", [helper.make_tensor_value_info("patches", TensorProto.FLOAT, [None, d])],
                              [helper.make_tensor_value_info("nearest", TensorProto.FLOAT, [None])], inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def main() -> None:
    """Embed the test images, run both searches per image, print accuracy and timings side by side."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("bundle")
    parser.add_argument("--data", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model, embedding, labels, masks = embed_test_images(args.bundle, args.data, args.category)
    n, d, h, w = embedding.shape
    per_image = embedding.permute(0, 2, 3, 1).reshape(n, h * w, d).numpy()
    bank = model.memory_bank.numpy()
    sessions = {kind: session(search_graph(bank, kind == "int8"), args.threads) for kind in ("float", "int8")}
    nearest, times = {}, {kind: [] for kind in sessions}
    for round_ in range(args.rounds):
        for kind, s in sessions.items():  # interleaved: both see the same machine
            out = []
            for p in per_image:
                t0 = time.perf_counter()
                (m,) = s.run(None, {"patches": p})
                times[kind].append(time.perf_counter() - t0)
                out.append(m)
            if round_ == 0:
                nearest[kind] = np.sqrt(np.maximum(np.stack(out) + (per_image**2).sum(2), 0.0))
    exact = nearest["float"]
    print(f"bank {bank.shape}, {n} test images x {h * w} patches, {args.threads} threads, {args.rounds} rounds")
    for kind, dist in nearest.items():
        amap = model.head(torch.from_numpy(dist.reshape(n, 1, h, w)).float())
        maps, scores = amap[:, 0].numpy(), amap.flatten(1).amax(1).numpy()
        error = np.abs(dist - exact) / np.maximum(exact, 1e-6)
        print(f"{kind:5s}: image AUROC {image_auroc(labels, scores):.4f}, pixel AUROC {pixel_auroc(masks, maps):.4f}, "
              f"PRO {pro(masks, maps):.4f}, nearest-distance relative error mean {error.mean():.4f} p99 "
              f"{np.quantile(error, 0.99):.4f}; search p50 {1000 * np.median(times[kind]):.2f} ms", flush=True)


if __name__ == "__main__":
    main()
