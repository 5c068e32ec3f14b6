"""Training a defect detector (SSD, Mask R-CNN) on a COCO folder into a bundle, and evaluating it.

Training: AdamW (or SGD with Nesterov momentum), the learning rate warmed up linearly over
``train.warmup_epochs`` then decayed by a cosine to ``lr * min_lr_ratio``, both per step; optional flips of
the training images with their boxes (and masks); optionally an exponential moving average of the weights
(``train.ema_epochs``, :class:`WeightAverage`), which is then what is validated, checkpointed as best and
bundled. After every epoch the validation loss (the training loss on the ``val`` images: no flips, no
gradient) and, every ``map_every`` epochs, the val COCO mAP@0.5. The checkpoint the bundle keeps is chosen
by ``train.best_by`` (:func:`selection_score`): the highest val mAP@0.5 (default), the lowest validation
loss, or the last epoch.

Checkpoints go to ``<out>.work/checkpoints/`` while training (kept when training fails or is stopped;
``resume=True`` continues from its ``last.pt``, or from the finished bundle's to extend it); the finished
bundle (the best weights) is built beside ``out`` and swapped in atomically, with the checkpoints,
``config.json`` and ``history.json``.

Evaluation (:func:`detection_metrics`): pycocotools COCOeval (bbox, and segm when the predictions have
masks) plus image-level metrics, see its docstring.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from edgeinspect import __version__
from edgeinspect.bench import default_split, has_split
from edgeinspect.bundle import Bundle, atomic_write_bytes, bundle_target, staging_dir, swap_in
from edgeinspect.config import validate
from edgeinspect.errors import BundleError, ConfigError, DataError
from edgeinspect.frames import FrameSpec
from edgeinspect.imageio import read_raw
from edgeinspect.jsonready import json_ready
from edgeinspect.manifest import SCHEMA_VERSION
from edgeinspect.preprocess import Preprocess
from edgeinspect.train.data.coco import CocoSplit
from edgeinspect.train.metrics import accuracy
from edgeinspect.train.models import DetectorModel
from edgeinspect.train.plots import curves_png
from edgeinspect.train.trainer import (
    _npz_bytes,
    build_model,
    check_out,
    content_digest,
    load_model,
    make_preprocess,
    resolve_device,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- data
def open_split(root: str | Path, split: str) -> Any:
    """One split (train, val, test) of a COCO folder."""
    return CocoSplit(root, split)


def to_input(target: dict[str, Any], image_hw: tuple[int, int], preprocess: Preprocess) -> dict[str, torch.Tensor]:
    """A target in image pixels -> torch tensors in model-input pixels (scaled, cropped, clipped; boxes that
    leave the input are dropped)."""
    top, left = preprocess.crop_offset()
    ih, iw = preprocess.input_size
    sy, sx = preprocess.resize[0] / image_hw[0], preprocess.resize[1] / image_hw[1]
    boxes = np.asarray(target["boxes"], np.float32).reshape(-1, 4) * np.array([sx, sy, sx, sy], np.float32)
    boxes -= np.array([left, top, left, top], np.float32)
    boxes = np.clip(boxes, 0, np.array([iw, ih, iw, ih], np.float32))
    keep = (boxes[:, 2] - boxes[:, 0] >= 1.0) & (boxes[:, 3] - boxes[:, 1] >= 1.0)
    out = {"boxes": torch.from_numpy(boxes[keep]), "labels": torch.from_numpy(np.asarray(target["labels"])[keep])}
    masks = target.get("masks")
    if masks is not None:
        resized = [preprocess.mask(m) for m in np.asarray(masks)[keep]]
        out["masks"] = torch.from_numpy(np.stack(resized).astype(np.uint8) if resized
                                        else np.zeros((0, ih, iw), np.uint8))
    return out


def _flip(x: torch.Tensor, target: dict[str, torch.Tensor], horizontal: bool) -> tuple[torch.Tensor, dict]:
    """Flip one image 3 x H x W and its target (boxes, masks) horizontally or vertically."""
    h, w = x.shape[-2:]
    boxes = target["boxes"].clone()
    if horizontal:
        boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
    else:
        boxes[:, [1, 3]] = h - target["boxes"][:, [3, 1]]
    dim = -1 if horizontal else -2
    out = {**target, "boxes": boxes}
    if "masks" in target:
        out["masks"] = torch.flip(target["masks"], [dim])
    return torch.flip(x, [dim]), out


def _iou_crop(x: torch.Tensor, target: dict[str, torch.Tensor], generator: torch.Generator
              ) -> tuple[torch.Tensor, dict]:
    """SSD's "random IoU crop" (torchvision's ``RandomIoUCrop``: a window of 0.3-1 of each side, aspect
    0.5-2, overlapping some box by a random minimum IoU, or no crop) of one image 3 x H x W with its target,
    scaled back to H x W; boxes whose centre falls outside go, with their labels and masks."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    if not len(target["boxes"]):
        return x, target
    h, w = x.shape[-2:]
    sample = {"image": tv_tensors.Image(x), "labels": target["labels"],
              "boxes": tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(h, w))}
    if "masks" in target:
        sample["masks"] = tv_tensors.Mask(target["masks"])
    transform = v2.Compose([v2.RandomIoUCrop(), v2.Resize((h, w), antialias=True), v2.ClampBoundingBoxes(),
                            v2.SanitizeBoundingBoxes()])
    with torch.random.fork_rng():  # torchvision draws from the global generator: seed it from ours
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        out = transform(sample)
    cropped = {**target, "boxes": out["boxes"].as_subclass(torch.Tensor), "labels": out["labels"]}
    if "masks" in target:
        cropped["masks"] = out["masks"].as_subclass(torch.Tensor)
    return out["image"].as_subclass(torch.Tensor), cropped


