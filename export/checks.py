"""What an engine is checked on, per task: the images, the PyTorch reference, the comparison.

One class per ``manifest.get("task", "anomaly_map")`` (:data:`TASK_CHECKS`); :class:`ExportJob`
goes through it for its check images, INT8 calibration images and parity, so the export flow is
the same for anomaly models and detectors.
"""

from __future__ import annotations

import time
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from edgeinspect.bundle import Bundle
from edgeinspect.errors import BundleError, ConfigError
from edgeinspect.export.parity import DetectionGate, DetectionParity, Gate, Parity, compare, compare_detections
from edgeinspect.imageio import read_image
from edgeinspect.runtime.backends import backend_class
from edgeinspect.runtime.detections import Detections
from edgeinspect.runtime.postprocess import DetectionPostprocess
from edgeinspect.train.data import MVTecCategory
from edgeinspect.train.data.batches import Batches
from edgeinspect.train.data.coco import CocoSplit
from edgeinspect.train.data.split import DataSplit
from edgeinspect.train.detection import coco_eval, to_image
from edgeinspect.train.evaluate import infer_engine
from edgeinspect.train.trainer import bundle_split, calibrate, infer

if TYPE_CHECKING:
    from edgeinspect.export.exporter import ExportJob


class AnomalyMapCheck:
    """Anomaly models: the bundle's test split, PyTorch maps and scores; engines whose scores may shift (INT8,
    approximate search) get a threshold of their own from training's threshold images (:meth:`engine_decision`)."""

    def __init__(self, job: ExportJob):
        self.job = job

    @staticmethod
    def open_data(bundle: Bundle, data_root: str | Path | None, category: str | None) -> MVTecCategory:
        """The dataset of the check images: the one recorded in the bundle unless given."""
        data = bundle.manifest.get("data") or {}
        root = Path(data_root or data.get("root", ""))
        if not root.is_dir() or not (category or data.get("category")):
            raise BundleError(f"the bundle's dataset {root} is not here; give --data ROOT [--category CAT] for "
                              f"the images the engine is checked and calibrated on")
        return MVTecCategory(root, category or data["category"])

    @cached_property
    def split(self) -> DataSplit:
        """Training's fit, threshold and test images (:func:`trainer.bundle_split`)."""
        return bundle_split(self.job.bundle, self.job.dataset)

    def calibration_inputs(self, count: int) -> list[np.ndarray]:
        """``count`` preprocessed fit images, spread evenly over the fit split (INT8 calibration)."""
        return [self.job.bundle.preprocess(self.job.dataset.load_image(s)) for s in spread(self.split.fit, count)]

    def fit_batches(self, batch_size: int) -> Batches:
        """Training's fit images in batches (statistics refit on an engine's features)."""
        return Batches(self.job.dataset, self.split.fit, self.job.bundle.preprocess, batch_size)

    @cached_property
    def reference(self) -> tuple[np.ndarray, np.ndarray, float]:
        """PyTorch maps, scores and ms per image on the test images."""
        return infer(self.job.model, self.job.dataset, self.split.test, self.job.bundle.preprocess, batch_size=1,
                     progress=self.job.progress)

    @cached_property
    def reference_calibration_scores(self) -> np.ndarray:
        """PyTorch scores of training's threshold images."""
        return infer(self.job.model, self.job.dataset, self.split.calibration, self.job.bundle.preprocess,
                     batch_size=1, progress=self.job.progress)[1]

    def engine_decision(self, calib_scores: np.ndarray) -> dict[str, Any]:
        """The decision of an engine whose scores may shift (INT8, approximate search), from its scores on
        training's threshold images: ``engine_threshold.rule: scaled`` (default) carries the bundle's decision over,
        threshold and normalisation times the median ratio of the engine's to PyTorch's score on the good ones
        (a threshold set by hand moves with it), for models whose scores are distances
        (``AnomalyModel.score_is_distance``); ``recalibrated``, and every other model, applies training's
        threshold rule to the engine's scores (that rule's mean and spread of a few dozen images move with single
        images)."""
        if self.job.settings["engine_threshold"]["rule"] == "recalibrated" or not self.job.model.score_is_distance:
            return calibrate(self.split.calibration, calib_scores, self.split.labelled,
                             self.job.bundle.manifest["config"]["decision"])
        good = (np.array([s.label for s in self.split.calibration]) == 0) & (self.reference_calibration_scores > 0)
        ratio = float(np.median(calib_scores[good] / self.reference_calibration_scores[good])) if good.any() else 1.0
        decision = self.job.bundle.decision
        normalization = decision["normalization"]
        return {**decision, "threshold": decision["threshold"] * ratio,
                "normalization": {**normalization, "center": normalization["center"] * ratio,
                                  "scale": normalization["scale"] * ratio},
                "calibration": {**decision.get("calibration", {}), "carried_over": {
                    "score_ratio": ratio, "n_images": int(good.sum()),
                    "rule": "bundle threshold x median engine / PyTorch score on the held-out good images"}}}

    @property
    def reference_ms(self) -> float:
        """PyTorch ms per image on the check images."""
        return self.reference[2]

    def run_engine(self, fmt: str, path: Path, samples: list) -> tuple[np.ndarray, np.ndarray, float]:
        """Maps, scores and ms per image of an engine file on ``samples``, through its runtime backend."""
        backend = backend_class(fmt)(path, output_names=self.job.output_names)
        return infer_engine(backend, self.job.dataset, samples, self.job.bundle.preprocess, self.job.progress)

    def check(self, fmt: str, precision: str, path: Path) -> tuple[Parity, dict[str, Any] | None, float]:
        """Run the engine on the test images and apply its gate: the format's own (``<format>.gate`` in the
        export config) where it has one, else that of ``precision``. A gate without a score tolerance
        (INT8, approximate search) lets scores shift, so the engine gets its own threshold, calibrated like
        training's."""
        gate = Gate.from_config((self.job.settings.get(fmt) or {}).get("gate") or self.job.settings[precision])
        decision = None
        if gate.tolerance is None:
            _, calib_scores, _ = self.run_engine(fmt, path, self.split.calibration)
            decision = self.engine_decision(calib_scores)
        maps, scores, ms = self.run_engine(fmt, path, self.split.test)
        labels = np.array([s.label for s in self.split.test])
        ref_maps, ref_scores, _ = self.reference
        parity = compare((ref_maps, ref_scores), (maps, scores), labels, self.job.bundle.decision["threshold"],
                         (decision or self.job.bundle.decision)["threshold"], gate)
        return parity, decision, ms


