"""The ``edgeinspect`` command line: data, train, evaluate, export, predict, serve, listen.

Heavy imports (torch, onnx) happen inside the commands that need them, so ``predict``, ``serve``
and ``listen`` work with only the ``runtime`` extra installed.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edgeinspect import __version__
from edgeinspect.errors import EdgeInspectError
from edgeinspect.export.formats import FORMATS

ARGV = "edgeinspect.argv"
RUN = "edgeinspect.run"


class _Group(click.Group):
    """Expected failures (EdgeInspectError, OSError) become one line and exit code 1, usage errors one line
    and exit code 2; ``--debug`` shows the traceback instead."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if ctx.parent is None:  # the whole command line, for the run registry
            ctx.meta[ARGV] = ["edgeinspect", *args]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # exit 2, on one line: the usage hint becomes a pointer to --help
            if exc.ctx is not None and not ctx.find_root().params.get("debug"):
                exc.message = f"{exc.message}; see `{exc.ctx.command_path} --help`"
                exc.ctx = None
            raise
        except (EdgeInspectError, OSError) as exc:
            if ctx.find_root().params.get("debug"):
                raise
            raise click.ClickException(one_line(exc)) from exc


def one_line(exc: BaseException) -> str:
    """The message of an expected failure on one line (an OSError names its file and what to check)."""
    if isinstance(exc, OSError) and not isinstance(exc, EdgeInspectError):
        where = f" ({exc.filename})" if exc.filename else ""
        text = f"{exc.strerror or exc}{where}; check the path, its permissions and the free disk space"
    else:
        text = str(exc)
    return " ".join(text.split())


def _progress(ctx: click.Context) -> bool:
    return not ctx.find_root().params.get("quiet", False)


def _figure(value: float | None) -> str:
    """A metric to 4 decimals; ``n/a`` when it is undefined (null in a manifest, NaN in fresh metrics)."""
    return "n/a" if value is None or value != value else f"{value:.4f}"


def _echo_json(data: dict) -> None:
    click.echo(json.dumps(data, indent=2, allow_nan=True))


def _manifest(path: str | None) -> dict[str, Any]:
    """The manifest of the bundle at ``path`` as stored (not verified), {} when there is none."""
    try:
        return json.loads((Path(path) / "manifest.json").read_text()) if path else {}
    except (OSError, ValueError):
        return {}