class DetectionBatches:
    """Batches (normalised images N x 3 x H x W, targets in input pixels) of a COCO split."""

    def __init__(self, split: Any, preprocess: Preprocess, batch_size: int, *, shuffle: bool = False,
                 hflip: float = 0.0, vflip: float = 0.0, crop: float = 0.0, seed: int = 0):
        self.split, self.preprocess, self.batch_size = split, preprocess, batch_size
        self.shuffle, self.hflip, self.vflip, self.crop, self.seed = shuffle, hflip, vflip, crop, seed
        self._epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def epoch(self, i: int) -> DetectionBatches:
        """The batches of epoch ``i`` (its own order and flips, from the seed)."""
        self._epoch = i
        return self

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[dict[str, torch.Tensor]], list[tuple[int, bool, bool]]]]:
        """(images, targets, keys): each image's key is (index in the split, flipped horizontally, vertically);
        with ``crop`` the images may also be cropped (their keys then no longer name what they hold)."""
        rng = np.random.default_rng([self.seed, self._epoch])
        # the crops' own stream: the order and flips stay those of runs without crops
        crop_seed = np.random.SeedSequence([self.seed, self._epoch, 1]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(crop_seed))
        order = rng.permutation(len(self.split)) if self.shuffle else np.arange(len(self.split))
        for start in range(0, len(order), self.batch_size):
            images, targets, keys = [], [], []
            for i in order[start:start + self.batch_size]:
                rgb, target = self.split.load(int(i))
                images.append(rgb)
                targets.append(to_input(target, rgb.shape[:2], self.preprocess))
                keys.append((int(i), bool(self.hflip and rng.random() < self.hflip),
                             bool(self.vflip and rng.random() < self.vflip)))
            x = torch.from_numpy(self.preprocess.batch(images))
            xs = []
            for k, (_, h, v) in enumerate(keys):
                xi, ti = x[k], targets[k]
                if h:
                    xi, ti = _flip(xi, ti, horizontal=True)
                if v:
                    xi, ti = _flip(xi, ti, horizontal=False)
                if self.crop and float(torch.rand((), generator=generator)) < self.crop:
                    xi, ti = _iou_crop(xi, ti, generator)
                xs.append(xi)
                targets[k] = ti
            yield torch.stack(xs), targets, keys


