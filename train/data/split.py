"""Which images of a category a model is fit on, calibrated on and tested on.

One-class families (the default) fit on ``train/good`` and are tested on ``test/``; a supervised
family splits every image of the category itself (:func:`stratified_split`) and the bundle records
that split as relative paths (:func:`relative_paths` / :func:`samples_at`), so evaluation and
export use exactly the images training held out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeinspect.errors import DataError
from edgeinspect.train.data.mvtec import MVTecCategory, Sample

# what the test images are when a family uses the dataset's own splits
DATASET_TEST_SPLIT = "test/ (the dataset's own test split)"


@dataclass(frozen=True)
class DataSplit:
    """Images to fit on, to set the threshold on (``labelled``: good and defective, else good only) and to
    test on. ``description`` is None for the dataset's own splits, else what the split is (the bundle
    then records its images)."""

    fit: list[Sample]
    calibration: list[Sample]
    labelled: bool
    test: list[Sample]
    description: str | None = None

    @property
    def test_name(self) -> str:
        """What the test images are, for metrics tables."""
        return self.description or DATASET_TEST_SPLIT


def split_holdout(samples: Sequence[Sample], fraction: float, minimum: int) -> tuple[list[Sample], list[Sample]]:
    """Every k-th good image goes to the calibration hold-out (deterministic, spread over the set)."""
    n_hold = max(minimum, int(round(fraction * len(samples))))
    if len(samples) - n_hold < 2:
        raise DataError(f"too few good training images ({len(samples)}) to hold out {n_hold} for calibration; "
                        f"add images or lower train.min_holdout / train.holdout_fraction")
    step = len(samples) / n_hold
    hold_idx = {int(i * step) for i in range(n_hold)}
    fit = [s for i, s in enumerate(samples) if i not in hold_idx]
    hold = [s for i, s in enumerate(samples) if i in hold_idx]
    return fit, hold


def split_for_calibration(dataset: MVTecCategory, train_cfg: dict[str, Any]
                          ) -> tuple[list[Sample], list[Sample], bool]:
    """(images to fit, images to set the threshold on, whether the latter are a labelled val split).

    Deterministic, so an export can recalibrate an engine on exactly the images training used.
    """
    val = dataset.val_samples()
    if val:
        return dataset.train_samples(), val, True
    fit, holdout = split_holdout(dataset.train_samples(), train_cfg["holdout_fraction"], train_cfg["min_holdout"])
    return fit, holdout, False


def one_class_split(dataset: MVTecCategory, train_cfg: dict[str, Any]) -> DataSplit:
    """The one-class split: fit on train/good (less the calibration hold-out), test on test/."""
    fit, calibration, labelled = split_for_calibration(dataset, train_cfg)
    return DataSplit(fit, calibration, labelled, dataset.test_samples())


def all_samples(dataset: MVTecCategory) -> list[Sample]:
    """Every image of the category: train/good, val/* (when present) and test/*."""
    return [*dataset.train_samples(), *dataset.val_samples(), *dataset.test_samples()]


def stratified_split(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(rest, part): ``fraction`` of each defect type (``good`` included) drawn at random with ``seed``.

    Each type gives ``round(fraction * n)`` images, at least one when it has two or more and never all of
    them, so every type is on both sides whenever it can be. Both lists keep the input order.
    """
    by_type: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_type.setdefault(s.defect_type, []).append(i)
    rng = np.random.default_rng(seed)
    picked: set[int] = set()
    for defect_type in sorted(by_type):
        idx = by_type[defect_type]
        n = len(idx)
        k = min(max(int(round(fraction * n)), 1 if n >= 2 else 0), n - 1)
        picked.update(idx[j] for j in rng.permutation(n)[:k])
    return ([s for i, s in enumerate(samples) if i not in picked],
            [s for i, s in enumerate(samples) if i in picked])


def relative_paths(dataset: MVTecCategory, samples: Sequence[Sample]) -> list[str]:
    """Image paths relative to the category folder (POSIX), as the bundle records a split."""
    return [s.image_path.relative_to(dataset.path).as_posix() for s in samples]


def samples_at(dataset: MVTecCategory, paths: Sequence[str]) -> list[Sample]:
    """The samples of ``dataset`` at recorded relative paths; DataError naming the first one missing."""
    known = {s.image_path.relative_to(dataset.path).as_posix(): s for s in all_samples(dataset)}
    missing = [p for p in paths if p not in known]
    if missing:
        raise DataError(f"{len(missing)} image(s) of the bundle's recorded split are not in {dataset.path}, "
                        f"e.g. {missing[0]}; use the dataset the bundle was trained on")
    return [known[p] for p in paths]
