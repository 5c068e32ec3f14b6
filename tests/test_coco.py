"""MVTec masks / Pascal VOC boxes -> COCO folder, and the CocoSplit reader: round trip through pycocotools."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SYNTH_CATEGORY, SYNTH_COUNTS, shared_category
from pycocotools import mask as mask_utils

from edgeinspect.cli import main
from edgeinspect.errors import DataError
from edgeinspect.imageio import read_mask
from edgeinspect.train.data import coco as coco_module
from edgeinspect.train.data.coco import (
    CocoSplit,
    convert_mvtec,
    convert_voc,
    mask_instances,
    mask_to_polygons,
    read_info,
)

MIN_IOU = 0.9
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float((a & b).sum() / max((a | b).sum(), 1))


def _components(mask: np.ndarray, min_area: int) -> list[np.ndarray]:
    """The 8-connected components of a mask with at least min_area pixels (computed here, not by the module)."""
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return [c for c in (labels == k for k in range(1, n)) if c.sum() >= min_area]


def _source_mask(root: Path, file_name: str, types: list[str]) -> np.ndarray:
    """The ground-truth mask of a converted defective image ``test_<type>_<stem>.png``."""
    rest = file_name.removeprefix("test_")
    defect_type = max((t for t in types if rest.startswith(f"{t}_")), key=len)
    stem = Path(rest[len(defect_type) + 1:]).stem
    return read_mask(root / "ground_truth" / defect_type / f"{stem}_mask.png")


def _check_round_trip(coco_dir: Path, category_dir: Path, min_area: int) -> list[float]:
    """Every annotation rasterised by pycocotools matches one source component (IoU >= 0.9), with the
    component's box and area; every component >= min_area is an annotation. Returns the IoUs."""
    types = [p.name for p in (category_dir / "ground_truth").iterdir()]
    ious = []
    for split in ("train", "val", "test"):
        data = CocoSplit(coco_dir, split)
        for image_id in data.image_ids:
            meta = data.coco.imgs[image_id]
            anns = data.coco.imgToAnns.get(image_id, [])
            if meta["defect_type"] == "good":
                assert anns == []
                continue
            components = _components(_source_mask(category_dir, meta["file_name"], types), min_area)
            assert len(anns) == len(components) >= 1, meta["file_name"]
            for ann in anns:
                rendered = data.coco.annToMask(ann)
                best = max(components, key=lambda c, r=rendered: _iou(r, c))
                ious.append(_iou(rendered, best))
                assert ious[-1] >= MIN_IOU, (meta["file_name"], ann["id"], ious[-1])
                ys, xs = np.nonzero(best)
                assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
                assert ann["area"] == best.sum() and ann["iscrowd"] == 0
    return ious


@pytest.fixture(scope="module")
def coco_dir(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("coco") / "washer"
    convert_mvtec(synth_root, SYNTH_CATEGORY, out, progress=False)
    return out


# ------------------------------------------------------------------------------ polygons
def _hand_mask() -> np.ndarray:
    """A ring with an island in its hole and a second hole, a diagonal chain, a lone blob and a speck."""
    mask = np.zeros((64, 80), np.uint8)
    cv2.circle(mask, (22, 22), 16, 1, -1)
    cv2.circle(mask, (22, 22), 9, 0, -1)  # hole
    cv2.rectangle(mask, (20, 20), (24, 24), 1, -1)  # island inside the hole
    mask[33:36, 10:13] = 0  # second hole
    for k in range(12):  # 8-connected diagonal staircase: one component
        mask[45 + k, 50 + k] = 1
        mask[45 + k, 51 + k] = 1
    mask[5:15, 60:75] = 1  # lone rectangle
    mask[60, 2] = 1  # speck (1 px)
    return mask


def test_holes_and_multi_part_masks_round_trip() -> None:
    mask = _hand_mask()
    instances, dropped = mask_instances(mask, "x", min_area=2)
    components = _components(mask, 2)
    assert (len(instances), dropped) == (len(components), 1) == (4, 1)
    h, w = mask.shape
    for inst in instances:
        rendered = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(inst.polygons, h, w)))
        assert max(_iou(rendered, c) for c in components) >= MIN_IOU
    ring = max(instances, key=lambda i: i.area)
    rendered = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(ring.polygons, h, w)))
    assert rendered[22, 14] == 0 and rendered[34, 11] == 0  # both holes stay empty
    assert rendered[22, 22] == 0  # the island is its own instance, not part of the ring
    whole = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(mask_to_polygons(mask), h, w)))
    assert _iou(whole, mask) >= 0.99