class FeatureCache:
    """Each image's (and flip's) :meth:`DetectorModel.frozen_features`, computed on first use and kept in
    float16: with a frozen backbone, later epochs only run the trained layers."""

    def __init__(self) -> None:
        self._store: dict[tuple[int, bool, bool], list[torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._store)

    @torch.no_grad()
    def features(self, model: DetectorModel, x: torch.Tensor, keys: Sequence[tuple[int, bool, bool]]
                 ) -> list[torch.Tensor]:
        """The batch's frozen features (float32), computing only the images not seen before."""
        missing = [k for k, key in enumerate(keys) if key not in self._store]
        if missing:
            computed = model.frozen_features(x[missing])
            for j, k in enumerate(missing):
                self._store[keys[k]] = [f[j].to(torch.float16) for f in computed]
        return [torch.stack([self._store[key][level] for key in keys]).to(x.device, torch.float32)
                for level in range(len(self._store[keys[0]]))]


# --------------------------------------------------------------------------------------- training
def selection_score(entry: dict[str, float], epoch: int, best_by: str) -> float | None:
    """How an epoch ranks for ``train.best_by`` (lower is better; None: not measured this epoch):
    ``val_map50`` the val mAP@0.5, highest first (the figure the goals are in, measured every ``map_every``
    epochs; on NEU-DET the validation loss of the FPN SSD was lowest at epoch 14 of 48 while its mAP rose to
    the end); ``val_loss`` the validation loss; ``last`` the latest epoch."""
    if best_by == "val_map50":
        return -entry["val_map50"] if "val_map50" in entry else None
    return entry["val_loss"] if best_by == "val_loss" else -float(epoch)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Learning-rate multiplier at ``step``: linear warmup over ``warmup`` steps, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class WeightAverage:
    """Exponential moving average of a model's weights, updated after every optimizer step.

    The decay makes the average span about ``span_steps`` steps (``1 - 1 / span_steps``); early in training
    it is capped by ``(1 + n) / (10 + n)`` after ``n`` updates, so the first steps' weights fade quickly.
    Integer buffers are copied, not averaged."""

    def __init__(self, model: torch.nn.Module, span_steps: float) -> None:
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.decay = 1.0 - 1.0 / max(span_steps, 1.0)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average towards ``model``'s current weights."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for mine, theirs in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if mine.dtype.is_floating_point:
                mine.lerp_(theirs, 1.0 - decay)
            else:
                mine.copy_(theirs)


def make_optimizer(model: torch.nn.Module, tcfg: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov) over the trainable parameters; no weight decay on biases and norm weights."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": tcfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if tcfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=tcfg["lr"], momentum=tcfg["momentum"], nesterov=tcfg["momentum"] > 0)
    return torch.optim.AdamW(groups, lr=tcfg["lr"])


def _to(targets: list[dict[str, torch.Tensor]], dev: torch.device) -> list[dict[str, torch.Tensor]]:
    return [{k: v.to(dev) for k, v in t.items()} for t in targets]


def _loss(model: DetectorModel, x: torch.Tensor, targets: list[dict[str, torch.Tensor]],
          keys: Sequence[tuple[int, bool, bool]], cache: FeatureCache | None, dev: torch.device
          ) -> dict[str, torch.Tensor]:
    targets = _to(targets, dev)
    if cache is None:
        return model.loss(x.to(dev), targets)
    return model.loss_on_features(cache.features(model, x.to(dev), keys), targets)


@torch.no_grad()
def validation_loss(model: DetectorModel, batches: DetectionBatches, dev: torch.device, progress: bool,
                    cache: FeatureCache | None = None) -> dict[str, float]:
    """Mean loss terms over a split (training loss, no gradient, no flips)."""
    model.train()
    sums: dict[str, float] = {}
    n = 0
    for x, targets, keys in tqdm(batches, desc="val loss", disable=not progress, unit="batch", leave=False):
        parts = _loss(model, x, targets, keys, cache, dev)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v) * x.shape[0]
        n += x.shape[0]
    return {k: v / max(n, 1) for k, v in sums.items()}


