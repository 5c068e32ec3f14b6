"""Training an anomaly model into a bundle, and rebuilding the PyTorch model from a bundle."""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from edgeinspect import __version__
from edgeinspect.bundle import MANIFEST, Bundle, bundle_target, staging_dir, swap_in
from edgeinspect.config import validate
from edgeinspect.errors import BundleError, ConfigError
from edgeinspect.frames import FrameSpec
from edgeinspect.imageio import read_raw
from edgeinspect.manifest import SCHEMA_VERSION
from edgeinspect.preprocess import Preprocess
from edgeinspect.train.data import MVTecCategory, Sample
from edgeinspect.train.data.batches import Batches
from edgeinspect.train.data.split import DATASET_TEST_SPLIT, DataSplit, relative_paths, samples_at
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
from edgeinspect.train.models import AnomalyModel, get_model_class
from edgeinspect.train.plots import curves_png, roc_png

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available to torch here")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps: Apple MPS is not available to torch here")
    if name not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    return torch.device(name)


def make_preprocess(family: str, config: dict[str, Any]) -> Preprocess:
    """Preprocessing from the config's ``preprocess`` section and the model's normalisation (by default
    its backbone's)."""
    mean, std = get_model_class(family).normalization(config["model"])  # unknown family: fails here, first
    pre = config["preprocess"]
    size = tuple(pre["input_size"])
    resize = tuple(pre["resize"]) if pre.get("resize") else size
    return Preprocess(resize=resize, crop=size if resize != size else None, mean=mean, std=std,
                      interpolation=pre["interpolation"])


def build_model(family: str, model_config: dict[str, Any], input_size: Sequence[int], *,
                pretrained: bool = True) -> AnomalyModel:
    """Instantiate a model of ``family`` from its config section (or a manifest's hyperparameters)."""
    return get_model_class(family)(input_size=tuple(input_size), pretrained=pretrained, **model_config)