def test_polygons_follow_pixel_edges() -> None:
    mask = np.zeros((10, 10), np.uint8)
    mask[2:5, 3:8] = 1
    assert mask_to_polygons(mask) in ([[3.0, 2.0, 3.0, 5.0, 8.0, 5.0, 8.0, 2.0]],
                                      [[3.0, 2.0, 8.0, 2.0, 8.0, 5.0, 3.0, 5.0]])
    assert mask_to_polygons(np.zeros((4, 4), np.uint8)) == []


# ------------------------------------------------------------------------------ MVTec
def test_round_trip_synthetic(coco_dir: Path, synth_root: Path) -> None:
    ious = _check_round_trip(coco_dir, synth_root / SYNTH_CATEGORY, coco_module.DEFAULT_MIN_AREA)
    assert len(ious) > 0


def test_dataset_info_and_reader(coco_dir: Path, synth_root: Path) -> None:
    info = read_info(coco_dir)
    assert info["source"] == "mvtec" and info["category"] == SYNTH_CATEGORY
    assert info["classes"] == ["crack", "hole", "scratch", "stain"] and info["classes_mode"] == "per-type"
    assert (info["good_class"], info["train_ratio"], info["test_ratio"], info["seed"]) == (False, 0.8, 0.1, 0)
    assert info["min_component_area"] == coco_module.DEFAULT_MIN_AREA and info["good_images"] == "all"
    n_good = SYNTH_COUNTS["n_train"] + SYNTH_COUNTS["n_test_good"]  # synth_root: train/good + test/good
    assert sum(info["splits"][s]["negative_images"] for s in ("train", "val", "test")) == n_good
    for split in ("train", "val", "test"):
        data = CocoSplit(coco_dir, split)
        assert data.classes == info["classes"] and len(data) == info["splits"][split]["images"]
        assert data.image_ids == sorted(data.image_ids)
        for i in range(len(data)):
            image, target = data.load(i)
            h, w = image.shape[:2]
            assert image.dtype == np.uint8 and image.shape[2] == 3 and data.path_of(i).is_file()
            k = len(target["labels"])
            assert target["boxes"].shape == (k, 4) and target["boxes"].dtype == np.float32
            assert target["labels"].dtype == np.int64 and set(target["labels"]) <= {1, 2, 3, 4}
            assert target["masks"].shape == (k, h, w) and target["masks"].dtype == np.uint8
            for box, m in zip(target["boxes"], target["masks"], strict=True):
                ys, xs = np.nonzero(m)
                np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


def test_split_is_stratified_and_seeded(coco_dir: Path, synth_root: Path, tmp_path: Path) -> None:
    def names(d: Path) -> dict[str, list[str]]:
        return {s: sorted(p.name for p in (d / s / "images").iterdir()) for s in ("train", "val", "test")}

    info = read_info(coco_dir)
    per_type = {"good": SYNTH_COUNTS["n_train"] + SYNTH_COUNTS["n_test_good"],
                **{t: SYNTH_COUNTS["n_test_per_defect"] for t in info["classes"]}}
    for defect_type, n in per_type.items():
        # test_ratio of each type first (at least one), then 1 - train_ratio of the rest to val
        n_test, n_val, n_train = (info["splits"][s]["per_type"][defect_type] for s in ("test", "val", "train"))
        assert n_test == max(round(0.1 * n), 1) and n_val == round(0.2 * (n - n_test))
        assert n_train == n - n_test - n_val
    again = convert_mvtec(synth_root, SYNTH_CATEGORY, tmp_path / "same", progress=False)
    assert names(tmp_path / "same") == names(coco_dir) and again["splits"] == info["splits"]
    convert_mvtec(synth_root, SYNTH_CATEGORY, tmp_path / "other", seed=1, progress=False)
    assert names(tmp_path / "other") != names(coco_dir)
    assert set(sum(names(tmp_path / "other").values(), [])) == set(sum(names(coco_dir).values(), []))