def _save(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BundleError(f"cannot read checkpoint {path}: {exc}") from exc


def train(family: str, data_dir: str | Path, out: str | Path, config: dict[str, Any], *, device: str = "auto",
          progress: bool = True, overwrite: bool = False, resume: bool = False) -> Bundle:
    """Train a detector family on the COCO folder ``data_dir`` (train/ and val/) and write a bundle at ``out``.

    ``resume`` continues the interrupted run in ``<out>.work/``, or extends the finished one at ``out`` from
    its ``checkpoints/last.pt`` (with ``overwrite``): its saved configuration, only ``train.epochs`` is taken
    from ``config`` (the learning-rate schedule is then the one of the new epoch count, from the step reached).
    """
    out = bundle_target(out)
    check_out(out, overwrite)
    config = validate(family, config)
    work = out.parent / f"{out.name}.work"
    ckpt_dir = work / "checkpoints"
    state = None
    if resume:
        if not (ckpt_dir / "last.pt").is_file() and (out / "checkpoints" / "last.pt").is_file():
            shutil.copytree(out / "checkpoints", ckpt_dir, dirs_exist_ok=True)  # extend the finished run
        if not (ckpt_dir / "last.pt").is_file():
            raise BundleError(f"--resume: no interrupted run at {work} and no finished one at {out} (no "
                              f"checkpoints/last.pt); train without --resume")
        state = _load_checkpoint(ckpt_dir / "last.pt")
        # the run's own config, but the epochs (to extend it) and the rule that picks its checkpoint from
        # this call
        config = validate(family, {**state["config"], "train": {**state["config"]["train"],
                                                                "epochs": config["train"]["epochs"],
                                                                "best_by": config["train"]["best_by"]}})
    elif work.exists():
        if not overwrite:
            raise BundleError(f"{work} holds the checkpoints of an unfinished run; continue it with --resume, or "
                              f"start again with --overwrite (discards them)")
        shutil.rmtree(work)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    tcfg = config["train"]
    train_split, val_split = open_split(data_dir, "train"), open_split(data_dir, "val")
    if len(train_split) == 0 or len(val_split) == 0:
        raise DataError(f"{data_dir}: the train and val splits must both have images "
                        f"({len(train_split)} and {len(val_split)})")
    preprocess = make_preprocess(family, config)
    torch.manual_seed(tcfg["seed"])
    model = build_model(family, {**config["model"], "classes": train_split.classes},
                        preprocess.input_size).to(dev)
    optimizer = make_optimizer(model, tcfg)
    batches = DetectionBatches(train_split, preprocess, tcfg["batch_size"], shuffle=True, hflip=tcfg["hflip"],
                               vflip=tcfg["vflip"], crop=tcfg["crop"], seed=tcfg["seed"])
    val_batches = DetectionBatches(val_split, preprocess, tcfg["batch_size"])
    start, best, seconds = 0, math.inf, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        model.history = {k: list(v) for k, v in state["history"].items()}
        start, seconds = state["epoch"], state["seconds"]
        if "rng" in state:  # torchvision's RPN / RoI samplers draw from torch's global generators
            torch.set_rng_state(state["rng"])
            if state.get("cuda_rng") and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
        if state.get("best_by", "val_loss") == tcfg["best_by"]:  # checkpoints before best_by: by val loss
            best = state.get("best_score", state.get("best_val_loss", math.inf))
        log.info("resuming %s at epoch %d of %d", family, start + 1, tcfg["epochs"])
    (work / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    cached = tcfg["cache_features"] and model.features_frozen and not tcfg["crop"]  # crops are never seen twice
    cache, val_cache = (FeatureCache(), FeatureCache()) if cached else (None, None)
    total = tcfg["epochs"] * len(batches)
    warmup = int(round(tcfg["warmup_epochs"] * len(batches)))
    average = WeightAverage(model, tcfg["ema_epochs"] * len(batches)) if tcfg["ema_epochs"] else None
    if average is not None and state is not None and "average" in state:
        average.model.load_state_dict(state["average"])
        average.updates = state["average_updates"]
    judged = model if average is None else average.model  # the weights validated, kept as best and bundled
    for epoch in range(start, tcfg["epochs"]):
        t0 = time.perf_counter()
        model.train()
        sums: dict[str, float] = {}
        n = 0
        bar = tqdm(batches.epoch(epoch), desc=f"epoch {epoch + 1}/{tcfg['epochs']}", disable=not progress,
                   unit="batch")
        for b, (x, targets, keys) in enumerate(bar):
            lr = tcfg["lr"] * lr_factor(epoch * len(batches) + b, total, warmup, tcfg["min_lr_ratio"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            parts = _loss(model, x, targets, keys, cache, dev)
            loss = sum(parts.values())
            if not torch.isfinite(loss):
                raise ConfigError(f"the loss became {float(loss)} at epoch {epoch + 1}; lower train.lr "
                                  f"(now {tcfg['lr']})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg["grad_clip"])
            optimizer.step()
            if average is not None:
                average.update(model)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * x.shape[0]
            n += x.shape[0]
            bar.set_postfix(loss=f"{loss.item():.3f}")
        val = validation_loss(judged, val_batches, dev, progress, val_cache)
        entry = {**{f"train_{k}": v / n for k, v in sums.items()}, "train_loss": sum(sums.values()) / n,
                 **{f"val_{k}": v for k, v in val.items()}, "val_loss": sum(val.values()), "lr": lr}
        if tcfg["map_every"] and ((epoch + 1) % tcfg["map_every"] == 0 or epoch + 1 == tcfg["epochs"]):
            preds = predict(judged, val_split, preprocess, tcfg["batch_size"], progress=False)
            entry["val_map50"] = coco_eval(val_split.coco, preds, "bbox")["map50"]
        for k, v in entry.items():
            model.history.setdefault(k, []).append(float(v))
        seconds += time.perf_counter() - t0
        log.info("epoch %d/%d: %s (%.0f s)", epoch + 1, tcfg["epochs"],
                 ", ".join(f"{k} {v:.4g}" for k, v in entry.items()), time.perf_counter() - t0)
        score = selection_score(entry, epoch + 1, tcfg["best_by"])
        if score is not None and score < best:
            best = score
            _save(ckpt_dir / "best.pt", {"model": judged.state_dict(), "epoch": epoch + 1, "score": best,
                                         "best_by": tcfg["best_by"]})
        checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                      "history": model.history, "config": config, "seconds": seconds, "best_score": best,
                      "best_by": tcfg["best_by"], "rng": torch.get_rng_state(),
                      "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        if average is not None:
            checkpoint.update(average=average.model.state_dict(), average_updates=average.updates)
        if tcfg["save_every"] and (epoch + 1) % tcfg["save_every"] == 0:
            _save(ckpt_dir / f"epoch_{epoch + 1}.pt", {"model": judged.state_dict(), "epoch": epoch + 1})
        _save(ckpt_dir / "last.pt", checkpoint)
    (work / "history.json").write_text(json.dumps(model.history, indent=2) + "\n")
    best_state = _load_checkpoint(ckpt_dir / ("last.pt" if tcfg["best_by"] == "last" else "best.pt"))
    if best_state.get("best_by", "val_loss") != tcfg["best_by"] and tcfg["best_by"] != "last":
        log.warning("no epoch was trained under train.best_by=%s since resuming: the bundle keeps epoch %d, "
                    "chosen by %s", tcfg["best_by"], best_state["epoch"], best_state.get("best_by", "val_loss"))
    model.load_state_dict(best_state.get("average", best_state["model"]))
    model.eval()
    staged = staging_dir(out)
    try:
        bundle = _write_bundle(staged, family, model, data_dir, train_split, preprocess, config, work, dev,
                               seconds, int(best_state["epoch"]), progress)
        swap_in(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return Bundle(out, bundle.manifest)


def _write_bundle(path: Path, family: str, model: DetectorModel, data_dir: str | Path, train_split: Any,
                  preprocess: Preprocess, config: dict[str, Any], work: Path, dev: torch.device,
                  seconds: float, best_epoch: int, progress: bool) -> Bundle:
    """The bundle of a trained detector (evaluated on test/, or val/ when there is no test split)."""
    split_name = default_split(data_dir)
    split = open_split(data_dir, split_name)
    conf = config["decision"]["conf"]
    t0 = time.perf_counter()
    predictions = predict(model, split, preprocess, config["train"]["batch_size"], progress=progress)
    ms = 1000.0 * (time.perf_counter() - t0) / max(len(split), 1)
    metrics = {**detection_metrics(split.coco, predictions, conf, model.ok_classes), "split": split_name,
               "engine": "torch", "device": str(dev), "ms_per_image": ms, "fit_seconds": seconds,
               "epochs": config["train"]["epochs"], "best_epoch": best_epoch,
               "best_by": config["train"]["best_by"]}
    stats = model.statistics()
    state = model.state_dict()
    info_path = Path(data_dir) / "dataset_info.json"
    picks = range(0, len(train_split), max(1, len(train_split) // 16))
    bundle = Bundle(path, {
        "schema_version": SCHEMA_VERSION,
        "bundle_id": f"{family}-{model.tag()}-{content_digest(stats, state)[:12]}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "edgeinspect_version": __version__,
        "task": model.task,
        "model": {"family": family, **model.hyperparameters(), "weights_source": model.weights_source()},
        "preprocess": preprocess.to_dict(),
        "input_images": FrameSpec.of(read_raw(train_split.path_of(i)) for i in list(picks)[:16]).to_dict(),
        "input": {"name": "image", "shape": [1, 3, *preprocess.input_size], "dtype": "float32"},
        "outputs": output_shapes(model),
        "detection": model.decoder_config(),
        "decision": {"threshold": conf, "normalization": {"method": "threshold_centered", "center": conf,
                                                          "scale": conf},
                     "calibration": {"source": "confidence threshold"}, "min_region_area": 0},
        "files": {},
        "engines": [],
        "data": {"root": str(Path(data_dir).resolve()), "format": "coco", "train_images": len(train_split),
                 "val_images": len(open_split(data_dir, "val")), "test_split": split_name,
                 **({"dataset_info": json.loads(info_path.read_text())} if info_path.is_file() else {})},
        "metrics": json_ready(metrics),  # undefined figures (no positive image in a split) are null
        "config": config,
        "training": {"history": model.history},
    })
    bundle.add_file("weights", "weights.npz", _npz_bytes(state))
    for key, array in stats.items():
        bundle.add_array(key, array)
    bundle.add_report("config", "config.json", (json.dumps(config, indent=2) + "\n").encode())
    bundle.add_report("history", "history.json", (json.dumps(model.history, indent=2) + "\n").encode())
    bundle.add_report("predictions", "reports/predictions.json",
                      json.dumps(coco_results(predictions)).encode())
    for ckpt in sorted((work / "checkpoints").glob("*.pt")):
        bundle.add_report(f"checkpoint_{ckpt.stem}", f"checkpoints/{ckpt.name}", ckpt.read_bytes())
    bundle.add_report("training_curves", "reports/training_curves.png",
                      curves_png({k: v for k, v in model.history.items() if k != "lr"}, f"{family} training"))
    bundle.save()
    return bundle


@torch.no_grad()
def output_shapes(model: DetectorModel) -> dict[str, list[int]]:
    """The engine outputs' shapes for one image (-1 on the axes the model declares dynamic: a detection count)."""
    model.eval()
    outputs = model(torch.zeros(1, 3, *model.input_size, device=next(model.parameters()).device))
    dynamic = model.onnx_dynamic_axes or {}
    return {name: [-1 if i in dynamic.get(name, {}) else int(s) for i, s in enumerate(o.shape)]
            for name, o in zip(model.output_names, outputs, strict=True)}


# ------------------------------------------------------------------------------------- evaluation
def _numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def to_image(detections: dict[str, torch.Tensor | np.ndarray], preprocess: Preprocess, image_hw: tuple[int, int]
             ) -> dict[str, np.ndarray]:
    """``detect()``'s output for one image (input pixels; tensors, or numpy from the runtime's decoder) ->
    numpy in the image's pixels (masks resized)."""
    top, left = preprocess.crop_offset()
    sy, sx = image_hw[0] / preprocess.resize[0], image_hw[1] / preprocess.resize[1]
    boxes = _numpy(detections["boxes"]).astype(np.float32).reshape(-1, 4)
    boxes = (boxes + np.array([left, top, left, top], np.float32)) * np.array([sx, sy, sx, sy], np.float32)
    out = {"boxes": boxes, "labels": _numpy(detections["labels"]).astype(np.int64),
           "scores": _numpy(detections["scores"]).astype(np.float32)}
    if detections.get("masks") is not None:
        masks = _numpy(detections["masks"]).astype(np.float32)
        masks = masks.reshape(-1, *masks.shape[-2:])
        canvas = np.zeros((len(masks), *preprocess.resize), np.float32)
        canvas[:, top:top + masks.shape[1], left:left + masks.shape[2]] = masks
        out["masks"] = np.stack([cv2.resize(m, (image_hw[1], image_hw[0]), interpolation=cv2.INTER_LINEAR)
                                 for m in canvas]) if len(canvas) else np.zeros((0, *image_hw), np.float32)
    return out


@torch.no_grad()
def predict(model: DetectorModel, split: Any, preprocess: Preprocess, batch_size: int = 8, *,
            progress: bool = True) -> list[dict[str, Any]]:
    """``model.detect`` over a split: per image ``image_id`` and numpy ``boxes`` (xyxy image px), ``labels``,
    ``scores`` (and ``masks`` K x H x W in [0, 1])."""
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for start in tqdm(range(0, len(split), batch_size), desc="detect", disable=not progress, unit="batch"):
        idx = range(start, min(start + batch_size, len(split)))
        images = [split.load(i)[0] for i in idx]
        detections = model.detect(torch.from_numpy(preprocess.batch(images)).to(dev))
        for i, rgb, det in zip(idx, images, detections, strict=True):
            out.append({"image_id": split.image_ids[i], **to_image(det, preprocess, rgb.shape[:2])})
    model.train(False)
    return out


def coco_results(predictions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-image predictions -> the COCO results format (bbox [x, y, w, h]; RLE segmentation with masks)."""
    from pycocotools import mask as mask_utils

    results = []
    for p in predictions:
        for k, (box, label, score) in enumerate(zip(p["boxes"], p["labels"], p["scores"], strict=True)):
            x0, y0, x1, y1 = (float(v) for v in box)
            r = {"image_id": int(p["image_id"]), "category_id": int(label),
                 "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)], "score": float(score)}
            if "masks" in p:
                rle = mask_utils.encode(np.asfortranarray((p["masks"][k] >= 0.5).astype(np.uint8)))
                r["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
            results.append(r)
    return results


def coco_eval(coco_gt: Any, predictions: Sequence[dict[str, Any]], iou_type: str = "bbox") -> dict[str, Any]:
    """pycocotools COCOeval: mAP (IoU 0.5:0.95), mAP@0.5, mAP@0.75 (0 when nothing was detected) and
    ``ap50_per_class`` (category name -> AP@0.5, for the categories with ground truth)."""
    from pycocotools.cocoeval import COCOeval

    results = coco_results(predictions)
    if not results or not coco_gt.getAnnIds():
        return {"map": 0.0, "map50": 0.0, "map75": 0.0, "ap50_per_class": {}}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, dt, iou_type)
        ev.params.imgIds = [int(p["image_id"]) for p in predictions]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # precision: IoU thresholds x recall points x categories x areas ("all" first) x max detections (100 last);
    # -1 where a category has no ground truth
    at50 = ev.eval["precision"][list(ev.params.iouThrs).index(0.5), :, :, 0, -1]
    per_class = {coco_gt.cats[cat]["name"]: float(at50[at50[:, k] > -1, k].mean())
                 for k, cat in enumerate(ev.params.catIds) if (at50[:, k] > -1).any()}
    return {"map": max(float(ev.stats[0]), 0.0), "map50": max(float(ev.stats[1]), 0.0),
            "map75": max(float(ev.stats[2]), 0.0), "ap50_per_class": per_class}


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of xyxy boxes a (n x 4) and b (m x 4)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def detection_metrics(coco_gt: Any, predictions: Sequence[dict[str, Any]], conf: float,
                      ok_classes: Sequence[str] = ()) -> dict[str, Any]:
    """COCO and image-level metrics of per-image predictions (``image_id``; numpy ``boxes`` xyxy in the image's
    pixels, ``labels`` 1..C, ``scores``; ``masks`` K x H x W in [0, 1] adds the segm metrics).

    - ``bbox`` (and ``segm``): COCOeval mAP, mAP@0.5, mAP@0.75 over every detection (no ``conf`` cut).
    - Image level, at ``conf``: an image is predicted defective when any detection of a class not in
      ``ok_classes`` has a score >= conf, and is defective when it has a ground-truth box of such a class:
      ``confusion`` (tp, fn, fp, tn; defective = positive), accuracy, precision, recall, F1.
    - ``defect_detection_rate``: the share of ground-truth defect boxes matched (IoU >= 0.5, same class) by a
      detection >= conf; ``mean_confidence``: the mean score of the detections >= conf (NaN when none).
    - ``composite``: the mean of bbox mAP@0.5, image F1 and the defect detection rate (one number to rank
      runs by: localisation, verdicts and instances found).
    """
    cats = {c["id"]: c["name"] for c in coco_gt.loadCats(coco_gt.getCatIds())}
    ok_ids = {i for i, name in cats.items() if name in ok_classes}
    counts = {"tp": 0, "fn": 0, "fp": 0, "tn": 0}
    found = total = 0
    kept_scores: list[float] = []
    for p in predictions:
        anns = [a for a in coco_gt.imgToAnns.get(int(p["image_id"]), []) if a["category_id"] not in ok_ids]
        keep = (np.asarray(p["scores"]) >= conf) & ~np.isin(np.asarray(p["labels"]), list(ok_ids))
        kept_scores.extend(np.asarray(p["scores"])[keep].tolist())
        truth, said = bool(anns), bool(keep.any())
        counts[("tp" if said else "fn") if truth else ("fp" if said else "tn")] += 1
        if anns:
            gt = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                           for a in anns], np.float32)
            gt_labels = np.array([a["category_id"] for a in anns])
            boxes, labels = np.asarray(p["boxes"]).reshape(-1, 4)[keep], np.asarray(p["labels"])[keep]
            iou = _iou(gt, boxes) if len(boxes) else np.zeros((len(gt), 0))
            same = gt_labels[:, None] == labels[None, :]
            found += int(np.sum(np.any((iou >= 0.5) & same, axis=1)))
            total += len(gt)
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    metrics: dict[str, Any] = {"bbox": coco_eval(coco_gt, predictions, "bbox")}
    if predictions and all("masks" in p for p in predictions):
        metrics["segm"] = coco_eval(coco_gt, predictions, "segm")
    rate = found / total if total else float("nan")
    parts = [metrics["bbox"]["map50"], f1, rate]
    metrics.update({"conf": conf, "confusion": counts, "accuracy": accuracy(counts), "precision": precision,
                    "recall": recall, "f1": f1, "defect_detection_rate": rate,
                    "mean_confidence": float(np.mean(kept_scores)) if kept_scores else float("nan"),
                    "composite": float(np.mean([v for v in parts if not math.isnan(v)])),
                    "n_images": len(predictions), "n_defective": tp + fn, "n_defect_boxes": total})
    return metrics


# ------------------------------------------------------------------------------- visualisation
_GT_COLOUR, _DET_COLOUR = (0, 200, 0), (230, 40, 40)


def draw(rgb: np.ndarray, prediction: dict[str, Any], classes: Sequence[str], conf: float,
         gt_boxes: np.ndarray | None = None) -> np.ndarray:
    """The image with ground-truth boxes (green), detections >= conf (red, ``class score``) and their masks."""
    img = rgb.copy()
    keep = np.asarray(prediction["scores"]) >= conf
    if "masks" in prediction:
        for m in np.asarray(prediction["masks"])[keep]:
            on = m >= 0.5
            img[on] = (0.5 * img[on] + 0.5 * np.array(_DET_COLOUR)).astype(np.uint8)
    for box in [] if gt_boxes is None else gt_boxes:
        cv2.rectangle(img, tuple(int(v) for v in box[:2]), tuple(int(v) for v in box[2:]), _GT_COLOUR, 1)
    for box, label, score in zip(np.asarray(prediction["boxes"])[keep], np.asarray(prediction["labels"])[keep],
                                 np.asarray(prediction["scores"])[keep], strict=True):
        p0, p1 = tuple(int(round(v)) for v in box[:2]), tuple(int(round(v)) for v in box[2:])
        cv2.rectangle(img, p0, p1, _DET_COLOUR, 1)
        name = classes[int(label) - 1] if 0 < int(label) <= len(classes) else str(int(label))
        cv2.putText(img, f"{name} {score:.2f}", (p0[0], max(p0[1] - 3, 9)), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                    _DET_COLOUR, 1, cv2.LINE_AA)
    return img


def save_viz(folder: str | Path, split: Any, predictions: Sequence[dict[str, Any]], conf: float) -> int:
    """One PNG per image of ``split`` (same file name) with :func:`draw`; returns how many were written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    by_id = {int(p["image_id"]): p for p in predictions}
    written = 0
    for i, image_id in enumerate(split.image_ids):
        if int(image_id) not in by_id:
            continue
        rgb, target = split.load(i)
        img = draw(rgb, by_id[int(image_id)], split.classes, conf, target["boxes"])
        name = Path(split.path_of(i)).with_suffix(".png").name
        ok, data = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        atomic_write_bytes(folder / name, data.tobytes())
        written += 1
    return written


def predict_engine(bundle: Bundle, engine: str, split: Any, *, progress: bool = True) -> list[dict[str, Any]]:
    """Predictions of an exported engine through the runtime (:class:`Predictor`: its preprocessing,
    engine and decoder, every decoded detection), as :func:`predict` returns them."""
    from edgeinspect.runtime.predictor import Predictor

    predictor = Predictor(bundle, engine=engine)
    out = []
    for i in tqdm(range(len(split)), desc=f"detect {predictor.engine}", disable=not progress, unit="img"):
        rgb = split.load(i)[0]
        detections = predictor.predict(rgb).detections.to_dict()
        out.append({"image_id": split.image_ids[i], **to_image(detections, bundle.preprocess, rgb.shape[:2])})
    return out


def evaluate(bundle_path: str | Path, data_dir: str | Path, *, split: str | None = None, conf: float | None = None,
             engine: str = "torch", device: str = "cpu", save_viz_dir: str | Path | None = None,
             predictions_path: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """:func:`detection_metrics` of a detector bundle on a split of a COCO folder (``split`` defaults to
    :func:`default_split`, the one training reported on; ``conf`` to the bundle's ``decision.threshold``);
    optionally visualisations and the COCO results file."""
    bundle = Bundle.open(bundle_path)
    split = split or default_split(data_dir)
    if not has_split(data_dir, split):
        raise DataError(f"{data_dir} has no {split} split ({Path(data_dir) / split / 'annotations.json'})")
    coco_split = open_split(data_dir, split)
    conf = bundle.decision["threshold"] if conf is None else conf
    classes = bundle.manifest["model"]["classes"]
    if coco_split.classes != classes:
        raise DataError(f"{data_dir} has the classes {coco_split.classes}, the bundle was trained on {classes}")
    t0 = time.perf_counter()
    if engine == "torch":
        predictions = predict(load_model(bundle, device), coco_split, bundle.preprocess, progress=progress)
    else:
        predictions = predict_engine(bundle, engine, coco_split, progress=progress)
    ms = 1000.0 * (time.perf_counter() - t0) / max(len(coco_split), 1)
    ok = bundle.manifest.get("detection", {}).get("ok_classes", [])
    metrics = {**detection_metrics(coco_split.coco, predictions, conf, ok), "split": split, "engine": engine,
               "ms_per_image": ms, "bundle_id": bundle.bundle_id, "data_root": str(Path(data_dir).resolve())}
    if save_viz_dir is not None:
        save_viz(save_viz_dir, coco_split, predictions, conf)
    if predictions_path is not None:
        atomic_write_bytes(predictions_path, json.dumps(coco_results(predictions)).encode())
    return metrics


__all__ = ["CocoSplit", "DetectionBatches", "FeatureCache", "coco_eval", "coco_results", "default_split",
           "detection_metrics", "draw", "evaluate", "lr_factor", "open_split", "predict", "predict_engine", "save_viz",
           "to_input", "train"]