@torch.no_grad()
def infer(model: AnomalyModel, dataset: MVTecCategory, samples: Sequence[Sample], preprocess: Preprocess,
          batch_size: int = 4, progress: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """Anomaly maps (N x H x W), image scores (N) and model milliseconds per image."""
    device = next(model.parameters()).device
    maps, scores, seconds = [], [], 0.0
    batches = Batches(dataset, samples, preprocess, batch_size)
    for x in tqdm(batches, desc="inference", disable=not progress, unit="batch"):
        t0 = time.perf_counter()
        amap, score = model(x.to(device))
        amap, score = amap.cpu().numpy()[:, 0], score.cpu().numpy()
        seconds += time.perf_counter() - t0
        maps.append(amap)
        scores.append(score)
    return np.concatenate(maps), np.concatenate(scores), 1000.0 * seconds / max(len(samples), 1)


def calibrate(samples: Sequence[Sample], scores: np.ndarray, labelled: bool, decision_cfg: dict[str, Any]
              ) -> dict[str, Any]:
    """The decision (threshold, normalisation) from the scores of a split's calibration images."""
    labels = np.array([s.label for s in samples])
    return decide(scores[labels == 0], decision_cfg, val_labels=labels if labelled else None,
                  val_scores=scores if labelled else None)


def decide(good_scores: np.ndarray, decision_cfg: dict[str, Any], *, val_labels: np.ndarray | None = None,
           val_scores: np.ndarray | None = None) -> dict[str, Any]:
    """Threshold and score normalisation for the bundle.

    Without labels, from the held-out good scores: ``threshold_rule: mean_sd`` (default) sets
    threshold = (mean + threshold_sd * standard deviation) * margin; ``quantile`` sets
    threshold = quantile(threshold_quantile) * margin (1.0 = their max). The mean and spread of a
    few dozen images are steadier than their maximum, which one unusual good image decides (figures
    in docs/commands.md, ``edgeinspect train``). With a labelled validation split: the F1-optimal threshold on it. The
    normalised score maps the median good score to 0, the threshold to 0.5 and threshold +
    (threshold - median) to 1 (clipped), so 0.5 is the OK/NOK boundary for every model family.
    """
    if val_labels is not None and val_scores is not None and 0 < val_labels.sum() < len(val_labels):
        threshold = f1_optimal_threshold(val_labels, val_scores)
        source = {"source": "labelled validation split", "n_images": int(len(val_labels)),
                  "n_defective": int(val_labels.sum())}
        reference = val_scores[val_labels == 0]
    else:
        # bundles written before threshold_rule existed used the quantile rule
        rule, margin = decision_cfg.get("threshold_rule", "quantile"), decision_cfg["threshold_margin"]
        source = {"source": "held-out good images", "n_images": int(len(good_scores)), "rule": rule,
                  "margin": margin}
        if rule == "mean_sd" and len(good_scores) > 1:
            k = decision_cfg["threshold_sd"]
            threshold = (float(np.mean(good_scores)) + k * float(np.std(good_scores, ddof=1))) * margin
            source["sd"] = k
        else:
            q = decision_cfg["threshold_quantile"]
            threshold = float(np.quantile(good_scores, q)) * margin
            source.update(rule="quantile", quantile=q)
        reference = good_scores
    median = float(np.median(reference))
    return {"threshold": float(threshold),
            "normalization": {"method": "threshold_centered", "center": float(threshold),
                              "scale": max(float(threshold) - median, 1e-6)},
            "calibration": source,
            "min_region_area": int(decision_cfg["min_region_area"])}


def test_masks(dataset: MVTecCategory, samples: Sequence[Sample], preprocess: Preprocess) -> np.ndarray:
    """The ground-truth masks of ``samples`` in model-input geometry (N x H x W bool; all False for good images)."""
    return np.stack([preprocess.mask(dataset.load_mask(s, preprocess.resize)) for s in samples])


def test_metrics(dataset: MVTecCategory, samples: Sequence[Sample], preprocess: Preprocess,
                 maps: np.ndarray, scores: np.ndarray, threshold: float, *, min_region_area: int
                 ) -> dict[str, Any]:
    """Every metric over a test set, the same for every family (see ``train/metrics.py``).

    Image level: AUROC, AUPR, best F1 and its threshold; at ``threshold``: F1, confusion counts,
    accuracy, balanced accuracy. Pixel level: AUROC, AUPRO up to FPR 0.3. Boxes: mean best IoU of
    the ground-truth boxes with the regions of ``map > threshold`` of ``min_region_area`` pixels or more.
    """
    labels = np.array([s.label for s in samples])
    masks = test_masks(dataset, samples, preprocess)
    # a defective image without a mask file has no pixel truth: counted as all normal it would turn the
    # detected defect into false positives, so it stays out of the pixel metrics
    with_truth = np.array([s.label == 0 or s.mask_path is not None for s in samples])
    if not with_truth.all():
        log.warning("%d defective test images have no mask file: left out of pixel AUROC and PRO",
                    int((~with_truth).sum()))
    best_f1, best_threshold = f1_max(labels, scores)
    counts = confusion(labels, scores, threshold)
    return {"image_auroc": image_auroc(labels, scores), "aupr": aupr(labels, scores),
            "f1_max": best_f1, "f1_max_threshold": best_threshold,
            "f1": f1_at_threshold(labels, scores, threshold), "confusion": counts,
            "accuracy": accuracy(counts), "balanced_accuracy": balanced_accuracy(counts),
            "pixel_auroc": pixel_auroc(masks[with_truth], maps[with_truth]),
            "pro": pro(masks[with_truth], maps[with_truth]),
            "box_iou": box_iou(masks, maps, labels, threshold, min_region_area),
            "n_images": int(len(samples)), "n_defective": int(labels.sum())}


def content_digest(stats: dict[str, np.ndarray], state: dict[str, torch.Tensor]) -> str:
    """sha256 of what a model computes with, its statistics and its weights (trained ones included): the
    bundle id's hash."""
    arrays = [*stats.values(), *(v.detach().cpu().numpy() for v in state.values())]
    return hashlib.sha256(b"".join(np.ascontiguousarray(v).tobytes() for v in arrays)).hexdigest()


def _npz_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: v.detach().cpu().numpy() for k, v in state.items()})
    return buf.getvalue()


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that would lose something: an existing bundle (unless ``overwrite``), other files."""
    if out.exists() and not out.is_dir():
        raise BundleError(f"--out {out} is a file, not a bundle folder; choose a folder path")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / MANIFEST).is_file():
        raise BundleError(f"--out {out} exists and is not a bundle (it has no {MANIFEST}); choose a new or "
                          f"empty folder (--overwrite replaces bundles only)")
    if not overwrite:
        raise BundleError(f"--out {out} is already a bundle; pass --overwrite to replace it (atomically: the old "
                          f"one stays until the new one is complete), or choose another --out")


def training_image_spec(samples: Sequence[Sample], count: int = 16) -> FrameSpec:
    """Size, channels and bit depth of up to ``count`` training images spread over ``samples``, as stored."""
    picks = samples[::max(1, len(samples) // count)][:count]
    return FrameSpec.of(read_raw(s.image_path) for s in picks)


def train(family: str, data_root: str | Path, category: str, out: str | Path, config: dict[str, Any], *,
          device: str = "auto", progress: bool = True, overwrite: bool = False) -> Bundle:
    """Fit a model on ``<data_root>/<category>/train/good``, calibrate, evaluate and write a bundle.

    The bundle is built in a temporary sibling of ``out`` and renamed into place only when complete;
    an existing bundle at ``out`` is refused unless ``overwrite``, then replaced atomically.
    """
    out = bundle_target(out)
    check_out(out, overwrite)
    config = validate(family, config)
    dev = resolve_device(device)
    dataset = MVTecCategory(data_root, category)
    # the family says which images it fits, calibrates and is tested on; a missing or empty split fails
    # here, not after the fit
    split = get_model_class(family).data_split(dataset, config)
    staged = staging_dir(out)
    try:
        bundle = _train_into(staged, family, data_root, dataset, split, config, dev, progress)
        swap_in(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return Bundle(out, bundle.manifest)


def _train_into(out: Path, family: str, data_root: str | Path, dataset: MVTecCategory,
                split: DataSplit, config: dict[str, Any], dev: torch.device, progress: bool) -> Bundle:
    torch.manual_seed(config["model"].get("seed", 0))
    preprocess = make_preprocess(family, config)
    tcfg = config["train"]
    fit_samples, calib, labelled = split.fit, split.calibration, split.labelled
    log.info("fitting %s on %d images (%d %s images for the threshold)", family, len(fit_samples),
             len(calib), "labelled" if labelled else "held-out good")

    model = build_model(family, config["model"], preprocess.input_size).to(dev)
    seed = config["model"].get("seed", 0)
    t0 = time.perf_counter()
    model.fit(Batches(dataset, fit_samples, preprocess, tcfg["batch_size"], seed=seed), progress=progress,
              holdout=Batches(dataset, calib, preprocess, tcfg["batch_size"], seed=seed))
    fit_seconds = time.perf_counter() - t0
    model.eval()

    _, calib_scores, _ = infer(model, dataset, calib, preprocess, progress=progress)
    decision = calibrate(calib, calib_scores, labelled, config["decision"])

    test = split.test
    maps, scores, ms = infer(model, dataset, test, preprocess, progress=progress)
    metrics = {**test_metrics(dataset, test, preprocess, maps, scores, decision["threshold"],
                              min_region_area=decision["min_region_area"]),
               "split": split.test_name, "engine": "torch", "device": str(dev), "ms_per_image": ms,
               "fit_seconds": fit_seconds}

    stats = model.statistics()
    state = model.state_dict()
    bundle = Bundle(out, {
        "schema_version": SCHEMA_VERSION,
        "bundle_id": f"{family}-{model.tag()}-{content_digest(stats, state)[:12]}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "edgeinspect_version": __version__,
        "model": {"family": family, **model.hyperparameters(), "weights_source": model.weights_source()},
        "preprocess": preprocess.to_dict(),
        "input_images": training_image_spec(fit_samples).to_dict(),
        "input": {"name": "image", "shape": [1, 3, *preprocess.input_size], "dtype": "float32"},
        "outputs": {"anomaly_map": [1, 1, *preprocess.input_size], "score": [1]},
        "decision": decision,
        "files": {},
        "engines": [],
        "data": {**dataset.summary(), "root": str(Path(data_root).resolve()), "fit_images": len(fit_samples),
                 "calibration_images": len(calib),
                 # a split of the family's own (not train/ vs test/) is recorded: see bundle_split
                 **({"split": {"description": split.description, "fit": relative_paths(dataset, fit_samples),
                               "calibration": relative_paths(dataset, calib), "labelled": labelled,
                               "test": relative_paths(dataset, test)}} if split.description else {})},
        "metrics": metrics,
        "config": config,
        **({"training": {"history": model.history}} if model.history else {}),
    })
    bundle.add_file("weights", "weights.npz", _npz_bytes(state))
    for key, array in stats.items():
        bundle.add_array(key, array)
    labels = np.array([s.label for s in test])
    if 0 < labels.sum() < len(labels):
        bundle.add_report("roc", "reports/roc.png", roc_png(labels, scores, f"{family} on {dataset.category} (test)"))
    if model.history:
        bundle.add_report("training_curves", "reports/training_curves.png",
                          curves_png(model.history, f"{family} training"))
    bundle.save()
    return bundle


def bundle_test_samples(bundle: Bundle, dataset: MVTecCategory) -> tuple[list[Sample], str]:
    """The test images of ``bundle`` on ``dataset`` and what they are: the hold-out recorded in its manifest
    by a family that splits the data itself (no image of it was fit on), else the dataset's test/."""
    recorded = (bundle.manifest.get("data") or {}).get("split")
    if recorded:
        return samples_at(dataset, recorded["test"]), recorded["description"]
    return dataset.test_samples(), DATASET_TEST_SPLIT


