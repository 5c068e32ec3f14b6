"""Time the runtime's SSD decoding (anchor_boxes): `python -m benchmarks.detection_decode [--classes 6]`.

SSD300's own anchors (torchvision ``ssd300_vgg16``, 8732) and torchvision's defaults (score_thresh
0.01, top-400 candidates per class, NMS 0.45, 200 per image); two kinds of raw heads: random logits
(every class keeps 400 candidates: the worst case) and logits where the background class dominates,
as in a trained model.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torchvision.models.detection import ssd300_vgg16
from torchvision.models.detection.image_list import ImageList

from edgeinspect.runtime.detections import AnchorBoxes


def main() -> None:
    """Parse arguments, time the decoder on both kinds of heads, print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--classes", type=int, default=6, help="defect classes (background comes on top)")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=args.classes + 1).eval()
    x = torch.zeros(1, 3, 300, 300)
    with torch.no_grad():
        anchors = model.anchor_generator(ImageList(x, [(300, 300)]), list(model.backbone(x).values()))[0].numpy()
    decoder = AnchorBoxes({"score_thresh": model.score_thresh, "nms_thresh": model.nms_thresh,
                           "topk_candidates": model.topk_candidates,
                           "detections_per_img": model.detections_per_img}, anchors, (300, 300))
    rng = np.random.default_rng(0)
    report = {"anchors": len(anchors), "classes": args.classes}
    for name, scale, background in (("random_heads_ms", 3.0, 0.0), ("background_dominated_ms", 1.0, 8.0)):
        logits = (rng.normal(size=(1, len(anchors), args.classes + 1)) * scale).astype(np.float32)
        logits[..., 0] += background
        outputs = {"bbox_regression": rng.normal(size=(1, len(anchors), 4)).astype(np.float32), "cls_logits": logits}
        decoder(outputs)
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            decoder(outputs)
            times.append(1e3 * (time.perf_counter() - t0))
        report[name] = round(float(np.median(times)), 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