def test_single_class_good_class_and_good_images(synth_root: Path, tmp_path: Path) -> None:
    info = convert_mvtec(synth_root, SYNTH_CATEGORY, tmp_path / "a", classes_mode="single", good_class=True,
                         good_images="test", progress=False)
    assert info["classes"] == ["defect", "good"] and info["good_class"] is True
    assert sum(info["splits"][s]["per_type"]["good"] for s in ("train", "val", "test")) == 12  # test/good only
    for split in ("train", "val"):
        data = CocoSplit(tmp_path / "a", split)
        for i in range(len(data)):
            image, target = data.load(i)
            h, w = image.shape[:2]
            if data.coco.imgs[data.image_ids[i]]["defect_type"] == "good":
                assert target["labels"].tolist() == [2]
                np.testing.assert_array_equal(target["boxes"], [[0, 0, w, h]])
                assert target["masks"].all()
            else:
                assert set(target["labels"].tolist()) == {1}
    none = convert_mvtec(synth_root, SYNTH_CATEGORY, tmp_path / "b", good_images="none", progress=False)
    assert all(c["negative_images"] == 0 and "good" not in c["per_type"] for c in none["splits"].values())


def test_min_area_drops_components_and_leaves_out_empty_images(tmp_path: Path) -> None:
    cat = tmp_path / "src" / "part"
    image = np.full((40, 40, 3), 128, np.uint8)
    for folder in ("train/good", "test/good", "test/dent", "ground_truth/dent"):
        (cat / folder).mkdir(parents=True)
    for k in range(3):
        cv2.imwrite(str(cat / "train" / "good" / f"{k:03d}.png"), image)
        cv2.imwrite(str(cat / "test" / "good" / f"{k:03d}.png"), image)
        cv2.imwrite(str(cat / "test" / "dent" / f"{k:03d}.png"), image)
        mask = np.zeros((40, 40), np.uint8)
        mask[2:4, 2:4] = 255  # 4 px: below min area 5
        if k:
            mask[10:20, 10:20] = 255
        cv2.imwrite(str(cat / "ground_truth" / "dent" / f"{k:03d}_mask.png"), mask)
    info = convert_mvtec(tmp_path / "src", "part", tmp_path / "out", min_area=5, progress=False)
    assert info["dropped_components"] == 3 and info["left_out"]["all_components_below_min_area"] == 1
    assert sum(c["annotations"] for c in info["splits"].values()) == 2
    info = convert_mvtec(tmp_path / "src", "part", tmp_path / "out", min_area=0, progress=False)  # replaces
    assert sum(c["annotations"] for c in info["splits"].values()) == 5 and info["dropped_components"] == 0


