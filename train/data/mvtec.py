"""Reader for the MVTec AD folder layout (also used by MPDD, converted KolektorSDD and users' own data).

Layout of one category::

    <root>/<category>/train/good/*.png                       defect-free training images
    <root>/<category>/test/<defect_type>/*.png               "good" holds the defect-free test images
    <root>/<category>/ground_truth/<defect_type>/<stem>_mask.png
    <root>/<category>/val/<defect_type>/*.png                optional labelled validation split

Validation masks live in ``ground_truth`` under the same defect-type name and may be absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edgeinspect.errors import DataError
from edgeinspect.imageio import IMAGE_SUFFIXES, list_images, read_image, read_mask

GOOD = "good"
MASK_SUFFIX = "_mask"


@dataclass(frozen=True)
class Sample:
    """One image of a category with its label and, for a defective image, its mask file."""

    image_path: Path
    label: int  # 0 good, 1 defective
    defect_type: str  # "good" for good images
    mask_path: Path | None  # None for good images, or defective images without a mask file


def _subfolders(folder: Path) -> list[Path]:
    """Visible sub-folders of a folder, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    """Images directly inside a folder; DataError naming the folder if it is missing or has none."""
    if not folder.is_dir():
        raise DataError(f"folder not found: {folder}")
    images = list_images(folder)
    if not images:
        raise DataError(f"no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return images


class MVTecCategory:
    """One category folder of an MVTec-AD-style dataset, ``<root>/<category>``."""

    def __init__(self, root: str | Path, category: str) -> None:
        """Open ``root/category``; DataError naming the path if either folder is missing."""
        self.root = Path(root)
        self.category = category
        self.path = self.root / category
        if not self.root.is_dir():
            raise DataError(f"dataset root not found: {self.root}")
        if not self.path.is_dir():
            found = ", ".join(p.name for p in _subfolders(self.root)) or "none"
            raise DataError(f"category folder not found: {self.path} (categories in {self.root}: {found})")

    def train_samples(self) -> list[Sample]:
        """The defect-free training images of ``train/good``, sorted by name."""
        return [Sample(p, 0, GOOD, None) for p in _images_in(self.path / "train" / GOOD)]

    def test_samples(self) -> list[Sample]:
        """Every image of ``test/<type>``, sorted by (type, name), with masks matched from ground_truth.

        Raises DataError if ``test`` is missing or holds no image, or if a mask in ``ground_truth``
        has no image of the same stem in ``test/<type>`` (or ``val/<type>``), or one in both.
        """
        split = self.path / "test"
        if not split.is_dir():
            raise DataError(f"test folder not found: {split}")
        samples = self._labelled(split)
        if not samples:
            raise DataError(f"no test images in {split} (expected test/<type>/*.png, 'good' for defect-free)")
        self._check_masks_have_images()
        return samples

    def val_samples(self) -> list[Sample]:
        """The labelled images of ``val/<type>``, sorted by (type, name); [] when there is no ``val``."""
        split = self.path / "val"
        if not split.is_dir():
            return []
        self._check_masks_have_images()
        return self._labelled(split)

    def load_image(self, sample: Sample) -> np.ndarray:
        """The sample's image as HxWx3 uint8 RGB (DataError naming the file if it cannot be read)."""
        return read_image(sample.image_path)

    def load_mask(self, sample: Sample, shape: tuple[int, int]) -> np.ndarray:
        """The sample's defect mask as a bool array of ``shape`` (H, W); all False without a mask file.

        A mask of a different size is resized with nearest-neighbour interpolation.
        """
        height, width = shape
        if sample.mask_path is None:
            return np.zeros((height, width), dtype=bool)
        mask = read_mask(sample.mask_path)
        if mask.shape != (height, width):
            mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
        return mask

    def summary(self) -> dict:
        """Counts of the category: train_good, test_good, test_defect per type and test masks found."""
        test = self.test_samples()
        defects: dict[str, int] = {}
        for sample in test:
            if sample.label:
                defects[sample.defect_type] = defects.get(sample.defect_type, 0) + 1
        return {
            "root": str(self.root),
            "category": self.category,
            "train_good": len(self.train_samples()),
            "test_good": sum(1 for s in test if s.label == 0),
            "test_defect": defects,
            "masks": sum(1 for s in test if s.mask_path is not None),
        }

    def _labelled(self, split: Path) -> list[Sample]:
        """Samples of every ``split/<type>`` folder; a defective image gets its mask file if one exists."""
        samples = []
        for type_dir in _subfolders(split):
            defect_type = type_dir.name
            masks = {} if defect_type == GOOD else self._masks(defect_type)
            for image in list_images(type_dir):
                if defect_type == GOOD:
                    samples.append(Sample(image, 0, GOOD, None))
                else:
                    samples.append(Sample(image, 1, defect_type, masks.get(image.stem)))
        return samples

    def _masks(self, defect_type: str) -> dict[str, Path]:
        """Image stem -> mask file of ``ground_truth/<defect_type>`` (empty if the folder is absent)."""
        folder = self.path / "ground_truth" / defect_type
        if not folder.is_dir():
            return {}
        masks = {}
        for mask in list_images(folder):
            if not mask.stem.endswith(MASK_SUFFIX):
                raise DataError(f"mask file not named <image stem>{MASK_SUFFIX}{mask.suffix}: {mask}")
            masks[mask.stem[: -len(MASK_SUFFIX)]] = mask
        return masks

    def _check_masks_have_images(self) -> None:
        """DataError for the first ground_truth mask whose image is in neither test/<type> nor val/<type>, or in
        both (one mask cannot be the truth of two images)."""
        ground_truth = self.path / "ground_truth"
        if not ground_truth.is_dir():
            return
        for type_dir in _subfolders(ground_truth):
            if type_dir.name == GOOD:
                continue
            test_stems, val_stems = ({p.stem for p in list_images(self.path / split / type_dir.name)}
                                     if (self.path / split / type_dir.name).is_dir() else set()
                                     for split in ("test", "val"))
            for stem, mask in self._masks(type_dir.name).items():
                if stem in test_stems and stem in val_stems:
                    raise DataError(f"mask {mask} would be the truth of both test/{type_dir.name}/{stem} and "
                                    f"val/{type_dir.name}/{stem}: give the two images different names")
                if stem not in test_stems | val_stems:
                    expected = self.path / "test" / type_dir.name / f"{stem}{mask.suffix}"
                    raise DataError(f"mask without its image: {mask} (expected {expected})")