def recorded_command(command: Callable[..., Any]) -> Callable[..., Any]:
    """Record each run of a click command in the run registry (``edgeinspect.registry.recorded``), keyed on the
    command's name; whatever the family. Its parameters ``family``, ``data_root``, ``category`` and ``bundle`` /
    ``out`` fill the run, the bundle's manifest what they leave open (family, data, bundle id, engines; a
    successful ``train`` also its metrics). The command adds what only it knows through :func:`_run`."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from edgeinspect.registry import recorded

        ctx = click.get_current_context()
        params = ctx.params
        bundle = params.get("bundle") or params.get("out")
        before = _manifest(params.get("bundle"))
        data = before.get("data") or {}
        fields = {"family": params.get("family") or (before.get("model") or {}).get("family"),
                  "data_root": params.get("data_root") or data.get("root"),
                  "category": params.get("category") or data.get("category"), "bundle_path": bundle}
        with recorded(ctx.info_name, argv=ctx.meta.get(ARGV, sys.argv), registry=ctx.find_root().params.get("registry"),
                      **fields) as run:
            ctx.meta[RUN] = run
            ok = False
            try:
                result = command(*args, **kwargs)
                ok = True
                return result
            except SystemExit as exc:
                ok = exc.code in (None, 0)
                raise
            finally:
                if ok or "bundle" in params:  # a failed train leaves --out as it was: nothing of this run
                    _bundle_results(run, bundle, fields["family"], trained="out" in params)
    return wrapper


def _bundle_results(run: Any, bundle: str | None, family: str | None, trained: bool) -> None:
    """What the bundle's manifest says about a run, where the command did not say it: family, bundle id, engines
    (a training run: also metrics, config and the reports folder). Never fails the command."""
    try:
        after = _manifest(bundle)
        if not after:
            return
        run.update(family=family or (after.get("model") or {}).get("family"))
        reports = Path(bundle, "reports")
        found = {"bundle_id": after.get("bundle_id"),
                 "engines": [{k: e.get(k) for k in ("file", "format", "precision", "bytes", "parity")}
                             for e in after.get("engines", [])],
                 **({"metrics": after.get("metrics"), "config": after.get("config"),
                     "report_dir": str(reports.resolve()) if reports.is_dir() else None} if trained else {})}
        run.set_results(**{k: v for k, v in found.items() if k not in run.results})
    except Exception as exc:  # an odd manifest must not turn a finished command into a failure
        logging.getLogger(__name__).debug("run registry: could not read %s: %s", bundle, exc)


def _run(ctx: click.Context) -> Any:
    """The registry handle of the running command (:class:`edgeinspect.registry.RunHandle`)."""
    return ctx.meta[RUN]


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeinspect")
@click.option("--quiet", "-q", is_flag=True, help="Hide progress bars and info logs.")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
@click.option("--debug", is_flag=True, help="Show the traceback of an error instead of its one-line message.")
@click.option("--registry", default=None, type=click.Path(dir_okay=False), envvar="EDGEINSPECT_REGISTRY",
              help="Run registry database (SQLite) that records train / evaluate / export / bench runs  [default: "
                   "$EDGEINSPECT_REGISTRY, else ~/.local/share/edgeinspect/registry.sqlite]")
@click.option("--log-format", default="text", show_default=True, type=click.Choice(["text", "json"]),
              envvar="EDGEINSPECT_LOG_FORMAT", help="Log lines as text, or one JSON object each (for log collectors).")
def main(quiet: bool, verbose: bool, debug: bool, registry: str | None, log_format: str) -> None:
    """Industrial visual inspection: train anomaly models, export engines, serve verdicts."""
    from edgeinspect.logformat import configure

    configure(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO, log_format)


# ------------------------------------------------------------------------------------------- data
@main.group(cls=_Group)
def data() -> None:
    """Datasets: synthesise the built-in demo parts, convert to COCO for detectors, augment, make videos."""


@data.command("synth")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Dataset root to write.")
@click.option("--category", default="washer", show_default=True, help="Synthetic part category.")
@click.option("--seed", default=0, show_default=True, help="Random seed (same seed, same bytes).")
@click.option("--n-train", default=80, show_default=True, help="Good training images.")
@click.option("--n-test-good", default=20, show_default=True, help="Good test images.")
@click.option("--n-test-per-defect", default=8, show_default=True, help="Test images per defect type.")
def data_synth(out: str, category: str, seed: int, n_train: int, n_test_good: int, n_test_per_defect: int) -> None:
    """Generate synthetic parts with defects and exact masks in the MVTec layout."""
    from edgeinspect.train.data import MVTecCategory, synthesize

    path = synthesize(out, category, seed, n_train=n_train, n_test_good=n_test_good,
                      n_test_per_defect=n_test_per_defect)
    summary = MVTecCategory(out, category).summary()
    click.echo(f"wrote {path}: {summary['train_good']} good training images, {summary['test_good']} good and "
               f"{json.dumps(summary['test_defect'])} defective test images")


@data.command("coco")
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--category", required=True, help="Category folder under ROOT (e.g. bottle, steel_strip).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="COCO folder to write.")
@click.option("--from", "source", type=click.Choice(["mvtec", "voc"]), default="mvtec", show_default=True,
              help="mvtec: masks -> instances; voc: Pascal VOC XML boxes (NEU-DET layout).")
@click.option("--train-ratio", default=0.8, show_default=True, help="Share of each defect type in train (rest: val).")
@click.option("--test-ratio", default=0.1, show_default=True,
              help="Share of each defect type drawn to test first when the source has no test split of its own "
                   "(MVTec layout, VOC without test/): figures from images that did not choose the checkpoint.")
@click.option("--seed", default=0, show_default=True, help="Seed of the split (same seed, same split).")
@click.option("--classes", "classes_mode", type=click.Choice(["per-type", "single"]), default="per-type",
              show_default=True, help="One category per defect type, or one 'defect' category.")
@click.option("--good-class", is_flag=True, help="Give good images a full-image box of class 'good'.")
@click.option("--good-images", type=click.Choice(["all", "test", "none"]), default=None,
              help="mvtec: good images kept as negatives: train/good + test/good (all, default), test/good, none.")
@click.option("--min-area", type=click.IntRange(min=0), default=None,
              help="mvtec: drop mask components below this many pixels (default 10).")
@click.pass_context
def data_coco(ctx: click.Context, root: str, category: str, out: str, source: str, train_ratio: float,
              test_ratio: float, seed: int, classes_mode: str, good_class: bool, good_images: str | None,
              min_area: int | None) -> None:
    """Convert an MVTec-layout (masks) or Pascal VOC (boxes) dataset into a COCO folder for detectors."""
    from edgeinspect.train.data.coco import convert

    options: dict = {"train_ratio": train_ratio, "test_ratio": test_ratio, "seed": seed, "classes_mode": classes_mode,
                     "good_class": good_class, "progress": _progress(ctx)}
    if min_area is not None:
        options["min_area"] = min_area
    if good_images is not None:
        if source != "mvtec":
            raise click.UsageError("--good-images applies to --from mvtec only (VOC images without boxes are "
                                   "always kept as negatives)")
        options["good_images"] = good_images
    info = convert(source, root, category, out, **options)
    parts = [f"{name} {c['images']} images ({c['negative_images']} negative) / {c['annotations']} instances"
             for name, c in info["splits"].items()]
    dropped = f"; {info['dropped_components']} components below {info['min_component_area']} px dropped" \
        if "dropped_components" in info else ""
    click.echo(f"wrote {out}: {len(info['classes'])} classes ({', '.join(info['classes'])}); "
               f"{'; '.join(parts)}{dropped}")


@data.command("augment")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Augmented COCO folder to write.")
@click.option("--factor", type=click.IntRange(min=1), required=True, help="Augmented copies per training image.")
@click.option("--seed", default=0, show_default=True, help="Random seed (same seed, same copies).")
@click.pass_context
def data_augment(ctx: click.Context, src: str, out: str, factor: int, seed: int) -> None:
    """Copy a COCO folder adding FACTOR flipped / rotated / blurred / re-lit copies of every train image."""
    from edgeinspect.train.data.augment import augment_dataset

    info = augment_dataset(src, out, factor, seed=seed, progress=_progress(ctx))
    parts = [f"{name} {c['images']} images / {c['annotations']} instances" for name, c in info["splits"].items()]
    click.echo(f"wrote {out}: {'; '.join(parts)} (train: originals + {factor} augmented copies each)")


@data.command("video")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Video file (.avi) to write.")
@click.option("--fps", default=10.0, show_default=True, help="Frames per second.")
def data_video(images: tuple[str, ...], out: str, fps: float) -> None:
    """Write image files (or every image in given folders, recursively, sorted) into a video."""
    from edgeinspect.imageio import IMAGE_SUFFIXES
    from edgeinspect.train.data import write_video

    paths: list[Path] = []
    for item in map(Path, images):
        paths.extend(sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                            and not p.stem.endswith("_mask")) if item.is_dir() else [item])
    write_video(paths, out, fps)
    click.echo(f"wrote {out}: {len(paths)} frames at {fps:g} fps")


# ----------------------------------------------------------------------------------------- config
PRESET_HELP = ("Anomaly families: the keys of configs/presets/NAME.yaml over the defaults, under --config "
               "and --set (e.g. tall, wide: the part's aspect).")

@main.group(cls=_Group)
def config() -> None:
    """Configurations: the effective values with their comments, and their JSON Schema."""


@config.command("show")
@click.argument("name", metavar="FAMILY|export")
@click.option("--config", "config_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="YAML file over the defaults (as for train / export).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override one key.")
@click.option("--preset", default=None, metavar="NAME", help=PRESET_HELP)
def config_show(name: str, config_path: str | None, overrides: tuple[str, ...], preset: str | None) -> None:
    """Print the effective configuration as commented YAML (the defaults' comments, the effective values)."""
    from edgeinspect.config import load_config, show

    click.echo(show(name, load_config(name, config_path, overrides, preset)), nl=False)


@config.command("schema")
@click.argument("name", metavar="FAMILY|export")
def config_schema(name: str) -> None:
    """Print the JSON Schema of a configuration (for editors and forms)."""
    from edgeinspect.config import schema_for

    _echo_json(schema_for(name).model_json_schema())


# ------------------------------------------------------------------------------------------ train
@main.command()
def backbones() -> None:
    """List the backbones and their named stages."""
    from edgeinspect.train.backbones import BACKBONES, DEFAULT_BACKBONE

    for name, spec in BACKBONES.items():
        stages = ", ".join(f"{s}({i.channels}ch,/{i.stride})" for s, i in spec.stages.items())
        click.echo(f"{name}{' (default)' if name == DEFAULT_BACKBONE else ''}: weights from {spec.weights_source}")
        click.echo(f"    stages: {stages}")


def _train_anomaly(ctx: click.Context, family: str, data_root: str, out: str, config: dict, *, category: str | None,
                   device: str, overwrite: bool, resume: bool) -> None:
    from edgeinspect.train.trainer import train as run_train

    if not category:
        raise click.UsageError(f"--category is required for {family} (a category folder of the MVTec-layout root)")
    if resume:
        raise click.UsageError(f"--resume: {family} trains in one go; drop --resume")
    bundle = run_train(family, data_root, category, out, config, device=device, progress=_progress(ctx),
                       overwrite=overwrite)
    m = bundle.manifest["metrics"]
    click.echo(f"bundle {bundle.path} ({bundle.bundle_id}): image AUROC {m['image_auroc']:.4f}, "
               f"pixel AUROC {m['pixel_auroc']:.4f}, F1 {m['f1']:.4f} on {m['n_images']} test images "
               f"({m['split']}); "
               f"threshold {bundle.decision['threshold']:.4g}")


def _train_detector(ctx: click.Context, family: str, data_root: str, out: str, config: dict, *,
                    category: str | None, device: str, overwrite: bool, resume: bool) -> None:
    from edgeinspect.train.detection import train as run_train

    if category:
        raise click.UsageError(f"--category: {family} trains on a COCO folder (--data), not a category; drop it")
    bundle = run_train(family, data_root, out, config, device=device, progress=_progress(ctx), overwrite=overwrite,
                       resume=resume)
    m = bundle.manifest["metrics"]
    click.echo(f"bundle {bundle.path} ({bundle.bundle_id}): bbox mAP@0.5 {m['bbox']['map50']:.4f}, "
               f"mAP {m['bbox']['map']:.4f}, image F1 {_figure(m['f1'])} at conf {m['conf']:g} on {m['n_images']} "
               f"{m['split']} images; best epoch {m['best_epoch']} of {m['epochs']}")


# what `train` does by the task the family serves
_TRAINERS = {"anomaly_map": _train_anomaly, "detections": _train_detector}
# train options that set a key of the detector's `train` section (None = not given)
_TRAIN_KEYS = (("--epochs", "epochs"), ("--batch-size", "batch_size"), ("--lr", "lr"), ("--save-every", "save_every"))


@main.command()
@click.argument("family")
@click.option("--data", "data_root", required=True, type=click.Path(exists=True, file_okay=False),
              help="Dataset root: the MVTec layout (anomaly families) or a COCO folder (ssd, maskrcnn).")
@click.option("--category", default=None, help="Category folder under the root (anomaly families only).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out (atomically).")
@click.option("--backbone", default=None, help="Override model.backbone (see `edgeinspect backbones`).")
@click.option("--weights", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Backbone weights file (for torchvision backbones without internet).")
@click.option("--config", "config_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="YAML file overriding configs/<family>.yaml.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override one config key.")
@click.option("--preset", default=None, metavar="NAME", help=PRESET_HELP)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda", "mps"]))
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Detectors: train.epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Detectors: train.batch_size.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Detectors: train.lr.")
@click.option("--save-every", type=click.IntRange(min=0), default=None,
              help="Detectors: also keep checkpoints/epoch_N.pt every N epochs.")
@click.option("--resume", is_flag=True, help="Detectors: continue the interrupted run in <out>.work/, or extend "
              "the finished bundle at <out> (with --overwrite and a larger --epochs).")
@click.pass_context
@recorded_command
def train(ctx: click.Context, family: str, data_root: str, category: str | None, out: str, overwrite: bool,
          backbone: str | None, weights: str | None, config_path: str | None, overrides: tuple[str, ...],
          preset: str | None, device: str, epochs: int | None, batch_size: int | None, lr: float | None,
          save_every: int | None, resume: bool) -> None:
    """Train FAMILY and write a model bundle: anomaly models (patchcore, padim, autoencoder, glass; cam is
    supervised) with their threshold, or detectors (ssd, maskrcnn) on a COCO folder."""
    from edgeinspect.config import load_config
    from edgeinspect.train.models import MODELS

    if family not in MODELS:
        raise click.BadParameter(f"{family!r} is not one of {', '.join(MODELS)}", param_hint="FAMILY")
    cls = MODELS[family]
    keys = cls.config_section.model_fields
    for option, value, key in (("--backbone", backbone, "backbone"), ("--weights", weights, "weights")):
        if value and key not in keys:
            raise click.UsageError(f"{option}: {family} has no backbone (it trains its own network from scratch); "
                                   f"drop {option}")
    extra = [f"model.backbone={backbone}"] if backbone else []
    extra += [f"model.weights={weights}"] if weights else []
    given = {option: (key, ctx.params[key]) for option, key in _TRAIN_KEYS if ctx.params[key] is not None}
    if given and cls.task != "detections":
        raise click.UsageError(f"{', '.join(given)}: {family} is not trained for epochs; use --set for its keys")
    extra += [f"train.{key}={value}" for key, value in given.values()]
    config = load_config(family, config_path, [*overrides, *extra], preset)
    _run(ctx).update(config=config)
    _TRAINERS[cls.task](ctx, family, data_root, out, config, category=category, device=device, overwrite=overwrite,
                        resume=resume)


def _evaluate_anomaly(ctx: click.Context, bundle: str, data_root: str, *, category: str | None, engine: str,
                      device: str, split: str | None, conf: float | None, save_viz: str | None,
                      predictions: str | None, report_dir: str | None) -> dict:
    from edgeinspect.train.evaluate import evaluate as run_evaluate

    if not category:
        raise click.UsageError("--category is required for an anomaly-map bundle")
    for option, value in (("--split", split), ("--conf", conf), ("--save-viz", save_viz),
                          ("--predictions", predictions)):
        if value is not None:
            raise click.UsageError(f"{option} is for detector bundles; drop it")
    m = run_evaluate(bundle, data_root, category, engine, device=device, progress=_progress(ctx),
                     report_dir=report_dir)
    c = m["confusion"]
    rows = [("image", f"AUROC {m['image_auroc']:.4f}  AUPR {m['aupr']:.4f}  "
                      f"F1-max {m['f1_max']:.4f} @ {m['f1_max_threshold']:.4g}"),
            (f"@ {m['threshold']:.4g}", f"F1 {m['f1']:.4f}  accuracy {m['accuracy']:.4f}  "
                             f"balanced accuracy {m['balanced_accuracy']:.4f}  "
                             f"TP {c['tp']} FN {c['fn']} FP {c['fp']} TN {c['tn']}"),
            ("pixel", f"AUROC {m['pixel_auroc']:.4f}  PRO (FPR <= 0.3) {m['pro']:.4f}"),
            ("boxes", f"mean best IoU {m['box_iou']:.4f}"),
            ("images", f"{m['n_images']} ({m['n_defective']} defective): {m['split']}"),
            ("engine", f"{m['engine']}, {m['ms_per_image']:.1f} ms / image")]
    for key, value in rows:
        click.echo(f"{key:<14}{value}")
    return m


def _evaluate_detector(ctx: click.Context, bundle: str, data_root: str, *, category: str | None, engine: str,
                       device: str, split: str | None, conf: float | None, save_viz: str | None,
                       predictions: str | None, report_dir: str | None) -> dict:
    from edgeinspect.train.detection import evaluate as run_evaluate

    if category:
        raise click.UsageError("--category: a detector bundle is evaluated on a COCO folder (--data); drop it")
    if report_dir:
        raise click.UsageError("--report is for anomaly-map bundles; detector bundles have --save-viz")
    m = run_evaluate(bundle, data_root, split=split, conf=conf, engine=engine, device=device,
                     save_viz_dir=save_viz, predictions_path=predictions, progress=_progress(ctx))
    c = m["confusion"]
    rows = []
    for kind in ("bbox", "segm"):
        if kind in m:
            rows.append((kind, f"mAP {m[kind]['map']:.4f}  mAP@0.5 {m[kind]['map50']:.4f}  "
                               f"mAP@0.75 {m[kind]['map75']:.4f}"))
            rows.append(("  AP@0.5", "  ".join(f"{name} {ap:.3f}" for name, ap in m[kind]["ap50_per_class"].items())))
    rows += [(f"@ conf {m['conf']:g}", f"accuracy {m['accuracy']:.4f}  precision {m['precision']:.4f}  "
                                       f"recall {m['recall']:.4f}  F1 {m['f1']:.4f}  "
                                       f"TP {c['tp']} FN {c['fn']} FP {c['fp']} TN {c['tn']}"),
             ("defects", f"detection rate {m['defect_detection_rate']:.4f} of {m['n_defect_boxes']} boxes  "
                         f"mean confidence {m['mean_confidence']:.4f}  composite {m['composite']:.4f}"),
             ("images", f"{m['n_images']} ({m['n_defective']} defective): {m['split']}"),
             ("engine", f"{m['engine']}, {m['ms_per_image']:.1f} ms / image")]
    for key, value in rows:
        click.echo(f"{key:<14}{value}")
    return m


# what `evaluate` does by the task the bundle serves (manifest "task"; absent = anomaly_map)
_EVALUATORS = {"anomaly_map": _evaluate_anomaly, "detections": _evaluate_detector}


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--data", "data_root", required=True, type=click.Path(exists=True, file_okay=False),
              help="MVTec-layout root (anomaly bundles) or COCO folder (detector bundles).")
@click.option("--category", default=None, help="Category under the root (anomaly bundles).")
@click.option("--engine", default="torch", show_default=True,
              help="torch, or an engine of the bundle: auto, onnx, onnx:int8, tensorrt:fp16, ...")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["auto", "cpu", "cuda", "mps"]),
              help="Torch device for --engine torch.")