def test_bad_inputs_never_leave_a_half_written_out(synth_root: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="dataset root not found"):
        convert_mvtec(tmp_path / "missing", SYNTH_CATEGORY, tmp_path / "o", progress=False)
    no_masks = tmp_path / "no_masks"
    shutil.copytree(synth_root / SYNTH_CATEGORY, no_masks / SYNTH_CATEGORY)
    shutil.rmtree(no_masks / SYNTH_CATEGORY / "ground_truth")
    with pytest.raises(DataError, match="no ground-truth masks"):
        convert_mvtec(no_masks, SYNTH_CATEGORY, tmp_path / "o", progress=False)
    with pytest.raises(DataError, match="--train-ratio"):
        convert_mvtec(synth_root, SYNTH_CATEGORY, tmp_path / "o", train_ratio=1.0, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="refusing to overwrite"):
        convert_mvtec(synth_root, SYNTH_CATEGORY, foreign, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]

    out = tmp_path / "o"
    convert_mvtec(synth_root, SYNTH_CATEGORY, out, progress=False)
    before = (out / "train" / "annotations.json").read_bytes()
    calls = []

    def failing_copy(src: Path, dst: Path) -> None:
        calls.append(src)
        if len(calls) > 5:
            raise OSError(28, "No space left on device", str(dst))
        shutil.copy2(src, dst)

    monkeypatch.setattr(coco_module, "link_or_copy", failing_copy)
    with pytest.raises(OSError):
        convert_mvtec(synth_root, SYNTH_CATEGORY, out, seed=5, progress=False)
    assert (out / "train" / "annotations.json").read_bytes() == before  # the old folder, untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".o.")] == []  # no staging left


def test_real_bottle_round_trip(tmp_path: Path) -> None:
    category = shared_category("mvtec_ad/bottle")
    info = convert_mvtec(category.parent, "bottle", tmp_path / "bottle", progress=False)
    assert info["classes"] == ["broken_large", "broken_small", "contamination"]
    assert sum(c["images"] for c in info["splits"].values()) == 209 + 83
    ious = _check_round_trip(tmp_path / "bottle", category, info["min_component_area"])
    assert len(ious) == sum(c["annotations"] for c in info["splits"].values()) == 68


# ------------------------------------------------------------------------------ VOC
def _voc_xml(path: Path, name: str, size: tuple[int, int], boxes: list[tuple[str, tuple[int, ...]]]) -> None:
    objects = "".join(f"<object><name>{c}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
                      f"<ymax>{b[3]}</ymax></bndbox></object>" for c, b in boxes)
    path.write_text(f"<annotation><filename>{name}</filename><size><width>{size[0]}</width>"
                    f"<height>{size[1]}</height><depth>1</depth></size>{objects}</annotation>")


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    """A tiny NEU-DET-style VOC dataset: classes a, b; 5 train + 2 test images each; grayscale 32 x 48."""
    base = tmp_path / "voc" / "steel"
    (base / "annotations").mkdir(parents=True)
    for split, n in (("train", 5), ("test", 2)):
        for cls in ("a", "b"):
            (base / split / cls).mkdir(parents=True)
            for k in range(n):
                name = f"{cls}_{split}{k}.png"
                cv2.imwrite(str(base / split / cls / name), np.full((32, 48), 60 + k, np.uint8))
                boxes = [(cls, (2, 3, 20, 30))] + ([("b", (30, 1, 47, 9))] if k == 0 else [])
                _voc_xml(base / "annotations" / f"{cls}_{split}{k}.xml", name, (48, 32), boxes)
    return tmp_path / "voc"


def test_voc_conversion(voc_root: Path, tmp_path: Path) -> None:
    info = convert_voc(voc_root, "steel", tmp_path / "out", progress=False)
    assert info["source"] == "voc" and info["classes"] == ["a", "b"] and info["masks"] is False
    counts = {s: (c["images"], c["annotations"]) for s, c in info["splits"].items()}
    assert counts == {"train": (8, 10), "val": (2, 2), "test": (4, 6)}
    assert info["splits"]["val"]["per_type"] == {"a": 1, "b": 1}  # stratified by class folder
    data = CocoSplit(tmp_path / "out", "test")
    image, target = data.load(0)
    assert image.shape == (32, 48, 3) and target["masks"] is None
    np.testing.assert_array_equal(target["boxes"][0], [2, 3, 20, 30])
    assert data.coco.anns[1]["bbox"] == [2, 3, 18, 27] and data.coco.anns[1]["segmentation"] == []


