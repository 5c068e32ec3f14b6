"""The MVTec AD layout reader, on a synthesized dataset and (when present) on real MVTec-layout data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeinspect.errors import DataError
from edgeinspect.preprocess import Preprocess
from edgeinspect.train import trainer
from edgeinspect.train.data import DEFECT_TYPES, MVTecCategory, Sample, synthesize
from edgeinspect.train.metrics import pixel_auroc, pro

N_TRAIN, N_TEST_GOOD, N_PER_DEFECT, SIZE = 4, 3, 2, 96
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def dataset(tmp_path: Path) -> MVTecCategory:
    counts = {"n_train": N_TRAIN, "n_test_good": N_TEST_GOOD, "n_test_per_defect": N_PER_DEFECT}
    synthesize(tmp_path, "washer", seed=3, size=SIZE, **counts)
    return MVTecCategory(tmp_path, "washer")


def test_paths(dataset: MVTecCategory, tmp_path: Path) -> None:
    assert dataset.root == tmp_path
    assert dataset.category == "washer"
    assert dataset.path == tmp_path / "washer"


def test_train_samples(dataset: MVTecCategory) -> None:
    samples = dataset.train_samples()
    assert len(samples) == N_TRAIN
    assert all(s == Sample(s.image_path, 0, "good", None) for s in samples)
    assert [s.image_path for s in samples] == sorted((dataset.path / "train" / "good").glob("*.png"))


def test_test_samples_labels_and_masks(dataset: MVTecCategory) -> None:
    samples = dataset.test_samples()
    assert len(samples) == N_TEST_GOOD + N_PER_DEFECT * len(DEFECT_TYPES)
    assert [(s.defect_type, s.image_path.name) for s in samples] == sorted(
        (s.defect_type, s.image_path.name) for s in samples
    )
    for sample in samples:
        assert sample.image_path.parent == dataset.path / "test" / sample.defect_type
        if sample.defect_type == "good":
            assert (sample.label, sample.mask_path) == (0, None)
        else:
            assert sample.label == 1
            mask_name = f"{sample.image_path.stem}_mask.png"
            assert sample.mask_path == dataset.path / "ground_truth" / sample.defect_type / mask_name
    assert {s.defect_type for s in samples if s.label} == set(DEFECT_TYPES)


def test_summary(dataset: MVTecCategory, tmp_path: Path) -> None:
    assert dataset.summary() == {
        "root": str(tmp_path),
        "category": "washer",
        "train_good": N_TRAIN,
        "test_good": N_TEST_GOOD,
        "test_defect": {t: N_PER_DEFECT for t in DEFECT_TYPES},
        "masks": N_PER_DEFECT * len(DEFECT_TYPES),
    }


def test_load_image_and_mask_shapes(dataset: MVTecCategory) -> None:
    for sample in dataset.test_samples():
        image = dataset.load_image(sample)
        assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3)
        mask = dataset.load_mask(sample, image.shape[:2])
        assert mask.dtype == bool and mask.shape == image.shape[:2]
        assert mask.any() == bool(sample.label)
        # a mask of another size is resized (nearest): upscaling keeps every defect pixel
        larger = dataset.load_mask(sample, (SIZE * 2 + 1, SIZE * 3))
        assert larger.dtype == bool and larger.shape == (SIZE * 2 + 1, SIZE * 3)
        assert larger.sum() >= mask.sum()


def test_defect_without_mask_file(dataset: MVTecCategory) -> None:
    mask_file = dataset.path / "ground_truth" / "stain" / "000_mask.png"
    mask_file.unlink()
    image = dataset.path / "test" / "stain" / "000.png"
    sample = next(s for s in dataset.test_samples() if s.image_path == image)
    assert sample.label == 1 and sample.mask_path is None
    assert not dataset.load_mask(sample, (SIZE, SIZE)).any()
    assert dataset.summary()["masks"] == N_PER_DEFECT * len(DEFECT_TYPES) - 1


def test_defect_without_mask_file_stays_out_of_the_pixel_metrics(dataset: MVTecCategory) -> None:
    """A defective image without a mask has no pixel truth: its detected defect must not count as false
    positives, so the pixel metrics are those of the images that have truth."""
    (dataset.path / "ground_truth" / "stain" / "000_mask.png").unlink()
    samples = dataset.test_samples()
    preprocess = Preprocess(resize=(SIZE, SIZE), crop=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    truth = np.stack([dataset.load_mask(s, (SIZE, SIZE)) for s in samples])
    maps = np.random.default_rng(0).random(truth.shape) + truth
    unmasked = next(i for i, s in enumerate(samples) if s.label and s.mask_path is None)
    maps[unmasked, 20:40, 20:40] += 1.0  # its defect, found by the model
    scores = maps.reshape(len(samples), -1).max(1)
    metrics = trainer.test_metrics(dataset, samples, preprocess, maps, scores, 1.5, min_region_area=1)
    keep = np.arange(len(samples)) != unmasked
    assert metrics["pixel_auroc"] == pytest.approx(pixel_auroc(truth[keep], maps[keep]), abs=1e-12)
    assert metrics["pro"] == pytest.approx(pro(truth[keep], maps[keep]), abs=1e-12)
    assert metrics["pixel_auroc"] > pixel_auroc(truth, maps)
    assert metrics["n_images"] == len(samples)


def test_mask_of_good_image_is_never_looked_up(dataset: MVTecCategory) -> None:
    good_masks = dataset.path / "ground_truth" / "good"
    good_masks.mkdir()
    shutil.copy(dataset.path / "ground_truth" / "hole" / "000_mask.png", good_masks / "000_mask.png")
    goods = [s for s in dataset.test_samples() if s.defect_type == "good"]
    assert len(goods) == N_TEST_GOOD and all(s.mask_path is None for s in goods)


def test_val_split(dataset: MVTecCategory) -> None:
    assert dataset.val_samples() == []
    val = dataset.path / "val"
    (val / "good").mkdir(parents=True)
    (val / "scratch").mkdir()
    shutil.copy(dataset.path / "test" / "good" / "000.png", val / "good" / "100.png")
    shutil.copy(dataset.path / "test" / "scratch" / "000.png", val / "scratch" / "100.png")
    shutil.copy(dataset.path / "test" / "scratch" / "001.png", val / "scratch" / "101.png")
    val_mask = dataset.path / "ground_truth" / "scratch" / "100_mask.png"
    shutil.copy(dataset.path / "ground_truth" / "scratch" / "000_mask.png", val_mask)
    assert dataset.val_samples() == [
        Sample(val / "good" / "100.png", 0, "good", None),
        Sample(val / "scratch" / "100.png", 1, "scratch", val_mask),
        Sample(val / "scratch" / "101.png", 1, "scratch", None),
    ]
    # the val image's mask sits in ground_truth/scratch beside the test masks without being an orphan
    assert len(dataset.test_samples()) == N_TEST_GOOD + N_PER_DEFECT * len(DEFECT_TYPES)


def test_a_mask_whose_stem_is_in_both_test_and_val_is_refused(dataset: MVTecCategory) -> None:
    """ground_truth/<type>/<stem>_mask.png is looked up by stem: a val and a test image of the same type and
    name would silently share one mask, so both splits are refused with the mask named."""
    val = dataset.path / "val" / "scratch"
    val.mkdir(parents=True)
    shutil.copy(dataset.path / "test" / "scratch" / "001.png", val / "000.png")
    mask = dataset.path / "ground_truth" / "scratch" / "000_mask.png"
    for read in (dataset.test_samples, dataset.val_samples):
        with pytest.raises(DataError, match="both test/scratch/000 and val/scratch/000") as info:
            read()
        assert str(mask) in str(info.value)


def test_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="dataset root not found") as info:
        MVTecCategory(missing, "washer")
    assert str(missing) in str(info.value)


def test_missing_category_names_path_and_choices(dataset: MVTecCategory, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="category folder not found") as info:
        MVTecCategory(tmp_path, "bottle")
    assert str(tmp_path / "bottle") in str(info.value)
    assert "washer" in str(info.value)


def test_empty_train_good(dataset: MVTecCategory) -> None:
    folder = dataset.path / "train" / "good"
    for image in folder.iterdir():
        image.unlink()
    with pytest.raises(DataError, match="no images in") as info:
        dataset.train_samples()
    assert str(folder) in str(info.value)


def test_missing_train_good(dataset: MVTecCategory) -> None:
    folder = dataset.path / "train" / "good"
    shutil.rmtree(folder)
    with pytest.raises(DataError, match="folder not found") as info:
        dataset.train_samples()
    assert str(folder) in str(info.value)


def test_missing_or_empty_test(dataset: MVTecCategory) -> None:
    test = dataset.path / "test"
    shutil.rmtree(test)
    with pytest.raises(DataError, match="test folder not found") as info:
        dataset.test_samples()
    assert str(test) in str(info.value)
    (test / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="no test images") as info:
        dataset.test_samples()
    assert str(test) in str(info.value)


def test_corrupt_image_names_the_file(dataset: MVTecCategory) -> None:
    sample = dataset.train_samples()[1]
    sample.image_path.write_bytes(b"this is not a png")
    with pytest.raises(DataError, match="cannot decode image") as info:
        dataset.load_image(sample)
    assert str(sample.image_path) in str(info.value)


def test_mask_without_image(dataset: MVTecCategory) -> None:
    image = dataset.path / "test" / "crack" / "001.png"
    image.unlink()
    mask = dataset.path / "ground_truth" / "crack" / "001_mask.png"
    with pytest.raises(DataError, match="mask without its image") as info:
        dataset.test_samples()
    assert f"{mask} (expected {image})" in str(info.value)


def test_mask_file_with_wrong_name(dataset: MVTecCategory) -> None:
    stray = dataset.path / "ground_truth" / "hole" / "000.png"
    shutil.copy(dataset.path / "ground_truth" / "hole" / "000_mask.png", stray)
    with pytest.raises(DataError, match="_mask") as info:
        dataset.test_samples()
    assert str(stray) in str(info.value)


@pytest.mark.parametrize(
    ("dataset_dir", "category", "n_train", "n_test", "n_masks"),
    [("mvtec_ad", "bottle", 209, 83, 63), ("kolektorsdd", "commutator", 234, 149, 50)],
)
def test_real_data(dataset_dir: str, category: str, n_train: int, n_test: int, n_masks: int) -> None:
    root = SHARED_DATA / dataset_dir
    if not (root / category).is_dir():
        pytest.skip(f"real data not present at {root / category}")
    data = MVTecCategory(root, category)
    assert len(data.train_samples()) == n_train
    test = data.test_samples()
    assert len(test) == n_test
    defective = [s for s in test if s.label]
    assert sum(s.mask_path is not None for s in test) == n_masks == len(defective)
    for sample in defective:
        image = data.load_image(sample)
        mask = data.load_mask(sample, image.shape[:2])
        assert mask.shape == image.shape[:2] and mask.any(), sample.mask_path
