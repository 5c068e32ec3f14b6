"""The metric set every family is judged by: checked against scikit-learn, brute force and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from edgeinspect.train.metrics import (
    accuracy,
    aupr,
    balanced_accuracy,
    box_iou,
    confusion,
    f1_at_threshold,
    f1_max,
    f1_optimal_threshold,
    image_auroc,
    pixel_auroc,
    pro,
)


def _labelled(seed: int, n: int = 60, levels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Random 0/1 labels and scores that lean towards the defective ones; ``levels`` quantises (ties)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(int)
    scores = rng.normal(size=n) + labels
    if levels:
        scores = np.round(scores * levels) / levels
    return labels, scores


@pytest.mark.parametrize("seed,levels", [(0, None), (1, None), (2, 3), (3, 1)])
def test_image_metrics_match_scikit_learn(seed: int, levels: int | None) -> None:
    labels, scores = _labelled(seed, levels=levels)
    threshold = float(np.median(scores))
    predicted = scores > threshold
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert aupr(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert f1_at_threshold(labels, scores, threshold) == pytest.approx(f1_score(labels, predicted), abs=1e-12)
    counts = confusion(labels, scores, threshold)
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    assert counts == {"tp": tp, "fn": fn, "fp": fp, "tn": tn}
    assert all(type(v) is int for v in counts.values())  # JSON-ready
    assert accuracy(counts) == pytest.approx(np.mean(predicted == labels), abs=1e-12)
    assert balanced_accuracy(counts) == pytest.approx(balanced_accuracy_score(labels, predicted), abs=1e-12)


@pytest.mark.parametrize("seed,levels", [(0, None), (4, None), (5, 2), (6, 1)])
def test_f1_max_is_the_best_f1_over_every_threshold(seed: int, levels: int | None) -> None:
    labels, scores = _labelled(seed, n=40, levels=levels)
    values = np.unique(scores)
    # every split 'score > t' there is: t below the lowest score, between neighbours, at the highest
    candidates = np.r_[values[0] - 1.0, (values[1:] + values[:-1]) / 2, values[-1]]
    brute = max(f1_score(labels, scores > t, zero_division=0.0) for t in candidates)
    best, threshold = f1_max(labels, scores)
    assert best == pytest.approx(brute, abs=1e-12)
    assert f1_at_threshold(labels, scores, threshold) == pytest.approx(brute, abs=1e-12)  # the threshold reaches it
    assert f1_optimal_threshold(labels, scores) == threshold  # calibration uses the same logic


def test_one_class_gives_nan_where_undefined() -> None:
    labels, scores = np.zeros(5, int), np.arange(5.0)
    assert np.isnan(image_auroc(labels, scores)) and np.isnan(aupr(labels, scores))
    assert all(np.isnan(v) for v in f1_max(labels, scores))
    counts = confusion(labels, scores, 2.0)
    assert counts == {"tp": 0, "fn": 0, "fp": 2, "tn": 3}
    assert accuracy(counts) == 0.6 and np.isnan(balanced_accuracy(counts))
    assert np.isnan(pro(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4))))
    assert np.isnan(pro(np.ones((1, 4, 4), bool), np.zeros((1, 4, 4))))


def test_pro_by_hand() -> None:
    # Two 1 x 5 images; '#' is defect:      A: # # . . .        B: . . . # .
    # scores                                   .9 .4 .7 .2 .1      .3 .6 .4 .8 .05
    # Components: A's two pixels (one region), B's one pixel: R = 2. Normal pixels: N = 7.
    # Curve, one point per distinct score s (threshold just below s), as (FPR, PRO):
    #   start          (0,   0)
    #   .9  A half     (0,   (1/2 + 0) / 2 = .25)
    #   .8  B whole    (0,   (1/2 + 1) / 2 = .75)
    #   .7  normal     (1/7, .75)
    #   .6  normal     (2/7, .75)
    #   .4  A's other half and a normal pixel tie: they enter together -> (3/7, 1)
    # FPR 0.3 lies between 2/7 and 3/7 on the sloped tie segment: PRO(.3) = .75 + .25 * (.3 - 2/7) / (1/7) = .775
    # Area = .75 * 2/7 + (.3 - 2/7) * (.75 + .775) / 2 = 3/14 + (1/70) * (61/80) = 1261/5600; / .3 = 1261/1680
    masks = np.array([[[1, 1, 0, 0, 0]], [[0, 0, 0, 1, 0]]], bool)
    maps = np.array([[[.9, .4, .7, .2, .1]], [[.3, .6, .4, .8, .05]]])
    assert pro(masks, maps) == pytest.approx(1261 / 1680, abs=1e-12)
    assert pro(masks, maps.astype(np.float32)) == pytest.approx(1261 / 1680, abs=1e-7)
    # 8-connectivity: in   # # .  the three defect pixels are one region (4-connectivity would make two:
    #                      . . #  the pair and the diagonal one). Only the diagonal one scores .9, the
    #                      . . .  rest .1 like the 6 normal pixels. Curve: (0, 0), (0, 1/3), then (1, 1):
    # PRO(.3) = 1/3 + (2/3) * .3 = 8/15, area / .3 = (1/3 + 8/15) / 2 = 13/30 (two regions would give .575).
    shape = np.array([[[1, 1, 0], [0, 0, 1], [0, 0, 0]]], bool)
    scores = np.full(shape.shape, 0.1)
    scores[0, 1, 2] = 0.9
    assert pro(shape, scores) == pytest.approx(13 / 30, abs=1e-12)


def _pro_brute(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """AUPRO the slow way: every threshold, every region's overlap counted on its own, np.trapezoid."""
    regions_per_image = []
    for i, mask in enumerate(masks):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions_per_image += [(i, labels == j) for j in range(1, n + 1)]
    values = np.unique(maps)[::-1]
    points = [(0.0, 0.0)]
    for v in values:  # threshold just below v: every pixel scoring >= v is flagged
        flagged = maps >= v
        fpr = flagged[~masks].mean()
        overlap = np.mean([flagged[i][region].mean() for i, region in regions_per_image])
        points.append((fpr, overlap))
    fprs, pros = np.array(points).T
    inside = fprs <= max_fpr
    x, y = list(fprs[inside]), list(pros[inside])
    if x[-1] < max_fpr:
        j = int(np.argmax(~inside))  # first point past max_fpr
        x.append(max_fpr)
        y.append(pros[j - 1] + (pros[j] - pros[j - 1]) * (max_fpr - fprs[j - 1]) / (fprs[j] - fprs[j - 1]))
    return float(np.trapezoid(y, x) / max_fpr)


