"""anomalib 2.7 beside edgeinspect, the comparison of issue 5's speed goals ("at least 4x faster than anomalib").

Two steps, each in a fresh process:

* ``python -m benchmarks.anomalib_side fit --family patchcore|padim --data ROOT --category CAT --size S --out DIR``
  fits anomalib's PatchCore (1 % coreset) or PaDiM (100 features) on Lite0 (timm's ``efficientnet_lite0``, its
  stage-3 and stage-5 outputs as edgeinspect's) and exports anomalib's own ONNX graph (``DIR/weights/onnx/
  model.onnx``, batch 1, S x S input, anomalib's pre- and post-processing inside). Run it where anomalib is
  installed (a venv of its own: ``pip install anomalib==2.7.0 onnxscript torch==2.14.1 torchvision==0.29.1``);
  the backbone's weights are random (no model hub here), which changes the scores, not the time.
* ``python -m benchmarks.anomalib_side time MODEL.onnx --data ROOT --category CAT [--runs 100]`` times that graph
  like edgeinspect's runtime path: a decoded test image (BGR uint8), area-resized to the graph's input where it
  differs, RGB float in [0, 1] NCHW, ``session.run``; ONNX Runtime on the CPU, 2 threads; p50 / p90 ms. Run it
  in edgeinspect's venv: the same ONNX Runtime as edgeinspect's engines.

Compare with ``edgeinspect bench B --engines onnx:fp32 --engines onnx:int8`` in the same sitting (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np

LAYERS = ["blocks.2", "blocks.4"]  # timm's efficientnet_lite0: 40 channels at stride 8, 112 at stride 16


def fit(family: str, data: str, category: str, size: int, out: Path) -> Path | None:
    """Fit anomalib's model on ``category`` and export its ONNX graph (batch 1, ``size`` px); returns its path
    (anomalib's ``Engine.export`` returns None where it wrote nothing)."""
    from anomalib.data import MVTecAD
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine
    from anomalib.models import Padim, Patchcore

    if family == "patchcore":
        model = Patchcore(backbone="efficientnet_lite0", layers=LAYERS, pre_trained=False, coreset_sampling_ratio=0.01,
                          pre_processor=Patchcore.configure_pre_processor(image_size=(size, size)))
    else:
        model = Padim(backbone="efficientnet_lite0", layers=LAYERS, pre_trained=False, n_features=100,
                      pre_processor=Padim.configure_pre_processor(image_size=(size, size)))
    datamodule = MVTecAD(root=data, category=category, train_batch_size=8, eval_batch_size=8, num_workers=0)
    engine = Engine(max_epochs=1, accelerator="cpu", devices=1, default_root_dir=str(out / "lightning"))
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    print(f"anomalib {family} fit {time.perf_counter() - start:.1f} s", flush=True)
    return engine.export(model=model, export_type=ExportType.ONNX, export_root=str(out), input_size=(size, size),
                         onnx_kwargs={"dynamic_shapes": None})  # static batch 1 (its default example batch is 2)


def time_graph(path: str, data: str, category: str, runs: int) -> tuple[float, float]:
    """p50 and p90 ms of ``path`` on the category's test images, decoded frame to outputs, 2 threads."""
    import onnxruntime as ort  # here, not at the top: ``fit`` runs in anomalib's venv, which has no onnxruntime

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    graph_input = session.get_inputs()[0]
    height, width = graph_input.shape[2:]
    frames = [cv2.imread(str(p)) for p in sorted(Path(data, category, "test").glob("*/*.png"))]

    def run(frame: np.ndarray) -> None:
        if frame.shape[:2] != (height, width):
            frame = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
        x = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB).astype(np.float32).transpose(2, 0, 1)[None] / 255.0
        session.run(None, {graph_input.name: x})

    for frame in frames[:5]:
        run(frame)
    times = []
    for i in range(runs):
        start = time.perf_counter()
        run(frames[i % len(frames)])
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 90))


def main() -> None:
    """``fit`` or ``time``, see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fit_parser = sub.add_parser("fit")
    fit_parser.add_argument("--family", choices=["patchcore", "padim"], required=True)
    fit_parser.add_argument("--size", type=int, default=256, help="anomalib's input size (its default: 256)")
    fit_parser.add_argument("--out", type=Path, required=True)
    time_parser = sub.add_parser("time")
    time_parser.add_argument("model")
    time_parser.add_argument("--runs", type=int, default=100)
    for each in (fit_parser, time_parser):
        each.add_argument("--data", required=True)
        each.add_argument("--category", required=True)
    args = parser.parse_args()
    if args.command == "fit":
        print("exported", fit(args.family, args.data, args.category, args.size, args.out))
    else:
        p50, p90 = time_graph(args.model, args.data, args.category, args.runs)
        print(f"{args.model}: p50 {p50:.2f} ms, p90 {p90:.2f} ms")


if __name__ == "__main__":
    main()