def test_voc_bad_boxes_and_xml(voc_root: Path, tmp_path: Path) -> None:
    xml = voc_root / "steel" / "annotations" / "a_train0.xml"
    _voc_xml(xml, "a_train0.png", (48, 32), [("a", (-4, 3, 60, 30))])
    info = convert_voc(voc_root, "steel", tmp_path / "out", progress=False)
    assert info["clamped_boxes"] == 1
    before = (tmp_path / "out" / "dataset_info.json").read_bytes()
    _voc_xml(xml, "a_train0.png", (48, 32), [("a", (50, 3, 60, 30))])
    with pytest.raises(DataError, match="empty box"):
        convert_voc(voc_root, "steel", tmp_path / "out", progress=False)
    xml.write_text("<annotation><object>")
    with pytest.raises(DataError, match="cannot parse VOC annotation .*a_train0.xml"):
        convert_voc(voc_root, "steel", tmp_path / "out", progress=False)
    xml.unlink()
    with pytest.raises(DataError, match="no VOC annotation for .*a_train0.png"):
        convert_voc(voc_root, "steel", tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "dataset_info.json").read_bytes() == before
    with pytest.raises(DataError, match="VOC train folder not found"):
        convert_voc(voc_root, "nothing", tmp_path / "out2", progress=False)


def test_voc_xml_beside_the_image_wins_and_a_shared_xml_is_read_once(voc_root: Path, tmp_path: Path) -> None:
    """annotations/<stem>.xml is found by stem: two images of one name in two class folders would both read it,
    so that is refused; an XML beside an image is its own and wins over annotations/."""
    base = voc_root / "steel"
    twin = base / "train" / "b" / "a_train1.png"
    shutil.copy(base / "train" / "a" / "a_train1.png", twin)
    with pytest.raises(DataError, match="would both read .*annotations/a_train1.xml"):
        convert_voc(voc_root, "steel", tmp_path / "out", progress=False)
    _voc_xml(twin.with_suffix(".xml"), twin.name, (48, 32), [("b", (5, 5, 25, 25))])
    convert_voc(voc_root, "steel", tmp_path / "out", progress=False)
    data = CocoSplit(tmp_path / "out", "train")
    boxes = {data.coco.imgs[a["image_id"]]["file_name"]: a["bbox"] for a in data.coco.anns.values()
             if data.coco.imgs[a["image_id"]]["file_name"].endswith("a_train1.png")}
    assert boxes == {"a_train1.png": [2, 3, 18, 27], "b_a_train1.png": [5, 5, 20, 20]}


def test_neu_det_counts(tmp_path: Path) -> None:
    category = shared_category("neu_det/steel_strip")
    info = convert_voc(category.parent, "steel_strip", tmp_path / "neu", progress=False)
    s = info["splits"]
    assert len(info["classes"]) == 6 and info["clamped_boxes"] == 0
    assert (s["train"]["images"] + s["val"]["images"], s["test"]["images"]) == (1440, 359)
    assert (s["train"]["annotations"] + s["val"]["annotations"], s["test"]["annotations"]) == (3317, 869)
    assert set(s["val"]["per_type"].values()) == {48}  # 20 % of each class folder's 240


# ------------------------------------------------------------------------------ CLI
def test_cli_data_coco(voc_root: Path, synth_root: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["-q", "data", "coco", str(voc_root), "--category", "steel", "--from", "voc",
                                       "--out", str(tmp_path / "c"), "--classes", "single", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {tmp_path / 'c'}: 1 classes (defect); train 8 images")
    assert json.loads((tmp_path / "c" / "dataset_info.json").read_text())["seed"] == 3
    result = CliRunner().invoke(main, ["data", "coco", str(voc_root), "--category", "steel", "--from", "voc",
                                       "--out", str(tmp_path / "d"), "--good-images", "test"])
    assert result.exit_code == 2 and "--good-images applies to --from mvtec only" in result.output
    result = CliRunner().invoke(main, ["data", "coco", str(synth_root), "--category", "nope",
                                       "--out", str(tmp_path / "e")])
    assert result.exit_code == 1 and "category folder not found" in result.output
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()
