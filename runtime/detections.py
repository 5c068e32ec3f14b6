"""Detections from a detector engine's outputs (numpy + OpenCV, no torch).

One decoder per ``manifest["detection"]["decoder"]`` (:data:`DECODERS`):

- ``anchor_boxes``: the engine gives raw SSD heads (``bbox_regression`` 1 x A x 4, ``cls_logits``
  1 x A x (C+1)); this module does torchvision's ``SSD.postprocess_detections``: BoxCoder decode
  with weights and ``bbox_xform_clip``, clamp to the input, softmax, per-class score threshold and
  top-k, per-class NMS, ``detections_per_img`` (checked against torchvision in the tests).
- ``final_detections``: the engine is the whole model (Mask R-CNN) and gives ``boxes``, ``labels``,
  ``scores`` (and ``masks`` K x 1 x H x W probabilities); they are taken as they come.

Every decoder returns :class:`Detections` in model-input pixels, like ``DetectorModel.detect``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from edgeinspect.errors import BundleError

BBOX_XFORM_CLIP = math.log(1000.0 / 16)  # torchvision BoxCoder's default clamp of dw, dh
MASK_THRESHOLD = 0.5  # a mask pixel belongs to the instance at this probability (unless detection.mask_threshold)


@dataclass
class Detections:
    """The detections of one image in model-input pixels, best first."""

    boxes: np.ndarray                # K x 4 float32 x0, y0, x1, y1
    labels: np.ndarray               # K int64, 1..C (0 is background)
    scores: np.ndarray               # K float32 confidences
    masks: np.ndarray | None = None  # K x H x W float32 probabilities (instance segmenters only)

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def from_arrays(cls, boxes: Any, labels: Any, scores: Any, masks: Any = None) -> Detections:
        """From a detector's arrays in any layout (masks K x H x W or K x 1 x H x W), best first."""
        scores = np.asarray(scores, np.float32).reshape(-1)
        order = np.argsort(-scores, kind="stable")
        if masks is not None:
            masks = np.asarray(masks, np.float32)
            masks = masks.reshape(len(scores), *masks.shape[-2:])[order]
        return cls(np.asarray(boxes, np.float32).reshape(-1, 4)[order],
                   np.asarray(labels).astype(np.int64).reshape(-1)[order], scores[order], masks)

    def to_dict(self) -> dict[str, np.ndarray]:
        """The ``DetectorModel.detect`` format of one image (numpy arrays)."""
        out = {"boxes": self.boxes, "labels": self.labels, "scores": self.scores}
        return out if self.masks is None else {**out, "masks": self.masks}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (float32, overflow-safe)."""
    z = logits.astype(np.float32) - logits.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def decode_boxes(rel_codes: np.ndarray, anchors: np.ndarray, weights: tuple[float, float, float, float],
                 clip: float = BBOX_XFORM_CLIP) -> np.ndarray:
    """torchvision ``BoxCoder.decode_single``: A x 4 offsets on A x 4 xyxy anchors -> A x 4 xyxy boxes."""
    anchors = anchors.astype(np.float32)
    widths, heights = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ctr_x, ctr_y = anchors[:, 0] + 0.5 * widths, anchors[:, 1] + 0.5 * heights
    wx, wy, ww, wh = (np.float32(w) for w in weights)
    dx, dy = rel_codes[:, 0] / wx, rel_codes[:, 1] / wy
    dw = np.minimum(rel_codes[:, 2] / ww, np.float32(clip))
    dh = np.minimum(rel_codes[:, 3] / wh, np.float32(clip))
    cx, cy = dx * widths + ctr_x, dy * heights + ctr_y
    half_w, half_h = np.float32(0.5) * np.exp(dw) * widths, np.float32(0.5) * np.exp(dh) * heights
    return np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1).astype(np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression with the semantics of ``torchvision.ops.nms``: indices kept,
    highest score first; a box is dropped when its IoU with a kept one is above ``iou_threshold``.

    OpenCV's ``cv2.dnn.NMSBoxes`` does the work (a tenth of the time of a numpy loop). Boxes clamped to
    no area are kept outside it: torchvision keeps them (their IoU is 0 or 0/0) and they suppress
    nothing, where OpenCV would count two of them as overlapping. ``scores`` must be positive
    (confidences above a score threshold).
    """
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    solid = np.flatnonzero(areas > 0)
    kept = np.zeros(0, np.int64)
    if len(solid):
        xywh = np.concatenate([boxes[solid, :2], boxes[solid, 2:] - boxes[solid, :2]], axis=1).astype(np.float64)
        kept = solid[np.asarray(cv2.dnn.NMSBoxes(xywh, scores[solid].astype(np.float32), 0.0, float(iou_threshold)),
                                np.int64).reshape(-1)]
    keep = np.concatenate([kept, np.flatnonzero(areas <= 0)])
    return keep[np.argsort(-scores[keep], kind="stable")]


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Per-class NMS (``torchvision.ops.batched_nms``): indices kept over all classes, by decreasing score."""
    keep = np.concatenate([np.flatnonzero(labels == c)[nms(boxes[labels == c], scores[labels == c], iou_threshold)]
                           for c in np.unique(labels)] or [np.zeros(0, np.int64)])
    return keep[np.argsort(-scores[keep], kind="stable")]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of N x 4 and M x 4 xyxy boxes."""
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


