"""Offline augmentation of a COCO folder: every training image kept, plus ``factor`` transformed copies.

Transforms (albumentations, one random draw per copy, seeded): a horizontal flip (p 0.5) and a rotation by
0 / 90 / 180 / 270 degrees (uniform) -- together the eight symmetries of the square, one of them the
identity -- then Gaussian blur (p 0.3), brightness up or down and contrast (p 0.8). The geometric ones move
pixels on the pixel grid, so boxes and masks move exactly with the image: each instance mask is rasterised
from its polygons, transformed with the image, and its polygons, box and area are recomputed from it.
Box-only datasets (VOC) take albumentations' transformed boxes.

Only ``train`` is augmented; ``val`` and ``test`` are copied unchanged, so validation and test figures stay
comparable with the un-augmented dataset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from edgeinspect.bundle import staged_output
from edgeinspect.errors import DataError
from edgeinspect.train.data.coco import (
    ANNOTATIONS,
    IMAGES,
    INFO_FILE,
    SPLITS,
    CocoSplit,
    check_out,
    link_or_copy,
    mask_box,
    mask_to_polygons,
    read_info,
    split_counts,
)

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network at import
import albumentations as A  # noqa: E402

TRANSFORMS = ["horizontal flip (p 0.5)", "rotation 0/90/180/270 (uniform)", "Gaussian blur 3-5 px (p 0.3)",
              "brightness +-25 % and contrast +-25 % (p 0.8)"]
AUGMENTED = "train"  # the one split that gets copies


def build_transform(seed: int) -> A.Compose:
    """The augmentation pipeline (see the module docstring), boxes in COCO ``[x, y, w, h]`` pixels."""
    return A.Compose(
        [A.HorizontalFlip(p=0.5), A.RandomRotate90(p=1.0), A.GaussianBlur(blur_limit=(3, 5), p=0.3),
         A.RandomBrightnessContrast(brightness_limit=0.25, contrast_limit=0.25, p=0.8)],
        bbox_params=A.BboxParams(format="coco", label_fields=["labels"], clip=True),
        seed=seed,
    )


def augment_sample(transform: A.Compose, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                   masks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """One random draw of ``transform`` on an image with its COCO boxes (K x 4), labels (K) and optional
    instance masks (K x H x W uint8); returns them transformed (boxes as albumentations moved them)."""
    data: dict[str, Any] = {"image": image, "bboxes": np.asarray(boxes, np.float64).reshape(-1, 4),
                            "labels": np.asarray(labels)}
    if masks is not None and len(masks):
        data["masks"] = masks
    out = transform(**data)
    out_masks = None
    if masks is not None:
        h, w = out["image"].shape[:2]
        out_masks = np.asarray(out["masks"], np.uint8) if len(masks) else np.zeros((0, h, w), np.uint8)
    out_boxes = np.round(np.asarray(out["bboxes"], np.float64).reshape(-1, 4), 3)  # float noise of the rotation
    return out["image"], out_boxes, np.asarray(out["labels"]).astype(np.int64), out_masks


def _write_png(path: Path, rgb: np.ndarray) -> None:
    """PNG of an RGB image; single-channel when the three channels are equal (grayscale sources stay gray)."""
    gray = bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]))
    ok = cv2.imwrite(str(path), rgb[..., 0] if gray else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise DataError(f"cannot write image {path}")


def _augmented_annotations(image_id: int, first_ann_id: int, boxes: np.ndarray, labels: np.ndarray,
                           masks: np.ndarray | None) -> list[dict[str, Any]]:
    """COCO annotations of an augmented image: from the masks when there are masks, else from the boxes."""
    anns = []
    for k, label in enumerate(labels):
        if masks is not None:
            if not masks[k].any():
                continue
            bbox, area, seg = mask_box(masks[k]), float(masks[k].sum()), mask_to_polygons(masks[k])
        else:
            bbox = [float(v) for v in boxes[k]]
            if bbox[2] <= 0 or bbox[3] <= 0:
                continue
            area, seg = bbox[2] * bbox[3], []
        anns.append({"id": first_ann_id + len(anns), "image_id": image_id, "category_id": int(label), "bbox": bbox,
                     "area": area, "iscrowd": 0, "segmentation": seg})
    return anns


def augment_dataset(src: str | Path, out: str | Path, factor: int, *, seed: int = 0,
                    progress: bool = True) -> dict[str, Any]:
    """Write ``out``: the COCO folder ``src`` with ``factor`` augmented copies of every ``train`` image
    (``<stem>_aug<k>.png``, image field ``source_file`` naming the original); returns its dataset_info."""
    src, out = Path(src), Path(out)
    if factor < 1:
        raise DataError(f"--factor must be at least 1, got {factor}")
    info = read_info(src)
    check_out(out, [src])
    splits = [s for s in SPLITS if (src / s / ANNOTATIONS).is_file()]
    if AUGMENTED not in splits:
        raise DataError(f"{src} has no {AUGMENTED}/{ANNOTATIONS} to augment")
    transform = build_transform(seed)
    info = {**info, "augmentation": {"source": str(src.resolve()), "factor": factor, "seed": seed,
                                     "split": AUGMENTED, "transforms": TRANSFORMS}}
    with staged_output(out) as staged:
        for split in splits:
            reader = CocoSplit(src, split)
            coco = json.loads((src / split / ANNOTATIONS).read_text())
            image_dir = staged / split / IMAGES
            image_dir.mkdir(parents=True)
            for i in range(len(reader)):
                link_or_copy(reader.path_of(i), image_dir / reader.path_of(i).name)
            if split == AUGMENTED:
                _augment_split(reader, coco, image_dir, transform, factor, progress)
            (staged / split / ANNOTATIONS).write_text(json.dumps(coco))
            info["splits"][split] = split_counts(coco)
        (staged / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _augment_split(reader: CocoSplit, coco: dict[str, Any], image_dir: Path, transform: A.Compose, factor: int,
                   progress: bool) -> None:
    """Append ``factor`` augmented copies of every image of ``reader`` to ``coco`` and ``image_dir``."""
    next_image = max((im["id"] for im in coco["images"]), default=0) + 1
    next_ann = max((a["id"] for a in coco["annotations"]), default=0) + 1
    for i in tqdm(range(len(reader)), desc="augment", disable=not progress):
        meta = reader.coco.imgs[reader.image_ids[i]]
        image, target = reader.load(i)
        anns = sorted(reader.coco.imgToAnns.get(meta["id"], []), key=lambda a: a["id"])
        boxes = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        for k in range(1, factor + 1):
            aug, aug_boxes, labels, masks = augment_sample(transform, image, boxes, target["labels"],
                                                           target["masks"])
            if masks is not None:  # masks line up with the input instances (boxes may be dropped, masks not)
                labels = target["labels"]
            name = f"{Path(meta['file_name']).stem}_aug{k}.png"
            _write_png(image_dir / name, aug)
            new = _augmented_annotations(next_image, next_ann, aug_boxes, labels, masks)
            coco["images"].append({**meta, "id": next_image, "file_name": name, "height": aug.shape[0],
                                   "width": aug.shape[1], "source_file": meta["file_name"]})
            coco["annotations"].extend(new)
            next_image += 1
            next_ann += len(new)
