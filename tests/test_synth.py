"""The synthetic dataset generator: determinism, layout, masks, difficulty and the video writer."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from edgeinspect.errors import DataError
from edgeinspect.imageio import read_image
from edgeinspect.train.data import DEFECT_TYPES, SYNTH_CATEGORIES, synthesize, write_video

COUNTS = {"n_train": 2, "n_test_good": 20, "n_test_per_defect": 5}
SIZE = 256
TINY = {"n_train": 2, "n_test_good": 1, "n_test_per_defect": 1, "size": 96}


@pytest.fixture(scope="module", params=sorted(SYNTH_CATEGORIES))
def synthesized(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(tmp_path_factory.mktemp("synth"), request.param, seed=7, size=SIZE, **COUNTS)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _test_images(folder: Path) -> list[tuple[str, Path]]:
    return [(t.name, p) for t in sorted((folder / "test").iterdir()) for p in sorted(t.glob("*.png"))]


def _mask_file(folder: Path, defect: str, image: Path) -> Path:
    return folder / "ground_truth" / defect / f"{image.stem}_mask.png"


def test_categories_described() -> None:
    assert {"washer", "brushed_metal"} <= set(SYNTH_CATEGORIES)
    assert all(isinstance(text, str) and text for text in SYNTH_CATEGORIES.values())
    assert DEFECT_TYPES == ("scratch", "hole", "stain", "crack")


def test_layout_and_counts(synthesized: Path) -> None:
    assert len(list((synthesized / "train" / "good").glob("*.png"))) == COUNTS["n_train"]
    assert sorted(p.name for p in (synthesized / "test").iterdir()) == sorted(("good", *DEFECT_TYPES))
    assert len(list((synthesized / "test" / "good").glob("*.png"))) == COUNTS["n_test_good"]
    assert sorted(p.name for p in (synthesized / "ground_truth").iterdir()) == sorted(DEFECT_TYPES)
    for defect in DEFECT_TYPES:
        images = sorted((synthesized / "test" / defect).glob("*.png"))
        masks = sorted((synthesized / "ground_truth" / defect).glob("*.png"))
        assert len(images) == COUNTS["n_test_per_defect"]
        assert [m.name for m in masks] == [f"{p.stem}_mask.png" for p in images]
    readme = (synthesized / "README.txt").read_text()
    assert synthesized.name in readme and "seed: 7" in readme


def test_images_are_rgb_and_masks_binary_small_nonempty(synthesized: Path) -> None:
    for defect, path in _test_images(synthesized):
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3)
        if defect == "good":
            continue
        mask = cv2.imread(str(_mask_file(synthesized, defect, path)), cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint8 and mask.shape == (SIZE, SIZE)
        assert set(np.unique(mask)) == {0, 255}
        assert (mask > 0).mean() < 0.05, f"{path}: a defect should be small"


def test_washer_defects_lie_on_the_part(tmp_path: Path) -> None:
    root = synthesize(tmp_path, "washer", seed=11, n_train=1, n_test_good=0, n_test_per_defect=4, size=SIZE)
    for defect, path in _test_images(root):
        gray = cv2.cvtColor(read_image(path), cv2.COLOR_RGB2GRAY)
        _, part = cv2.threshold(gray, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        # closing fills dark pits and cracks on the metal but not the bore or the background
        part = cv2.morphologyEx(part, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (15, 15)))
        mask = cv2.imread(str(_mask_file(root, defect, path)), cv2.IMREAD_GRAYSCALE) > 0
        assert 0.2 < part.mean() < 0.8, f"{path}: part not found"
        assert part[mask].mean() > 0.99, f"{path}: defect pixels off the part"


def test_mean_brightness_does_not_separate_defects(synthesized: Path) -> None:
    pairs = _test_images(synthesized)
    labels = [int(defect != "good") for defect, _ in pairs]
    brightness = [float(read_image(path).mean()) for _, path in pairs]
    assert roc_auc_score(labels, brightness) < 0.75
    assert roc_auc_score(labels, [-b for b in brightness]) < 0.75


def test_same_seed_is_byte_identical(tmp_path: Path) -> None:
    first = _tree(synthesize(tmp_path / "a", "washer", seed=5, **TINY))
    second = _tree(synthesize(tmp_path / "b", "washer", seed=5, **TINY))
    assert first == second
    other = _tree(synthesize(tmp_path / "c", "washer", seed=6, **TINY))
    assert first.keys() == other.keys()
    differing = [name for name in first if name.endswith(".png") and first[name] != other[name]]
    assert sorted(differing) == sorted(name for name in first if name.endswith(".png"))


def test_unknown_category_lists_choices(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown synthetic category") as info:
        synthesize(tmp_path, "gear")
    assert all(name in str(info.value) for name in SYNTH_CATEGORIES)


def test_resynthesis_replaces_previous_dataset(tmp_path: Path) -> None:
    synthesize(tmp_path, "brushed_metal", seed=1, n_train=3, n_test_good=2, n_test_per_defect=2, size=96)
    root = synthesize(tmp_path, "brushed_metal", seed=1, **TINY)
    assert len(list((root / "train" / "good").glob("*.png"))) == TINY["n_train"]
    assert len(list((root / "ground_truth" / "hole").glob("*.png"))) == TINY["n_test_per_defect"]


def test_refuses_to_overwrite_foreign_folder(tmp_path: Path) -> None:
    foreign = tmp_path / "washer" / "train" / "good"
    foreign.mkdir(parents=True)
    (foreign / "mine.png").write_bytes(b"user data")
    with pytest.raises(DataError, match="refusing to overwrite"):
        synthesize(tmp_path, "washer", **TINY)
    assert (foreign / "mine.png").read_bytes() == b"user data"


def test_write_video_round_trip(tmp_path: Path) -> None:
    only_train = {"n_test_good": 0, "n_test_per_defect": 0, "size": 96}
    root = synthesize(tmp_path / "data", "washer", seed=2, n_train=5, **only_train)
    frames = sorted((root / "train" / "good").glob("*.png"))[::-1]
    video = write_video(frames, tmp_path / "video" / "line.avi", fps=5.0)
    assert video == tmp_path / "video" / "line.avi"
    capture = cv2.VideoCapture(str(video))
    read_back = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        read_back.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB).astype(np.float32))
    capture.release()
    sources = [read_image(p).astype(np.float32) for p in frames]
    assert len(read_back) == len(frames)
    assert all(frame.shape == (96, 96, 3) for frame in read_back)
    for frame, source in zip(read_back, sources, strict=True):  # FFV1 is lossless: frames come back exact
        assert np.array_equal(frame, source)


def test_write_video_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no frames"):
        write_video([], tmp_path / "empty.avi")
    root = synthesize(tmp_path / "data", "washer", n_train=1, n_test_good=0, n_test_per_defect=0, size=96)
    frame = root / "train" / "good" / "000.png"
    with pytest.raises(DataError, match=r"\.avi"):
        write_video([frame], tmp_path / "clip.mp4")
    other = synthesize(tmp_path / "big", "washer", n_train=1, n_test_good=0, n_test_per_defect=0, size=128)
    odd = other / "train" / "good" / "000.png"
    with pytest.raises(DataError, match="frame size") as info:
        write_video([frame, odd], tmp_path / "mixed.avi")
    assert str(odd) in str(info.value)