# ---------------------------------------------------------------------------------------- decoders
class AnchorBoxes:
    """SSD's raw heads -> detections: torchvision ``SSD.postprocess_detections`` in numpy."""

    def __init__(self, config: dict[str, Any], anchors: np.ndarray, input_hw: tuple[int, int]):
        self.anchors = np.asarray(anchors, np.float32)
        self.weights = tuple(float(w) for w in config.get("box_coder_weights", (10.0, 10.0, 5.0, 5.0)))
        self.clip = float(config.get("bbox_xform_clip", BBOX_XFORM_CLIP))
        self.score_thresh = float(config["score_thresh"])
        self.nms_thresh = float(config["nms_thresh"])
        self.topk = int(config["topk_candidates"])
        self.per_image = int(config["detections_per_img"])
        self.input_hw = input_hw

    def __call__(self, outputs: dict[str, np.ndarray]) -> Detections:
        """Detections of the first image of ``outputs`` (``bbox_regression``, ``cls_logits``)."""
        regression, logits = outputs["bbox_regression"][0], outputs["cls_logits"][0]
        if len(regression) != len(self.anchors):
            raise BundleError(f"the engine gives {len(regression)} box offsets for {len(self.anchors)} anchors")
        boxes = decode_boxes(regression, self.anchors, self.weights, self.clip)
        h, w = self.input_hw
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
        scores = softmax(logits)
        keep_boxes, keep_scores, keep_labels = [], [], []
        for label in range(1, scores.shape[1]):
            idx = np.flatnonzero(scores[:, label] > self.score_thresh)
            if len(idx) > self.topk:
                idx = idx[np.argpartition(-scores[idx, label], self.topk - 1)[:self.topk]]
            idx = idx[np.argsort(-scores[idx, label], kind="stable")]
            keep_boxes.append(boxes[idx])
            keep_scores.append(scores[idx, label])
            keep_labels.append(np.full(len(idx), label, np.int64))
        boxes, scores, labels = np.concatenate(keep_boxes), np.concatenate(keep_scores), np.concatenate(keep_labels)
        keep = batched_nms(boxes, scores, labels, self.nms_thresh)[:self.per_image]
        return Detections(boxes[keep], labels[keep], scores[keep])


class FinalDetections:
    """An engine that is the whole detector: boxes, labels, scores (and masks) as it gives them."""

    def __init__(self, config: dict[str, Any], anchors: np.ndarray | None, input_hw: tuple[int, int]):
        self.per_image = int(config.get("detections_per_img", 1 << 31))

    def __call__(self, outputs: dict[str, np.ndarray]) -> Detections:
        """Detections of one image, best first."""
        detections = Detections.from_arrays(outputs["boxes"], outputs["labels"], outputs["scores"],
                                            outputs.get("masks"))
        if len(detections) <= self.per_image:
            return detections
        keep = slice(0, self.per_image)
        return Detections(detections.boxes[keep], detections.labels[keep], detections.scores[keep],
                          None if detections.masks is None else detections.masks[keep])


Decoder = Callable[[dict[str, np.ndarray]], Detections]
DECODERS: dict[str, type] = {"anchor_boxes": AnchorBoxes, "final_detections": FinalDetections}


def make_decoder(detection: dict[str, Any], load_array: Callable[[str], np.ndarray],
                 input_hw: tuple[int, int]) -> Decoder:
    """The decoder a manifest's ``detection`` entry names, with the statistics it needs loaded."""
    name = detection.get("decoder")
    if name not in DECODERS:
        raise BundleError(f"manifest detection.decoder {name!r} is not one of {sorted(DECODERS)}; "
                          f"use the edgeinspect that wrote the bundle")
    anchors = load_array(detection["anchors"]) if detection.get("anchors") else None
    return DECODERS[name](detection, anchors, input_hw)


def mask_polygon(mask: np.ndarray, threshold: float = MASK_THRESHOLD) -> np.ndarray | None:
    """Outline (P x 2 x, y in mask pixels) of the largest part of ``mask >= threshold``, or None when empty."""
    binary = (mask >= threshold).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    return max(contours, key=cv2.contourArea).reshape(-1, 2)