@click.option("--split", default=None, type=click.Choice(["train", "val", "test"]),
              help="Detector bundles: the COCO split  [default: test, val when the folder has none]")
@click.option("--conf", default=None, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Detector bundles: confidence of a defect detection for the image-level metrics "
                   "[default: the bundle's decision threshold]")
@click.option("--save-viz", default=None, type=click.Path(file_okay=False),
              help="Detector bundles: write one PNG per image (ground truth green, detections red) here.")
@click.option("--predictions", default=None, type=click.Path(dir_okay=False),
              help="Detector bundles: write the detections here (COCO results JSON).")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Write the metrics here.")
@click.option("--report", "report_dir", default=None, type=click.Path(file_okay=False),
              help="Anomaly bundles: write plots (PNG) and a self-contained report.html into this folder.")
@click.pass_context
@recorded_command
def evaluate(ctx: click.Context, bundle: str, data_root: str, category: str | None, engine: str, device: str,
             split: str | None, conf: float | None, save_viz: str | None, predictions: str | None,
             json_out: str | None, report_dir: str | None) -> None:
    """Metrics of BUNDLE: image, pixel and box metrics on a test split (anomaly bundles), COCO mAP and
    image-level metrics on a COCO split (detector bundles)."""
    from edgeinspect.bundle import Bundle

    task = Bundle.open(bundle).manifest.get("task", "anomaly_map")
    m = _EVALUATORS[task](ctx, bundle, data_root, category=category, engine=engine, device=device, split=split,
                          conf=conf, save_viz=save_viz, predictions=predictions, report_dir=report_dir)
    _run(ctx).set_results(metrics=m, report_dir=str(Path(report_dir).resolve()) if report_dir else None)
    if json_out:
        Path(json_out).write_text(json.dumps(m, indent=2) + "\n")
    if report_dir:
        click.echo(f"{'report':<14}{Path(report_dir) / 'report.html'}")


