"""PatchCore's nearest-neighbour search in 8-bit integers against float, the search alone:
`python -m benchmarks.int8_search BUNDLE --data ROOT --category CAT [--threads 2] [--rounds 3]`.

The bundle's search module (``NearestNeighbourSearch``: the bank in blocks of ``BANK_BLOCK`` entries, in the
bank's principal subspace where the bundle has one, the patches projected into it first) is
written to ONNX as the FP32 engine is (``write_fp32``); the INT8 engine's rewrite (``quantize_dynamic_matmuls``: the
patches quantized to uint8 once per image, each block's -2b in int8 with a scale per entry,
``MatMulInteger`` with |b|^2 added in float, fused by ONNX Runtime into ``MatMulIntegerToFloat``) gives
the integer graph. Each test image's patches go through both; the nearest distances are scored by the
bundle's map head in PyTorch, so the pixel metrics (which the export gate does not check) are compared
too. Prints the image AUROC, pixel AUROC and PRO of both, the relative error of the nearest distances,
and the p50 milliseconds of each graph per image, interleaved in rounds (the ratio is the figure; the
machine is shared).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from benchmarks.reduced_search import bundle_data_parser, embed_test_images
from edgeinspect.config import default_config
from edgeinspect.export.onnx import quantize_dynamic_matmuls, write_fp32
from edgeinspect.train.metrics import image_auroc, pixel_auroc, pro


def search_graph(search: torch.nn.Module, shape: tuple[int, int], int8: bool) -> onnx.ModelProto:
    """patches (P x D float) -> nearest distances (P): ``search`` written as the FP32 engine writes its
    graph; ``int8``: rewritten as in the INT8 engine."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "search.onnx"
        write_fp32(search, path, shape, ["nearest"])
        model = onnx.load(str(path))
    if int8:  # the module is traced on its own: every node of this graph is the search's
        reduce_range = bool(default_config("export")["int8"]["reduce_range"])  # as the INT8 engine's
        assert quantize_dynamic_matmuls(model.graph, ("/",), (), reduce_range), "no MatMul against the bank was traced"
    return model


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def main() -> None:
    """Embed the test images, run both searches per image, print accuracy and timings side by side."""
    parser = bundle_data_parser(__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model, embedding, labels, masks = embed_test_images(args.bundle, args.data, args.category)
    n, d, h, w = embedding.shape
    per_image = model.subspace(embedding.permute(0, 2, 3, 1).reshape(-1, d)).reshape(n, h * w, -1).numpy()
    sessions = {kind: session(search_graph(model.search, per_image.shape[1:], kind == "int8"), args.threads)
                for kind in ("float", "int8")}
    nearest, times = {}, {kind: [] for kind in sessions}
    for round_ in range(args.rounds):
        for kind, s in sessions.items():  # interleaved: both see the same machine
            out = []
            for p in per_image:
                t0 = time.perf_counter()
                (m,) = s.run(None, {"image": p})
                times[kind].append(time.perf_counter() - t0)
                out.append(m)
            if round_ == 0:
                nearest[kind] = np.stack(out)
    exact = nearest["float"]
    print(f"bank {tuple(model.memory_bank.shape)} searched in {per_image.shape[2]} dimensions, {n} test images x "
          f"{h * w} patches, {args.threads} threads, "
          f"{args.rounds} rounds")
    for kind, dist in nearest.items():
        amap = model.head(torch.from_numpy(dist.reshape(n, 1, h, w)).float())
        maps, scores = amap[:, 0].numpy(), amap.flatten(1).amax(1).numpy()
        error = np.abs(dist - exact) / np.maximum(exact, 1e-6)
        print(f"{kind:5s}: image AUROC {image_auroc(labels, scores):.4f}, pixel AUROC {pixel_auroc(masks, maps):.4f}, "
              f"PRO {pro(masks, maps):.4f}, nearest-distance relative error mean {error.mean():.4f} p99 "
              f"{np.quantile(error, 0.99):.4f}; search p50 {1000 * np.median(times[kind]):.2f} ms", flush=True)


if __name__ == "__main__":
    main()