@pytest.mark.parametrize("seed,levels", [(0, None), (1, 8), (2, 3)])
def test_pro_matches_brute_force(seed: int, levels: int | None) -> None:
    rng = np.random.default_rng(seed)
    masks = rng.random((4, 12, 12)) < 0.25  # scattered: many regions joined only diagonally
    masks[3] = False  # a good image too
    maps = rng.random(masks.shape) + 0.6 * masks
    if levels:  # ties, also between defect and normal pixels
        maps = np.round(maps * levels) / levels
    assert masks.any()
    assert pro(masks, maps) == pytest.approx(_pro_brute(masks, maps), abs=1e-12)
    for max_fpr in (0.05, 1.0):
        assert pro(masks, maps, max_fpr) == pytest.approx(_pro_brute(masks, maps, max_fpr), abs=1e-12)


def test_pro_on_mvtec_sized_maps_matches_brute_force() -> None:
    # 100 maps of 224 x 224, half with a box-shaped defect; scores on 16 levels so that the brute force
    # (one pass per distinct score) stays short.
    rng = np.random.default_rng(0)
    masks = np.zeros((100, 224, 224), bool)
    for i in range(50):
        y, x = rng.integers(10, 180, 2)
        masks[i, y:y + rng.integers(4, 40), x:x + rng.integers(4, 40)] = True
    maps = (np.round((rng.random(masks.shape) + masks) * 8) / 8).astype(np.float32)
    assert pro(masks, maps) == pytest.approx(_pro_brute(masks, maps), abs=1e-9)


def test_pro_is_zero_when_every_defect_pixel_scores_below_the_fpr_range() -> None:
    # Every defect pixel scores below the top 30 % of normal pixels: no threshold within max_fpr flags
    # any of them (this once raised IndexError and lost a finished training run).
    rng = np.random.default_rng(3)
    maps = rng.normal(1.0, 0.1, (3, 16, 16))
    masks = np.zeros(maps.shape, bool)
    masks[1, 4:8, 4:8] = True
    maps[masks] = 0.5
    assert pro(masks, maps) == 0.0
    assert _pro_brute(masks, maps) == 0.0


def test_pixel_auroc_matches_scikit_learn() -> None:
    rng = np.random.default_rng(7)
    masks = rng.random((3, 8, 8)) < 0.2
    maps = rng.random(masks.shape) + masks
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_box_iou_by_hand() -> None:
    masks = np.zeros((3, 20, 20), bool)
    maps = np.zeros((3, 20, 20))
    masks[0, 2:8, 2:8] = True          # GT square 6 x 6 ...
    maps[0, 4:10, 4:10] = 1.0          # ... predicted 6 x 6 shifted by (2, 2): 16 / (36 + 36 - 16) = 2/7
    masks[1, 12:16, 12:16] = True      # a second defective image: its only prediction is 4 pixels,
    maps[1, 12:14, 12:14] = 1.0        # under min_region_area, so that GT box scores 0
    maps[2, 0:5, 0:5] = 1.0            # a good image: its boxes are not judged
    labels = np.array([1, 1, 0])
    assert box_iou(masks, maps, labels, threshold=0.5, min_region_area=5) == pytest.approx((2 / 7 + 0) / 2)
    assert box_iou(masks, maps, labels, threshold=0.5, min_region_area=4) == pytest.approx((2 / 7 + 4 / 16) / 2)
    assert box_iou(masks, maps, labels, threshold=1.0, min_region_area=1) == 0.0  # nothing above threshold
    assert np.isnan(box_iou(masks, maps, np.zeros(3, int), threshold=0.5, min_region_area=1))
