"""Detector runtime: decoders against torchvision, mask polygons, the verdict schema, a daemon serving a
detector bundle over ZeroMQ, and export parity of a detector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_detector import TinySSD

from edgeinspect.runtime.detections import AnchorBoxes, FinalDetections, box_iou, mask_polygon


def _assert_same_detections(ours, theirs: dict[str, torch.Tensor]) -> None:
    """Same boxes (IoU >= 0.99, or equal where clamping left no area), labels and scores (1e-5), in order."""
    assert len(ours) == len(theirs["scores"]) > 0
    np.testing.assert_array_equal(ours.labels, theirs["labels"].numpy())
    np.testing.assert_allclose(ours.scores, theirs["scores"].numpy(), atol=1e-5)
    boxes = theirs["boxes"].numpy()
    same = (np.diag(box_iou(ours.boxes, boxes)) >= 0.99) | np.isclose(ours.boxes, boxes, atol=1e-4).all(axis=1)
    assert same.all()


def _random_heads(n_anchors: int, n_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    regression = torch.randn(1, n_anchors, 4, generator=g) * 2.0
    regression[0, :7, 2:] = 40.0  # beyond bbox_xform_clip: the clamp must apply
    return regression, torch.randn(1, n_anchors, n_classes + 1, generator=g) * 3.0


def test_anchor_decoder_matches_torchvision_ssd300() -> None:
    from torchvision.models.detection import ssd300_vgg16
    from torchvision.models.detection.image_list import ImageList

    model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=4).eval()
    x = torch.zeros(1, 3, 300, 300)
    with torch.no_grad():
        features = list(model.backbone(x).values())
    anchors = model.anchor_generator(ImageList(x, [(300, 300)]), features)[0]
    config = {"box_coder_weights": list(model.box_coder.weights), "score_thresh": model.score_thresh,
              "nms_thresh": model.nms_thresh, "topk_candidates": model.topk_candidates,
              "detections_per_img": model.detections_per_img}
    decoder = AnchorBoxes(config, anchors.numpy(), (300, 300))
    for seed in range(3):
        regression, logits = _random_heads(len(anchors), 3, seed)
        [theirs] = model.postprocess_detections({"bbox_regression": regression, "cls_logits": logits}, [anchors],
                                                [(300, 300)])
        ours = decoder({"bbox_regression": regression.numpy(), "cls_logits": logits.numpy()})
        _assert_same_detections(ours, theirs)
        assert len(ours) == model.detections_per_img  # random heads: the per-image cut applies
        assert ours.boxes.min() >= 0 and ours.boxes.max() <= 300


@pytest.mark.parametrize("score_thresh,topk", [(0.2, 5), (0.6, 400)])
def test_anchor_decoder_matches_torchvision_small_ssd(score_thresh: float, topk: int) -> None:
    model = TinySSD(["scratch", "crack"], (64, 96)).eval()
    model.ssd.score_thresh, model.ssd.topk_candidates = score_thresh, topk
    config = {**model.decoder_config(), "score_thresh": score_thresh, "topk_candidates": topk}
    decoder = AnchorBoxes(config, model.anchors.numpy(), (64, 96))
    regression, logits = _random_heads(len(model.anchors), 2, 7)
    [theirs] = model.ssd.postprocess_detections({"bbox_regression": regression, "cls_logits": logits},
                                                [model.anchors], [(64, 96)])
    _assert_same_detections(decoder({"bbox_regression": regression.numpy(), "cls_logits": logits.numpy()}), theirs)


def test_final_detections_sorted_and_polygon_follows_the_mask() -> None:
    masks = np.zeros((2, 1, 40, 60), np.float32)
    masks[0, 0, 5:15, 10:30] = 0.9     # a 10 x 20 rectangle
    masks[1, 0, 20:30, 40:50] = 0.4    # below 0.5: no pixel of the instance
    decoded = FinalDetections({}, None, (40, 60))({
        "boxes": np.array([[40, 20, 50, 30], [10, 5, 30, 15]], np.float32), "labels": np.array([2, 1]),
        "scores": np.array([0.3, 0.8], np.float32), "masks": masks[::-1].copy()})
    assert decoded.scores.tolist() == pytest.approx([0.8, 0.3]) and decoded.labels.tolist() == [1, 2]
    polygon = mask_polygon(decoded.masks[0])
    assert polygon.min(axis=0).tolist() == [10, 5] and polygon.max(axis=0).tolist() == [29, 14]
    assert mask_polygon(decoded.masks[1]) is None