# ----------------------------------------------------------------------------------------- export
@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", default="onnx", show_default=True,
              help=f"Engine format: {', '.join(FORMATS)}, or all (every engine this machine can build).")
@click.option("--precision", default=None, help="fp32, fp16, int8 or all  [default: fp32; all with --format all]")
@click.option("--config", "config_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="YAML file overriding configs/export.yaml (gates, INT8 calibration, each format's settings).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override one export setting.")
@click.option("--data", "data_root", default=None, type=click.Path(exists=True, file_okay=False),
              help="Check / calibration images: dataset root, a COCO folder for detectors (default: the one "
                   "recorded in the bundle).")
@click.option("--category", default=None, help="Check / calibration images: category (default: the bundle's; "
                                               "not for detectors).")
@click.pass_context
@recorded_command
def export(ctx: click.Context, bundle: str, fmt: str, precision: str | None, config_path: str | None,
           overrides: tuple[str, ...], data_root: str | None, category: str | None) -> None:
    """Write engines into BUNDLE, each checked against the PyTorch model. Exit 1 if one is refused."""
    from edgeinspect.config import load_config
    from edgeinspect.export.exporter import export_bundle

    settings = load_config("export", config_path, overrides)
    _run(ctx).update(config=settings)
    results = export_bundle(bundle, fmt, precision or ("all" if fmt == "all" else "fp32"), settings=settings,
                            data_root=data_root, category=category, progress=_progress(ctx))
    for result in results:
        click.echo(result.describe())
    _run(ctx).set_results(metrics={f"{r.format}:{r.precision}": r.status for r in results})
    sys.exit(1 if any(r.status == "refused" for r in results) else 0)


# ---------------------------------------------------------------------------------------- runtime
FRAMES_OPTION = click.option(
    "--frames", type=click.Choice(["strict", "convert"]), default="strict", show_default=True,
    help="strict: a frame unlike the training images (size, channels, bit depth) gets an ERROR verdict; "
         "convert: convert it and judge it (recorded in the verdict).")

@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--engine", default="auto", show_default=True,
              help="Engine FORMAT[:PRECISION] (onnx, onnx:int8, tensorrt:fp16, coreml:fp16) or auto: TensorRT "
                   "with a CUDA GPU, Core ML on macOS, else ONNX INT8, else ONNX FP32.")
@click.option("--provider", "providers", multiple=True, default=("cpu",), show_default=True,
              help="ONNX Runtime execution provider: cpu, cuda, tensorrt (repeatable, in order).")
@click.option("--triton-url", default=None, help="Triton server (gRPC HOST:PORT) for --engine triton[:PRECISION].")
@FRAMES_OPTION
def predict(bundle: str, images: tuple[str, ...], as_json: bool, engine: str, providers: tuple[str, ...],
            triton_url: str | None, frames: str) -> None:
    """Print one verdict per image. Exit code 1 if any image could not be read or was refused."""
    from edgeinspect.imageio import read_raw
    from edgeinspect.runtime.predictor import Predictor

    predictor = Predictor(bundle, engine=engine, providers=providers, convert_frames=frames == "convert",
                          remote=triton_url)
    failed = 0
    for image in images:
        shown = image.encode("utf-8", "backslashreplace").decode()  # names that are not UTF-8 still print
        try:
            rgb, conversions = predictor.check(read_raw(image))
            result = {"image": shown, **predictor.predict(rgb).to_dict(),
                      **({"conversions": conversions} if conversions else {})}
        except EdgeInspectError as exc:
            failed += 1
            result = {"image": shown, "verdict": "ERROR", "error": one_line(exc)}
        if as_json:
            click.echo(json.dumps(result))
        elif result["verdict"] == "ERROR":
            click.echo(f"{shown}: ERROR {result['error'].encode('utf-8', 'backslashreplace').decode()}")
        else:
            notes = f"; converted: {', '.join(result['conversions'])}" if "conversions" in result else ""
            click.echo(f"{shown}: {result['verdict']} score {result['score']:.3f} "
                       f"({len(result['regions'])} region(s)){notes}")
    sys.exit(1 if failed else 0)


@main.command()
@click.option("--config", "config_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Line config YAML: several cameras, publish endpoint, journal, metrics (docs/deploy.md). "
                   "It replaces the options below.")
@click.option("--bundle", default=None, type=click.Path(exists=True, file_okay=False))
@click.option("--camera", default=None,
              help="Video file, image folder, image file, device index, RTSP/HTTP URL or GStreamer pipeline.")
@click.option("--publish", default="tcp://127.0.0.1:5555", show_default=True, help="ZeroMQ endpoint to bind.")
@click.option("--line", default="line1", show_default=True, help="Production line id (topic part).")
@click.option("--camera-id", default="cam0", show_default=True, help="Camera id (topic part).")
@click.option("--engine", default="auto", show_default=True,
              help="Engine FORMAT[:PRECISION] (onnx, onnx:int8, tensorrt:fp16, coreml:fp16) or auto: TensorRT "
                   "with a CUDA GPU, Core ML on macOS, else ONNX INT8, else ONNX FP32.")
@click.option("--provider", "providers", multiple=True, default=("cpu",), show_default=True,
              help="ONNX Runtime execution provider: cpu, cuda, tensorrt (repeatable, in order).")
@click.option("--wait-subscribers", default=0, show_default=True,
              help="Wait for this many subscribers to the verdict topic before the first frame.")
@click.option("--wait-timeout", default=10.0, show_default=True, help="Seconds to wait for them.")
@click.option("--loop", is_flag=True, help="Restart a video file or folder at its end.")
@click.option("--max-frames", default=None, type=click.IntRange(min=0), help="Stop after this many frames.")
@click.option("--journal", "journal_dir", default=None, type=click.Path(file_okay=False),
              help="Journal every verdict (JSON lines) under DIR/<line>.<camera-id>/ before publishing it; seq "
                   "continues from it on restart.")
@click.option("--journal-fsync", default="interval", show_default=True,
              type=click.Choice(["interval", "always", "never"]),
              help="interval: fsync at most once a second; always: every verdict; never: leave it to the OS. "
                   "Every verdict is written to the OS before it is sent in all three.")
@click.option("--metrics-port", default=None, type=click.IntRange(0, 65535),
              help="Serve Prometheus /metrics and /healthz on this port (localhost; see --metrics-host).")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address the metrics server binds.")
@click.option("--triton-url", default=None, help="Triton server (gRPC HOST:PORT) for --engine triton[:PRECISION].")
@click.option("--control", default=None,
              help="Bind the control socket here (e.g. tcp://127.0.0.1:5556): edgeinspect ctl status|reload|...")
@FRAMES_OPTION
@click.pass_context
def serve(ctx: click.Context, config_path: str | None, bundle: str | None, camera: str | None, publish: str, line: str,
          camera_id: str, engine: str, providers: tuple[str, ...], wait_subscribers: int, wait_timeout: float,
          loop: bool, max_frames: int | None, journal_dir: str | None, journal_fsync: str, metrics_port: int | None,
          metrics_host: str, triton_url: str | None, control: str | None, frames: str) -> None:
    """Publish a verdict per frame on verdict.<line>.<camera-id> until the sources end or SIGINT/SIGTERM."""
    from edgeinspect.runtime.daemon import run_line
    from edgeinspect.runtime.line import line_config, load_line_config

    if config_path:
        given = [f"--{name.replace('_', '-')}" for name in ctx.params if name != "config_path"
                 and ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"--config describes the whole line; drop {', '.join(given)} (or set them in it)")
        config = load_line_config(config_path)
    elif not (bundle and camera):
        raise click.UsageError("give --bundle and --camera for one camera, or --config LINE.yaml for a line")
    else:
        config = line_config({"line": line, "publish": publish, "journal": journal_dir, "journal_fsync": journal_fsync,
                              "metrics_port": metrics_port, "metrics_host": metrics_host, "providers": list(providers),
                              "wait_subscribers": wait_subscribers, "wait_timeout_s": wait_timeout, "control": control,
                              "triton_url": triton_url,
                              "cameras": [{"id": camera_id, "source": camera, "bundle": bundle, "engine": engine,
                                           "loop": loop, "max_frames": max_frames, "frames": frames}]},
                             "serve options")
    for camera_id, stats in run_line(config).items():
        click.echo(f"{camera_id}: served {stats.frames} frames: {stats.ok} OK, {stats.nok} NOK, {stats.errors} errors",
                   err=True)


@main.command()
@click.argument("command", type=click.Choice(["status", "snapshot", "reload", "set-threshold", "pause", "resume"]))
@click.argument("value", required=False)
@click.option("--connect", default="tcp://127.0.0.1:5556", show_default=True, help="The daemon's control endpoint.")
@click.option("--camera", default=None, help="Only this camera (default: every camera of the line).")
@click.option("--token", default=None, envvar="EDGEINSPECT_CONTROL_TOKEN",
              help="The line's control_token (or $EDGEINSPECT_CONTROL_TOKEN).")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the reply.")
def ctl(command: str, value: str | None, connect: str, camera: str | None, token: str | None, timeout: float) -> None:
    """Ask a serving daemon: status, snapshot, reload BUNDLE, set-threshold RAW, pause, resume. Prints the JSON
    reply; exit 1 when the daemon refused."""
    import zmq

    request: dict = {"cmd": command, **({"camera": camera} if camera else {}), **({"token": token} if token else {})}
    if command in ("reload", "set-threshold"):
        if value is None:
            raise click.UsageError(f"{command} needs a value: " + ("the bundle path" if command == "reload" else
                                                                   "the threshold in model units"))
        try:
            request["bundle" if command == "reload" else "threshold"] = (value if command == "reload"
                                                                        else float(value))
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a number", param_hint="VALUE") from None
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(connect)
        sock.send(json.dumps(request).encode())
        if not sock.poll(int(timeout * 1000)):
            raise EdgeInspectError(f"no reply from the control socket {connect} within {timeout:g} s; is the daemon "
                                   f"running with control: {connect}?")
        reply = json.loads(sock.recv())
    finally:
        sock.close()
    click.echo(json.dumps(reply, indent=2))
    sys.exit(0 if reply.get("ok") else 1)


@main.group()
def journal() -> None:
    """Read and re-send the verdicts a daemon journalled (serve --journal)."""


@journal.command("replay")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--since", default=0, show_default=True, type=click.IntRange(min=0), help="First seq to send.")
@click.option("--until", default=None, type=click.IntRange(min=0), help="Last seq to send (default: the newest).")
@click.option("--publish", default=None, help="ZeroMQ endpoint to bind and re-send on (default: print JSON lines).")
@click.option("--wait-subscribers", default=1, show_default=True,
              help="With --publish: wait for this many subscribers to the verdict topic first.")
@click.option("--wait-timeout", default=10.0, show_default=True, help="Seconds to wait for them.")
def journal_replay(directory: str, since: int, until: int | None, publish: str | None, wait_subscribers: int,
                   wait_timeout: float) -> None:
    """Re-send the verdicts seq SINCE..UNTIL of one camera's journal DIRECTORY (<journal>/<line>.<camera>), as they
    were (same seq, marked "replayed": true), on their own topic; or print them."""
    from edgeinspect.runtime.journal import read_journal
    from edgeinspect.runtime.publisher import VerdictPublisher

    records = read_journal(directory, since, until)
    if publish is None:
        for record in records:
            click.echo(json.dumps(record, separators=(",", ":"), ensure_ascii=False))
        return
    first = next(records, None)
    if first is None:
        raise click.ClickException(f"the journal in {directory} has no verdict with seq >= {since}")
    sent, last = 0, first
    # every verdict counts here: a slow subscriber makes the replay wait (up to 30 s at a time), never drop
    with VerdictPublisher(publish, first["line"], first["camera"], send_timeout_s=30.0, linger_ms=30_000) as publisher:
        publisher.wait_for_subscribers(wait_subscribers, wait_timeout)
        for last in itertools.chain([first], records):
            publisher.republish(last)
            sent += 1
    click.echo(f"replayed {sent} verdicts (seq {first['seq']}..{last['seq']}) on {publish}", err=True)


@main.command()
@click.option("--bundle", "bundles", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Bundle to load at start (repeatable; more can be loaded from the dashboard or the API).")
@click.option("--registry", "registry_path", default=None, type=click.Path(dir_okay=False),
              help="Run registry (SQLite) to list runs from  [default: $EDGEINSPECT_REGISTRY or the user's data dir]")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (other than loopback: --token).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port to bind.")
@click.option("--token", default=None, envvar="EDGEINSPECT_INSPECTOR_TOKEN",
              help="Require 'Authorization: Bearer TOKEN' on every /api request (needed off loopback; also read "
                   "from $EDGEINSPECT_INSPECTOR_TOKEN).")
@click.option("--engine", default="auto", show_default=True, help="Engine of the loaded bundles (as in predict).")
@click.option("--daemon", default=None, metavar="ENDPOINT",
              help="A serving daemon's publish endpoint (tcp://HOST:PORT): its live verdicts on the dashboard.")
@FRAMES_OPTION
@click.pass_context
def inspector(ctx: click.Context, bundles: tuple[str, ...], registry_path: str | None, host: str, port: int,
              token: str | None, engine: str, daemon: str | None, frames: str) -> None:
    """REST API and web dashboard (http://HOST:PORT/, API docs at /docs): try bundles on uploaded images, tune
    their threshold against the test split, browse the run registry. Predicts with the torch-free runtime."""
    try:
        import uvicorn

        from edgeinspect.inspector.app import check_bind, create_app
    except ImportError as exc:
        raise click.ClickException(f"the inspector needs its extra: pip install 'edgeinspect[inspector]' ({exc})"
                                   ) from None
    if token is not None and not token.strip():
        raise click.BadParameter("is empty: give a token, or leave --token out to run without one",
                                 param_hint="--token")
    check_bind(host, token)
    registry_path = registry_path or ctx.find_root().params.get("registry")  # also `edgeinspect --registry P ...`
    app = create_app(bundles, registry=registry_path, token=token, engine=engine, convert_frames=frames == "convert",
                     daemon=daemon)
    click.echo(f"inspector on http://{host}:{port}/ (API docs: /docs); Ctrl-C stops it", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)


@main.command()
@click.option("--connect", default="tcp://127.0.0.1:5555", show_default=True, help="Daemon endpoint.")
@click.option("--topic", default="verdict.", show_default=True, help="Topic prefix to subscribe to.")
@click.option("--count", default=None, type=int, help="Exit after this many messages.")
@click.option("--timeout", default=None, type=float, help="Exit after this many seconds without a message.")
@click.option("--until-stopped", is_flag=True, help="Also subscribe to status and exit when the daemon stops.")
def listen(connect: str, topic: str, count: int | None, timeout: float | None, until_stopped: bool) -> None:
    """Subscribe to a daemon and print each message as one JSON line."""
    import zmq

    from edgeinspect.runtime.publisher import decode_message

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.connect(connect)
    sock.setsockopt_string(zmq.SUBSCRIBE, topic)
    if until_stopped:
        sock.setsockopt_string(zmq.SUBSCRIBE, "status.")
    received = 0
    try:
        while count is None or received < count:
            if not sock.poll(None if timeout is None else int(timeout * 1000)):
                raise click.ClickException(f"no message from {connect} for {timeout:g} s")
            name, payload = decode_message(sock.recv_multipart())
            if name.startswith("status.") and until_stopped and payload.get("state") in ("stopped", "failed"):
                click.echo(json.dumps({"topic": name, **payload}))
                break
            if name.startswith(topic):
                received += 1
                click.echo(json.dumps({"topic": name, **payload}))
    finally:
        sock.close(linger=0)


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--engines", "engines", multiple=True, metavar="FORMAT[:PRECISION]",
              help="Engines to measure (repeatable; default: every engine of the bundle).")
@click.option("--data", "data_root", default=None, type=click.Path(exists=True, file_okay=False),
              help="Dataset root of the test images (default: the one recorded in the bundle).")
@click.option("--category", default=None, help="Category of the test images (default: the bundle's).")
@click.option("--warmup", default=5, show_default=True, help="Untimed calls per engine before timing.")
@click.option("--runs", default=50, show_default=True, help="Timed calls per engine (cycling through the images).")
@click.option("--rounds", default=5, show_default=True, help="Rounds that alternate the engines.")
@click.option("--threads", default=None, type=int, help="ONNX Runtime intra-op threads (default: all CPUs).")
@click.option("--no-backbone", is_flag=True, help="Skip the backbone-alone reference rows (they need torch).")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Write the report here.")
@click.option("--markdown", "markdown_out", default=None, type=click.Path(dir_okay=False),
              help="Write the table as Markdown here.")
@click.pass_context
@recorded_command
def bench(ctx: click.Context, bundle: str, engines: tuple[str, ...], data_root: str | None, category: str | None,
          warmup: int, runs: int, rounds: int, threads: int | None, no_backbone: bool, json_out: str | None,
          markdown_out: str | None) -> None:
    """Latency, FPS, memory and accuracy of every engine of BUNDLE on this device, side by side."""
    from edgeinspect.bench import bench as run_bench
    from edgeinspect.bench import markdown_table

    if runs < 1 or warmup < 0 or rounds < 1:
        raise click.BadParameter("--runs and --rounds must be >= 1 and --warmup >= 0")
    report = run_bench(bundle, engines, data_root=data_root, category=category, warmup=warmup, runs=runs,
                       rounds=rounds, threads=threads, backbone=not no_backbone)
    _run(ctx).set_results(engines=report["rows"], metrics={
        f"{r['format']}:{r['precision']}": {k: v for k, v in r.items() if isinstance(v, int | float)}
        for r in report["rows"]})
    table = markdown_table(report)
    click.echo(table)
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2) + "\n")
    if markdown_out:
        Path(markdown_out).write_text(table)


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
def info(bundle: str) -> None:
    """Show a bundle's manifest summary and check its files."""
    from edgeinspect.bundle import Bundle

    b = Bundle.open(bundle)
    m = b.manifest
    _echo_json({"bundle_id": b.bundle_id, "model": m["model"], "input_images": m.get("input_images"),
                "decision": m["decision"],
                "engines": [{k: e.get(k) for k in ("file", "format", "precision", "bytes", "parity", "decision")}
                            for e in m["engines"]],
                "metrics": m.get("metrics"), "size_bytes": b.size_bytes()})