class DetectionsCheck:
    """Detectors: the images of the bundle's COCO ``val`` split, ``model.detect`` (torchvision's own
    post-processing) against the engine's outputs through the runtime decoder; detections matched by
    IoU and class, confidences and verdicts compared under the ``detections`` gate of the precision.
    INT8 calibration images come from the ``train`` split; the threshold (a confidence) is kept."""

    check_split, calibration_split = "val", "train"

    def __init__(self, job: ExportJob):
        self.job = job

    @staticmethod
    def open_data(bundle: Bundle, data_root: str | Path | None, category: str | None) -> Path:
        """The COCO folder of the check images: the one recorded in the bundle unless given."""
        if category:
            raise ConfigError(f"--category {category}: a detector bundle is checked on its COCO folder's "
                              f"{DetectionsCheck.check_split} split; give --data COCO_DIR alone")
        root = Path(data_root or (bundle.manifest.get("data") or {}).get("root", ""))
        if not (root / DetectionsCheck.check_split / "annotations.json").is_file():
            raise BundleError(f"the bundle's COCO folder {root} is not here (no {DetectionsCheck.check_split}/"
                              f"annotations.json); give --data COCO_DIR for the images the engine is checked and "
                              f"calibrated on")
        return root

    @cached_property
    def postprocess(self) -> DetectionPostprocess:
        """The runtime's decoder and verdict, with the bundle's decision."""
        return DetectionPostprocess(self.job.bundle, self.job.bundle.decision)

    @cached_property
    def split(self) -> CocoSplit:
        """The check split (its ground truth serves the gates that bound the mAP drop)."""
        return CocoSplit(self.job.dataset, self.check_split)

    @cached_property
    def images(self) -> list[Path]:
        """The check images."""
        return split_paths(self.split)

    def map50(self, detections: list[Detections]) -> float:
        """bbox mAP@0.5 (pycocotools) of detections in input pixels, one per check image, against the
        split's ground truth (image sizes from its annotations)."""
        preprocess, images = self.job.bundle.preprocess, self.split.coco.imgs
        predictions = [{"image_id": i, **to_image(d.to_dict(), preprocess, (images[i]["height"], images[i]["width"]))}
                       for i, d in zip(self.split.image_ids, detections, strict=True)]
        return coco_eval(self.split.coco, predictions, "bbox")["map50"]

    @cached_property
    def reference_map50(self) -> float:
        """:meth:`map50` of the PyTorch detections (once for every engine and INT8 attempt)."""
        return self.map50(self.reference[0])

    def inputs(self, paths: list[Path]) -> list[np.ndarray]:
        """Preprocessed 1 x 3 x H x W inputs of image files."""
        return [self.job.bundle.preprocess(read_image(p)) for p in paths]

    def calibration_inputs(self, count: int) -> list[np.ndarray]:
        """``count`` preprocessed training images, spread evenly over the train split (INT8 calibration)."""
        return self.inputs(spread(split_paths(CocoSplit(self.job.dataset, self.calibration_split)), count))

    @cached_property
    def reference(self) -> tuple[list[Detections], float]:
        """PyTorch detections (``model.detect``) and ms per image on the check images."""
        detections, seconds = [], 0.0
        model = self.job.model
        for x in tqdm(self.inputs(self.images), desc="inference torch", disable=not self.job.progress, unit="img"):
            t0 = time.perf_counter()
            with torch.no_grad():
                [out] = model.detect(torch.from_numpy(x))
            seconds += time.perf_counter() - t0
            detections.append(Detections.from_arrays(*(None if out.get(k) is None else out[k].cpu().numpy()
                                                       for k in ("boxes", "labels", "scores", "masks"))))
        return detections, 1000.0 * seconds / max(len(detections), 1)

    @property
    def reference_ms(self) -> float:
        """PyTorch ms per image on the check images."""
        return self.reference[1]

    def run_engine(self, fmt: str, path: Path) -> tuple[list[Detections], float]:
        """Detections (through the runtime decoder) and engine ms per image of an engine file."""
        backend = backend_class(fmt)(path, output_names=self.job.output_names)
        detections, seconds = [], 0.0
        for x in tqdm(self.inputs(self.images), desc="inference engine", disable=not self.job.progress, unit="img"):
            t0 = time.perf_counter()
            outputs = backend.run(x)
            seconds += time.perf_counter() - t0
            detections.append(self.postprocess.decode(dict(zip(self.job.output_names, outputs, strict=True))))
        return detections, 1000.0 * seconds / max(len(detections), 1)

    def check(self, fmt: str, precision: str, path: Path) -> tuple[DetectionParity, None, float]:
        """Run the engine on the check images and apply the ``detections`` gate of ``precision``."""
        reference, _ = self.reference
        detections, ms = self.run_engine(fmt, path)
        input_hw = self.job.bundle.preprocess.input_size
        ref_outcomes = [self.postprocess.judge(d, input_hw) for d in reference]
        outcomes = [self.postprocess.judge(d, input_hw) for d in detections]
        gate = DetectionGate.from_config(self.job.settings["detections"][precision])
        map50 = None if gate.max_map50_drop is None else (self.reference_map50, self.map50(detections))
        parity = compare_detections(reference, detections, np.array([o.nok for o in ref_outcomes]),
                                    np.array([o.nok for o in outcomes]),
                                    np.array([o.raw_score for o in ref_outcomes]), self.postprocess.threshold,
                                    gate, map50)
        return parity, None, ms


TASK_CHECKS: dict[str, type] = {"anomaly_map": AnomalyMapCheck, "detections": DetectionsCheck}


def spread(items: list, count: int) -> list:
    """``count`` items (at most all of them) spread evenly over ``items``."""
    n = min(count, len(items))
    return [items[int(i * len(items) / n)] for i in range(n)]


def split_paths(split: CocoSplit) -> list[Path]:
    """The image files of a COCO split, in its image id order."""
    return [split.path_of(i) for i in range(len(split))]