def bundle_split(bundle: Bundle, dataset: MVTecCategory) -> DataSplit:
    """Training's fit, calibration and test images of ``bundle`` on ``dataset``: the split recorded in its
    manifest, else the family's split of ``dataset`` under the bundle's config (deterministic)."""
    recorded = (bundle.manifest.get("data") or {}).get("split")
    if recorded:
        test, description = bundle_test_samples(bundle, dataset)
        return DataSplit(samples_at(dataset, recorded["fit"]), samples_at(dataset, recorded["calibration"]),
                         bool(recorded["labelled"]), test, description)
    return get_model_class(bundle.family).data_split(dataset, bundle.manifest["config"])


def load_model(bundle: Bundle, device: str = "cpu") -> AnomalyModel:
    """Rebuild the PyTorch model of a bundle from its weights and statistics (no hub access)."""
    spec = dict(bundle.manifest["model"])
    family = spec.pop("family")
    spec.pop("weights_source", None)
    if "weights" in spec:  # the file trained from (a detector's manifest names it): weights.npz holds every tensor
        spec["weights"] = None
    input_size = spec.pop("input_size")
    model = build_model(family, spec, input_size, pretrained=False)
    with np.load(bundle.file("weights"), allow_pickle=False) as npz:
        model.load_state_dict({k: torch.from_numpy(npz[k]) for k in npz.files}, strict=True)
    model.load_statistics({k: bundle.load_array(k) for k, entry in bundle.manifest["files"].items()
                           if entry["file"].startswith("stats/")})
    return model.to(resolve_device(device)).eval()