# ------------------------------------------------------------------------------------------- runs
@main.group(cls=_Group)
def runs() -> None:
    """The run registry: every train / evaluate / export / bench run with its results (--registry PATH)."""


def _open_registry(ctx: click.Context) -> Any:
    from edgeinspect.registry import Registry

    return Registry.open(ctx.find_root().params.get("registry"))


def _get_runs(registry: Any, run_ids: tuple[str, ...]) -> list[dict]:
    found = [registry.get_run(run_id) for run_id in run_ids]
    missing = [run_id for run_id, run in zip(run_ids, found, strict=True) if run is None]
    if missing:
        raise click.ClickException(f"no run {', '.join(missing)} in the registry {registry.path} "
                                   f"(`edgeinspect runs list` shows the ids)")
    return found


def _headline(run: dict) -> str:
    """What sums a run up in the list: its image AUROC, else the first engine's runtime p50 (bench), else its
    first metric."""
    from edgeinspect.registry import cell, flatten

    metrics = flatten(run.get("metrics") or {})
    for suffix in ("image_auroc", "runtime_p50_ms"):
        key = next((k for k in metrics if k.split(".")[-1] == suffix and isinstance(metrics[k], int | float)), None)
        if key:
            return f"{key} {cell(metrics[key])}"
    return next((f"{k} {cell(v)}" for k, v in metrics.items()), "")


