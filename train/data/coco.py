"""Detection datasets in the COCO folder layout: conversion from MVTec masks or Pascal VOC boxes, and a reader.

The folder (the contract between ``edgeinspect data coco`` and the detector trainers)::

    DIR/dataset_info.json          source, category, classes (category id = index + 1), split counts
    DIR/<split>/annotations.json   COCO: images, annotations (bbox [x, y, w, h], area, polygons), categories
    DIR/<split>/images/*           the images (hard links to the source files where possible, else copies)

``split`` is ``train`` and ``val`` (drawn from the source, stratified by defect type, seeded), plus ``test``
when the source has its own test split (VOC ``test/``).

MVTec masks: one instance per 8-connected component of a ground-truth mask; components smaller than
``min_area`` pixels are dropped (a defective image left with none is left out and counted). Polygons run
along pixel edges (corner coordinates), so ``annToMask`` gives the component back up to the half pixels cut
at its diagonal steps; a hole is cut into its outer polygon through a zero-width bridge (pycocotools fills
polygons even-odd, so the bridge, traversed twice, adds nothing). Boxes are pixel-edge boxes: a component
spanning columns 3..7 has ``x = 3, w = 5``.

VOC boxes are read as pixel-edge coordinates in ``[0, W] x [0, H]``; a box sticking out of its image is
clamped to it (counted as ``clamped_boxes``); a box empty after clamping is an error.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from edgeinspect.bundle import staged_output
from edgeinspect.errors import DataError
from edgeinspect.imageio import list_images, read_image, read_raw
from edgeinspect.train.data.mvtec import GOOD, MVTecCategory, Sample
from edgeinspect.train.data.split import stratified_split

log = logging.getLogger(__name__)

INFO_FILE = "dataset_info.json"
ANNOTATIONS = "annotations.json"
IMAGES = "images"
SPLITS = ("train", "val", "test")
CLASS_MODES = ("per-type", "single")
GOOD_IMAGES = ("all", "test", "none")
SINGLE_CLASS = "defect"
DEFAULT_MIN_AREA = 10  # pixels: drops resize specks (KolektorSDD masks at 256 px have 1-3 px ones), keeps
#                        every MVTec bottle / transistor defect (smallest components: 17 and 153 px)
_UPSCALE = 3  # contours are traced on the mask upscaled 3x, then rounded to the nearest pixel corner


# ------------------------------------------------------------------------------ masks -> polygons
def _corner_path(contour: np.ndarray, offset: tuple[int, int]) -> np.ndarray:
    """Pixel-corner vertices (N x 2 int) of a contour traced on the 3x-upscaled, 1-padded mask.

    A boundary sub-pixel 3x (left edge of pixel x) or 3x + 2 (its right edge) rounds to corner x or x + 1.
    Repeated and collinear vertices are removed.
    """
    pts = np.rint((contour.reshape(-1, 2) - 1) / _UPSCALE).astype(np.int64) + np.asarray(offset)
    keep = np.any(pts != np.roll(pts, 1, axis=0), axis=1)
    pts = pts[keep] if keep.any() else pts[:1]
    if len(pts) >= 3:
        prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
        cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - pts[:, 1]) - (pts[:, 1] - prev[:, 1]) * (nxt[:, 0] - pts[:, 0])
        pts = pts[cross != 0]
    return pts


def _bridge(outer: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """One polygon: ``outer`` with ``hole`` spliced in at their nearest vertices (a zero-width bridge)."""
    d = ((outer[:, None, :] - hole[None, :, :]) ** 2).sum(axis=2)
    i, j = np.unravel_index(int(np.argmin(d)), d.shape)
    return np.concatenate([outer[: i + 1], np.roll(hole, -j, axis=0), hole[j : j + 1], outer[i:]])


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons ``[[x0, y0, x1, y1, ...], ...]`` (pixel-corner coordinates) covering a binary mask.

    One polygon per outer contour, its holes bridged into it; rasterised by pycocotools they give the mask
    back up to half pixels at diagonal steps. [] for an empty mask.
    """
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return []
    x0, y0 = int(xs.min()), int(ys.min())
    crop = (mask[y0 : int(ys.max()) + 1, x0 : int(xs.max()) + 1] > 0).astype(np.uint8)
    big = np.pad(cv2.resize(crop, None, fx=_UPSCALE, fy=_UPSCALE, interpolation=cv2.INTER_NEAREST), 1)
    contours, hierarchy = cv2.findContours(big, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for k, contour in enumerate(contours):
        if hierarchy[0][k][3] >= 0:  # a hole: handled with its parent
            continue
        poly = _corner_path(contour, (x0, y0))
        child = hierarchy[0][k][2]
        while child >= 0:
            hole = _corner_path(contours[child], (x0, y0))
            if len(hole) >= 3:
                poly = _bridge(poly, hole)
            child = hierarchy[0][child][0]
        if len(poly) >= 3:
            polygons.append(poly.astype(float).reshape(-1).tolist())
    return polygons


def mask_box(mask: np.ndarray) -> list[float]:
    """Pixel-edge COCO box ``[x, y, w, h]`` of a mask's pixels (the mask must not be empty)."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


@dataclass
class Instance:
    """One object of an image: class name, COCO box, area and polygons ([] for box-only sources)."""

    label: str
    bbox: list[float]
    area: float
    polygons: list[list[float]] = field(default_factory=list)


def mask_instances(mask: np.ndarray, label: str, min_area: int) -> tuple[list[Instance], int]:
    """(one Instance per 8-connected component of ``mask`` with at least ``min_area`` pixels, number dropped)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    instances, dropped = [], 0
    for k in range(1, n):
        area = int(stats[k, cv2.CC_STAT_AREA])
        if area < min_area:
            dropped += 1
            continue
        x, y, w, h = (int(v) for v in stats[k, :4])
        component = np.zeros_like(labels, dtype=np.uint8)
        component[y : y + h, x : x + w] = labels[y : y + h, x : x + w] == k
        instances.append(Instance(label, [float(x), float(y), float(w), float(h)], float(area),
                                  mask_to_polygons(component)))
    return instances, dropped


# ------------------------------------------------------------------------------ conversion
@dataclass
class _Record:
    """An image to write: its source file, the stratum it is split by, and its instances."""

    path: Path
    stratum: str  # defect type (MVTec, "good" included) or class folder (VOC)
    name: str  # file name in DIR/<split>/images
    height: int
    width: int
    instances: list[Instance]

    @property
    def defect_type(self) -> str:  # what split.stratified_split groups by
        return self.stratum


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` at ``dst``, or copy it where the file system cannot link."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file (DataError naming it if it cannot be decoded)."""
    return tuple(read_raw(path).shape[:2])  # type: ignore[return-value]


def check_out(out: Path, sources: Sequence[Path]) -> None:
    """Refuse an --out that is a non-empty folder not written by this module, or that holds the source."""
    out = out.resolve()
    for src in sources:
        src = src.resolve()
        if out == src or src.is_relative_to(out) or out.is_relative_to(src):
            raise DataError(f"--out {out} must be outside the source dataset {src}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / INFO_FILE).is_file())):
        raise DataError(f"refusing to overwrite {out}: it is not empty and not a COCO folder written by "
                        f"edgeinspect (no {INFO_FILE})")


def _coco_json(records: Sequence[_Record], classes: list[str], info: dict[str, Any]) -> dict[str, Any]:
    """The COCO dictionary of one split (image and annotation ids from 1, in record order)."""
    ids = {name: i + 1 for i, name in enumerate(classes)}
    images, annotations = [], []
    for image_id, rec in enumerate(records, start=1):
        images.append({"id": image_id, "file_name": rec.name, "height": rec.height, "width": rec.width,
                       "defect_type": rec.stratum})
        for inst in rec.instances:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": ids[inst.label],
                                "bbox": inst.bbox, "area": inst.area, "iscrowd": 0,
                                "segmentation": inst.polygons})
    return {"info": info, "licenses": [], "images": images, "annotations": annotations,
            "categories": [{"id": ids[c], "name": c, "supercategory": "defect"} for c in classes]}


def split_counts(coco: dict[str, Any]) -> dict[str, Any]:
    """Images, images without annotations, annotations, per class and per defect type counts of a COCO dict."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_class = {c["name"]: 0 for c in coco["categories"]}
    annotated = set()
    for ann in coco["annotations"]:
        per_class[names[ann["category_id"]]] += 1
        annotated.add(ann["image_id"])
    per_type: dict[str, int] = {}
    for image in coco["images"]:
        per_type[image.get("defect_type", "")] = per_type.get(image.get("defect_type", ""), 0) + 1
    return {"images": len(coco["images"]), "negative_images": len(coco["images"]) - len(annotated),
            "annotations": len(coco["annotations"]), "per_class": per_class, "per_type": per_type}


def write_coco(out: str | Path, splits: dict[str, list[_Record]], classes: list[str], info: dict[str, Any],
               *, progress: bool = True) -> dict[str, Any]:
    """Write the COCO folder at ``out`` (staged, see :func:`staged_output`); returns ``info`` with its counts."""
    info = {**info, "splits": {}}
    with staged_output(out) as staged:
        for split, records in splits.items():
            image_dir = staged / split / IMAGES
            image_dir.mkdir(parents=True)
            for rec in tqdm(records, desc=f"write {split}", disable=not progress, leave=False):
                link_or_copy(rec.path, image_dir / rec.name)
            coco = _coco_json(records, classes, {"description": f"{info['category']} {split}",
                                                 "source": info["source"]})
            (staged / split / ANNOTATIONS).write_text(json.dumps(coco))
            info["splits"][split] = split_counts(coco)
        (staged / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _check_common(train_ratio: float, test_ratio: float, classes_mode: str, min_area: int) -> None:
    if not 0.0 < train_ratio < 1.0:
        raise DataError(f"--train-ratio must be between 0 and 1 (exclusive), got {train_ratio}")
    if not 0.0 <= test_ratio < 1.0:
        raise DataError(f"--test-ratio must be at least 0 and below 1, got {test_ratio}")
    if classes_mode not in CLASS_MODES:
        raise DataError(f"--classes must be one of {', '.join(CLASS_MODES)}, got {classes_mode!r}")
    if min_area < 0:
        raise DataError(f"--min-area must be >= 0 pixels, got {min_area}")


def _add_good_boxes(records: Sequence[_Record], with_polygon: bool) -> None:
    """Give every image without instances one full-image box of class ``good`` (``--good-class``)."""
    for rec in records:
        if not rec.instances:
            w, h = float(rec.width), float(rec.height)
            poly = [[0.0, 0.0, w, 0.0, w, h, 0.0, h]] if with_polygon else []
            rec.instances.append(Instance(GOOD, [0.0, 0.0, w, h], w * h, poly))


def _splits(pool: list[_Record], own_test: list[_Record] | None, train_ratio: float, test_ratio: float,
            seed: int) -> dict[str, list[_Record]]:
    """train / val / test of the records. A source without a test split of its own gives ``test_ratio`` of
    every type to ``test`` first, so that a detector's reported figures come from images that did not choose
    its checkpoint (``val`` does); then ``train_ratio`` of the rest to ``train``, the others to ``val``."""
    if own_test is None and test_ratio > 0:
        pool, own_test = stratified_split(pool, test_ratio, seed)  # type: ignore[arg-type,assignment]
    train, val = stratified_split(pool, 1.0 - train_ratio, seed)  # type: ignore[arg-type]
    return {"train": train, "val": val, **({"test": own_test} if own_test else {})}  # type: ignore[dict-item]


def _info(source: str, category: str, classes: list[str], classes_mode: str, good_class: bool,
          train_ratio: float, seed: int, min_area: int, **extra: Any) -> dict[str, Any]:
    return {"source": source, "category": category, "classes": classes, "classes_mode": classes_mode,
            "good_class": good_class, "train_ratio": train_ratio, "seed": seed, "min_component_area": min_area,
            **extra}


def convert_mvtec(root: str | Path, category: str, out: str | Path, *, train_ratio: float = 0.8,
                  test_ratio: float = 0.1, seed: int = 0, classes_mode: str = "per-type", good_class: bool = False,
                  min_area: int = DEFAULT_MIN_AREA,
                  good_images: str = "all", progress: bool = True) -> dict[str, Any]:
    """MVTec layout ``root/category`` -> COCO folder ``out`` (train / val / test, see :func:`_splits`); returns its
    dataset_info.

    Defective images (``test/<type>``, ``val/<type>``) give one instance per mask component; good images
    (``good_images``: ``all`` = train/good and test/good, ``test`` = test/good (and val/good) only,
    ``none``) are negatives without annotations. Defective images without a mask file, or whose every
    component is below ``min_area``, are left out (logged, counted in dataset_info ``left_out``).
    """
    _check_common(train_ratio, test_ratio, classes_mode, min_area)
    if good_images not in GOOD_IMAGES:
        raise DataError(f"--good-images must be one of {', '.join(GOOD_IMAGES)}, got {good_images!r}")
    dataset = MVTecCategory(root, category)
    check_out(Path(out), [dataset.path])
    labelled = [*dataset.test_samples(), *dataset.val_samples()]
    defective = [s for s in labelled if s.label]
    if not any(s.mask_path is not None for s in defective):
        raise DataError(f"no ground-truth masks for the defective images of {dataset.path} "
                        f"(expected ground_truth/<type>/<stem>_mask.png); COCO instances come from masks")
    goods: list[Sample] = []
    if good_images == "all":
        goods = dataset.train_samples()
    if good_images != "none":
        goods += [s for s in labelled if not s.label]
    records: list[_Record] = []
    left_out = {"no_mask": 0, "all_components_below_min_area": 0}
    dropped = 0
    for sample in tqdm([*goods, *defective], desc="read masks", disable=not progress, leave=False):
        height, width = _image_size(sample.image_path)
        split_dir = sample.image_path.parent.parent.name  # train / test / val
        name = f"{split_dir}_{sample.defect_type}_{sample.image_path.name}"
        instances: list[Instance] = []
        if sample.label:
            if sample.mask_path is None:
                log.warning("left out %s: no mask file", sample.image_path)
                left_out["no_mask"] += 1
                continue
            label = sample.defect_type if classes_mode == "per-type" else SINGLE_CLASS
            instances, n_dropped = mask_instances(dataset.load_mask(sample, (height, width)), label, min_area)
            dropped += n_dropped
            if not instances:
                log.warning("left out %s: every mask component is below --min-area %d", sample.image_path,
                            min_area)
                left_out["all_components_below_min_area"] += 1
                continue
        records.append(_Record(sample.image_path, sample.defect_type, name, height, width, instances))
    if not any(r.instances for r in records):
        raise DataError(f"no defect instance of at least {min_area} pixels in the masks of {dataset.path}")
    classes = sorted({i.label for r in records for i in r.instances})
    if good_class:
        classes.append(GOOD)
        _add_good_boxes(records, with_polygon=True)
    splits = _splits(records, None, train_ratio, test_ratio, seed)
    info = _info("mvtec", category, classes, classes_mode, good_class, train_ratio, seed, min_area,
                 test_ratio=test_ratio, masks=True, good_images=good_images, root=str(Path(root).resolve()),
                 dropped_components=dropped, left_out=left_out)
    return write_coco(out, splits, classes, info, progress=progress)  # type: ignore[arg-type]


def _voc_objects(xml: Path, height: int, width: int) -> tuple[list[tuple[str, list[float]]], int]:
    """(class name, clamped pixel-edge COCO box) of every object of a VOC XML file, and how many were clamped."""
    try:
        tree = ET.parse(xml)
    except (ET.ParseError, OSError) as exc:
        raise DataError(f"cannot parse VOC annotation {xml}: {exc}") from None
    root = tree.getroot()
    size = root.find("size")
    if size is not None:
        w, h = (int(float(size.findtext(k) or 0)) for k in ("width", "height"))
        if w and h and (w, h) != (width, height):
            raise DataError(f"{xml} gives the image size {w}x{h} but its image is {width}x{height}")
    objects, clamped = [], 0
    for k, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        try:
            x0, y0, x1, y1 = (float(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore
        except (AttributeError, TypeError, ValueError):
            raise DataError(f"object {k} of {xml} has no numeric bndbox xmin/ymin/xmax/ymax") from None
        if not name:
            raise DataError(f"object {k} of {xml} has no <name>")
        cx0, cy0, cx1, cy1 = min(max(x0, 0), width), min(max(y0, 0), height), min(max(x1, 0), width), \
            min(max(y1, 0), height)
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            clamped += 1
        if cx1 <= cx0 or cy1 <= cy0:
            raise DataError(f"object {k} ({name}) of {xml} has an empty box inside the {width}x{height} image: "
                            f"xmin {x0:g}, ymin {y0:g}, xmax {x1:g}, ymax {y1:g}")
        objects.append((name, [cx0, cy0, cx1 - cx0, cy1 - cy0]))
    return objects, clamped


def _voc_split(base: Path, split: str, progress: bool, claimed: dict[Path, Path]
               ) -> tuple[list[tuple[Path, str]], list[Any]]:
    """Images of ``base/split/<class folder>/`` with their parsed objects. The XML beside an image wins over
    ``annotations/<stem>.xml``; ``claimed`` (shared XML -> its image, across splits) refuses two images that
    would read the same shared XML."""
    folder = base / split
    items = [(image, d.name) for d in sorted(p for p in folder.iterdir() if p.is_dir()) for image in list_images(d)]
    items += [(image, "") for image in list_images(folder)]  # images directly in the split folder
    parsed = []
    for image, _ in tqdm(items, desc=f"read {split}", disable=not progress, leave=False):
        xml = next((p for p in (image.with_suffix(".xml"), base / "annotations" / f"{image.stem}.xml") if p.is_file()),
                   None)
        if xml is None:
            raise DataError(f"no VOC annotation for {image} (looked for {image.with_suffix('.xml')} "
                            f"and {base / 'annotations' / image.stem}.xml)")
        if xml != image.with_suffix(".xml"):
            if xml in claimed:
                raise DataError(f"{claimed[xml]} and {image} would both read {xml}: give them different names "
                                "or put each one's XML beside it")
            claimed[xml] = image
        height, width = _image_size(image)
        parsed.append((height, width, *_voc_objects(xml, height, width)))
    return items, parsed


def convert_voc(root: str | Path, category: str, out: str | Path, *, train_ratio: float = 0.8,
                test_ratio: float = 0.1, seed: int = 0,
                classes_mode: str = "per-type", good_class: bool = False, min_area: int = DEFAULT_MIN_AREA,
                progress: bool = True) -> dict[str, Any]:
    """Pascal VOC box dataset ``root/category`` -> COCO folder ``out``; returns its dataset_info.

    Layout (NEU-DET's): ``train/<class>/*.png``, optional ``test/<class>/*.png``, one XML per image in
    ``annotations/<stem>.xml`` or beside the image (that one wins). ``train/`` is split into train / val
    stratified by class folder; ``test/`` becomes the COCO ``test`` split (without one, ``test_ratio`` of
    ``train/`` does, see :func:`_splits`). Images without objects are negatives.
    ``min_area`` is not applied to boxes (recorded only).
    """
    _check_common(train_ratio, test_ratio, classes_mode, min_area)
    root = Path(root)
    base = root / category
    if not root.is_dir():
        raise DataError(f"dataset root not found: {root}")
    if not (base / "train").is_dir():
        raise DataError(f"VOC train folder not found: {base / 'train'} (expected {base}/train/<class>/*.png)")
    check_out(Path(out), [base])
    by_split: dict[str, list[_Record]] = {}
    clamped = 0
    claimed: dict[Path, Path] = {}
    for split in ("train", "test"):
        if not (base / split).is_dir():
            continue
        items, parsed = _voc_split(base, split, progress, claimed)
        if not items:
            raise DataError(f"no images in {base / split}/<class>/")
        records, names = [], set()
        for (image, folder), (height, width, objects, n_clamped) in zip(items, parsed, strict=True):
            clamped += n_clamped
            name = image.name if image.name not in names else f"{folder}_{image.name}"
            names.add(name)
            instances = [Instance(n if classes_mode == "per-type" else SINGLE_CLASS, b, b[2] * b[3])
                         for n, b in objects]
            records.append(_Record(image, folder, name, height, width, instances))
        by_split[split] = records
    all_records = [r for rs in by_split.values() for r in rs]
    if not any(r.instances for r in all_records):
        raise DataError(f"no objects in the VOC annotations of {base}")
    classes = sorted({i.label for r in all_records for i in r.instances})
    if GOOD in classes:
        raise DataError(f"the VOC class name {GOOD!r} is reserved for defect-free images")
    if good_class:
        classes.append(GOOD)
        _add_good_boxes(all_records, with_polygon=False)
    splits = _splits(by_split["train"], by_split.get("test"), train_ratio, test_ratio, seed)
    info = _info("voc", category, classes, classes_mode, good_class, train_ratio, seed, min_area,
                 test_ratio=test_ratio if "test" not in by_split else None, masks=False, root=str(root.resolve()),
                 clamped_boxes=clamped)
    return write_coco(out, splits, classes, info, progress=progress)  # type: ignore[arg-type]


def convert(source: str, root: str | Path, category: str, out: str | Path, **options: Any) -> dict[str, Any]:
    """Dispatch to :func:`convert_mvtec` / :func:`convert_voc` by ``source``."""
    converters = {"mvtec": convert_mvtec, "voc": convert_voc}
    if source not in converters:
        raise DataError(f"unknown source {source!r} (choose from: {', '.join(converters)})")
    return converters[source](root, category, out, **options)


# ------------------------------------------------------------------------------ reader
def read_info(root: str | Path) -> dict[str, Any]:
    """``dataset_info.json`` of a COCO folder; DataError naming the file if it is missing or not JSON."""
    path = Path(root) / INFO_FILE
    if not path.is_file():
        raise DataError(f"not a COCO folder written by `edgeinspect data coco`: {path} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None


class CocoSplit:
    """One split of a COCO folder: images as RGB uint8 with torchvision-style targets.

    ``classes`` are the category names in id order (id = index + 1); ``image_ids`` the COCO image ids in
    ascending order; ``load(i)`` reads the i-th of them; ``coco`` is the pycocotools COCO object.
    """

    def __init__(self, root: str | Path, split: str) -> None:
        from pycocotools.coco import COCO

        self.root = Path(root)
        self.split = split
        path = self.root / split / ANNOTATIONS
        if not path.is_file():
            raise DataError(f"COCO split not found: {path} (splits are {', '.join(SPLITS)})")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints timing lines
                self.coco = COCO(str(path))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError) as exc:
            raise DataError(f"{path} is not a COCO annotation file: {exc}") from None
        cats = sorted(self.coco.dataset.get("categories", []), key=lambda c: c["id"])
        if [c["id"] for c in cats] != list(range(1, len(cats) + 1)):
            raise DataError(f"{path}: category ids must be 1..C in order, got {[c['id'] for c in cats]}")
        self.classes: list[str] = [c["name"] for c in cats]
        self.image_ids: list[int] = sorted(self.coco.getImgIds())
        info_path = self.root / INFO_FILE
        info = read_info(self.root) if info_path.is_file() else {}
        self.has_masks: bool = bool(info.get("masks", any(a.get("segmentation") for a in self.coco.anns.values())))

    def __len__(self) -> int:
        return len(self.image_ids)

    def path_of(self, i: int) -> Path:
        """File of the i-th image."""
        return self.root / self.split / IMAGES / self.coco.imgs[self.image_ids[i]]["file_name"]

    def load(self, i: int) -> tuple[np.ndarray, dict[str, Any]]:
        """(HxWx3 uint8 RGB image, {"boxes" K x 4 float32 xyxy px, "labels" K int64, "masks" K x H x W uint8
        or None for box-only datasets}) of the i-th image."""
        meta = self.coco.imgs[self.image_ids[i]]
        image = read_image(self.path_of(i))
        height, width = image.shape[:2]
        if (height, width) != (meta["height"], meta["width"]):
            raise DataError(f"{self.path_of(i)} is {width}x{height} but its annotation says "
                            f"{meta['width']}x{meta['height']}")
        anns = sorted(self.coco.imgToAnns.get(meta["id"], []), key=lambda a: a["id"])
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        target: dict[str, Any] = {"boxes": boxes, "labels": np.array([a["category_id"] for a in anns], np.int64),
                                  "masks": None}
        if self.has_masks:
            masks = np.zeros((len(anns), height, width), dtype=np.uint8)
            for k, ann in enumerate(anns):
                if ann.get("segmentation"):
                    masks[k] = self.coco.annToMask(ann)
                else:  # a box without a polygon: its mask is the box
                    x0, y0, x1, y1 = np.rint(boxes[k]).astype(int)
                    masks[k, y0:y1, x0:x1] = 1
            target["masks"] = masks
        return image, target
