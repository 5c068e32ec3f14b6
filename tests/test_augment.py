"""Offline augmentation of a COCO folder: boxes, masks and polygons move with the image."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SYNTH_CATEGORY

from edgeinspect.cli import main
from edgeinspect.errors import DataError
from edgeinspect.train.data.augment import augment_dataset, augment_sample, build_transform
from edgeinspect.train.data.coco import CocoSplit, convert_mvtec, mask_box, mask_to_polygons, read_info

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools


def _d4(mask: np.ndarray) -> list[np.ndarray]:
    """The eight flips / quarter turns of a 2-D array."""
    return [np.rot90(m, k) for m in (mask, np.fliplr(mask)) for k in range(4)]


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A non-square RGB image with three asymmetric instance masks (one holed) and their boxes."""
    rng = np.random.default_rng(0)
    field = cv2.GaussianBlur(rng.standard_normal((48, 72, 3)).astype(np.float32), (0, 0), 4)  # smooth: blur-proof
    image = np.clip(128 + field / field.std() * 40, 0, 255).astype(np.uint8)
    masks = np.zeros((3, 48, 72), np.uint8)
    masks[0, 3:9, 5:30] = 1
    masks[0, 9:20, 5:9] = 1  # an L
    masks[1, 25:45, 40:70] = 1
    masks[1, 30:35, 50:55] = 0  # a hole
    masks[2, 40:47, 2:4] = 1
    boxes = np.array([mask_box(m) for m in masks])
    return image, masks, boxes


def test_geometry_boxes_follow_masks_exactly() -> None:
    image, masks, boxes = _scene()
    transform = build_transform(seed=0)
    seen = set()
    for _ in range(40):
        aug, aug_boxes, labels, aug_masks = augment_sample(transform, image, boxes, np.array([1, 2, 3]), masks)
        assert labels.tolist() == [1, 2, 3] and aug_masks.shape[1:] == aug.shape[:2]
        for k in range(3):
            # the mask moved by the transform, its box recomputed, equals the box the transform moved
            np.testing.assert_allclose(mask_box(aug_masks[k]), aug_boxes[k], atol=1e-3)
        # flips and quarter turns are exact: the masks are one of the eight symmetries of the originals
        matches = [g for g, cands in enumerate(zip(*(_d4(m) for m in masks), strict=True))
                   if all(c.shape == a.shape and np.array_equal(c, a) for c, a in zip(cands, aug_masks, strict=True))]
        assert len(matches) == 1
        seen.add(matches[0])
        # and the image moved with them (the photometric part changes values, not places)
        original = _d4(image.astype(np.int32).sum(axis=2))[matches[0]]
        moved = aug.astype(np.int32).sum(axis=2)
        assert np.corrcoef(original.ravel(), moved.ravel())[0, 1] > 0.8
    assert seen == set(range(8))  # every flip / rotation occurs


def test_box_only_draw_matches_the_draw_with_masks() -> None:
    image, masks, boxes = _scene()
    with_masks = augment_sample(build_transform(seed=4), image, boxes, np.array([1, 2, 3]), masks)
    box_only = augment_sample(build_transform(seed=4), image, boxes, np.array([1, 2, 3]))
    np.testing.assert_array_equal(with_masks[0], box_only[0])
    np.testing.assert_array_equal(with_masks[1], box_only[1])
    assert box_only[3] is None
    empty = augment_sample(build_transform(seed=4), image, np.zeros((0, 4)), np.zeros(0), masks[:0])
    assert empty[1].shape == (0, 4) and empty[3].shape == (0, *empty[0].shape[:2])