@runs.command("list")
@click.option("--family", default=None, help="Only runs of this model family.")
@click.option("--category", default=None, help="Only runs on this data category.")
@click.option("--command", "command", default=None, type=click.Choice(["train", "evaluate", "export", "bench"]),
              help="Only runs of this command.")
@click.option("--status", default=None, type=click.Choice(["running", "finished", "failed"]))
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1), help="Newest N runs.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per run and line.")
@click.pass_context
def runs_list(ctx: click.Context, family: str | None, category: str | None, command: str | None, status: str | None,
              limit: int, as_json: bool) -> None:
    """The newest runs, one per line: id, start, command, family, category, status, duration, headline metric."""
    with _open_registry(ctx) as registry:
        found = registry.list_runs(family=family, category=category, command=command, status=status, limit=limit)
    for run in found:
        if as_json:
            click.echo(json.dumps(run))
            continue
        duration = f"{run['duration_s']:.1f}s" if run["duration_s"] is not None else "-"
        click.echo(f"{run['id']}  {run['started'][:19]}  {run['command']:<8} {run['family'] or '-':<11} "
                   f"{run['category'] or '-':<12} {run['status']:<8} {duration:>8}  "
                   f"{_headline(run) or (run['error'] or '')[:60]}")


@runs.command("show")
@click.argument("run_id")
@click.pass_context
def runs_show(ctx: click.Context, run_id: str) -> None:
    """Everything recorded about one run (ID or a unique prefix of it), as JSON."""
    with _open_registry(ctx) as registry:
        _echo_json(_get_runs(registry, (run_id,))[0])