@pytest.fixture(scope="module")
def coco_dir(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("coco") / "washer"
    convert_mvtec(synth_root, SYNTH_CATEGORY, out, good_images="test", progress=False)
    return out


def test_augment_dataset(coco_dir: Path, tmp_path: Path) -> None:
    factor = 2
    info = augment_dataset(coco_dir, tmp_path / "aug", factor, seed=1, progress=False)
    source = read_info(coco_dir)
    for split in ("train", "val"):
        assert info["splits"][split]["images"] == source["splits"][split]["images"] * (1 + (split == "train") * factor)
        assert info["splits"][split]["annotations"] == source["splits"][split]["annotations"] * (
            1 + (split == "train") * factor)
    assert (tmp_path / "aug" / "val" / "annotations.json").read_bytes() == \
        (coco_dir / "val" / "annotations.json").read_bytes()
    assert info["augmentation"]["factor"] == factor and info["classes"] == source["classes"]

    original, augmented = CocoSplit(coco_dir, "train"), CocoSplit(tmp_path / "aug", "train")
    by_name = {original.coco.imgs[i]["file_name"]: n for n, i in enumerate(original.image_ids)}
    n_checked = 0
    for n, image_id in enumerate(augmented.image_ids):
        meta = augmented.coco.imgs[image_id]
        if "source_file" not in meta:
            continue
        _, target = augmented.load(n)
        _, source_target = original.load(by_name[meta["source_file"]])
        for ann, mask in zip(sorted(augmented.coco.imgToAnns[image_id], key=lambda a: a["id"]), target["masks"],
                             strict=True):
            assert ann["bbox"] == mask_box(mask) and ann["area"] == mask.sum()  # box from the moved mask
        # polygons rasterised by pycocotools give the source instances moved by one flip / quarter turn
        candidates = list(zip(*(_d4(m) for m in source_target["masks"]), strict=True))
        assert len(target["masks"]) == len(source_target["masks"])
        assert not candidates or any(all(c.shape == m.shape and (c & m).sum() / max((c | m).sum(), 1) >= 0.9
                                         for c, m in zip(cands, target["masks"], strict=True))
                                     for cands in candidates), meta
        assert target["labels"].tolist() == source_target["labels"].tolist()
        n_checked += 1
    assert n_checked == len(original) * factor


def test_augment_is_seeded_and_checks_input(coco_dir: Path, tmp_path: Path) -> None:
    augment_dataset(coco_dir, tmp_path / "a", 1, seed=3, progress=False)
    augment_dataset(coco_dir, tmp_path / "b", 1, seed=3, progress=False)
    names = sorted(p.name for p in (tmp_path / "a" / "train" / "images").glob("*_aug1.png"))
    assert names and all((tmp_path / "a" / "train" / "images" / n).read_bytes()
                         == (tmp_path / "b" / "train" / "images" / n).read_bytes() for n in names)
    with pytest.raises(DataError, match="--factor"):
        augment_dataset(coco_dir, tmp_path / "c", 0, progress=False)
    with pytest.raises(DataError, match="outside the source"):
        augment_dataset(coco_dir, coco_dir, 1, progress=False)
    with pytest.raises(DataError, match="dataset_info.json not found"):
        augment_dataset(tmp_path / "nothing", tmp_path / "c", 1, progress=False)
    assert not (tmp_path / "c").exists()


def test_polygons_of_a_moved_mask_rasterise_back() -> None:
    from pycocotools import mask as mask_utils

    image, masks, boxes = _scene()
    transform = build_transform(seed=2)
    for _ in range(8):
        aug, _, _, aug_masks = augment_sample(transform, image, boxes, np.array([1, 2, 3]), masks)
        h, w = aug.shape[:2]
        for m in aug_masks:
            rendered = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(mask_to_polygons(m), h, w)))
            assert (rendered & m).sum() / (rendered | m).sum() >= 0.9


def test_cli_data_augment(coco_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["-q", "data", "augment", str(coco_dir), "--out", str(tmp_path / "a"),
                                       "--factor", "1", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {tmp_path / 'a'}: train ")
    assert json.loads((tmp_path / "a" / "dataset_info.json").read_text())["augmentation"]["seed"] == 2
    result = CliRunner().invoke(main, ["data", "augment", str(coco_dir), "--out", str(tmp_path / "b"),
                                       "--factor", "0"])
    assert result.exit_code == 2