@runs.command("compare")
@click.argument("run_ids", nargs=-1, required=True)
@click.pass_context
def runs_compare(ctx: click.Context, run_ids: tuple[str, ...]) -> None:
    """Side-by-side table of the runs' metrics (one column per run)."""
    from edgeinspect.registry import compare_table

    with _open_registry(ctx) as registry:
        found = _get_runs(registry, run_ids)
    rows = compare_table(found)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(f"{cell:<{width}}" for cell, width in zip(row, widths, strict=True)).rstrip())


@runs.command("export")
@click.argument("out", default="-", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--csv", "as_csv", is_flag=True, help="CSV: one row per run, metrics flattened (the one format).")
@click.option("--family", default=None, help="Only runs of this model family.")
@click.option("--category", default=None, help="Only runs on this data category.")
@click.option("--command", "command", default=None, type=click.Choice(["train", "evaluate", "export", "bench"]))
@click.option("--limit", default=100000, show_default=True, type=click.IntRange(min=1), help="Newest N runs.")
@click.pass_context
def runs_export(ctx: click.Context, out: str, as_csv: bool, family: str | None, category: str | None,
                command: str | None, limit: int) -> None:
    """Write the runs as CSV to OUT (default: standard output): the run fields, then one column per metric."""
    from edgeinspect.registry import write_csv

    if not as_csv:
        raise click.UsageError("give the format: --csv (the one there is)")
    with _open_registry(ctx) as registry:
        found = registry.list_runs(family=family, category=category, command=command, limit=limit)
    if out == "-":
        write_csv(found, sys.stdout)
    else:
        with open(out, "w", newline="") as f:
            write_csv(found, f)
        click.echo(f"wrote {out}: {len(found)} runs", err=True)
