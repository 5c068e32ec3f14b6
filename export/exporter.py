"""Export a bundle's model to engines, check each against the PyTorch model, record it in the manifest.

One flow for every row of the format table: the row's exporter writes the engine through an
:class:`ExportJob` (which hands it the PyTorch model, source engines, calibration images and the
gate), then the engine runs on the bundle's check images with the runtime backend of its format,
is compared with PyTorch under the gate of its precision, and is recorded with its figures, or
deleted and refused. A format whose backend cannot run on this machine (CoreML off macOS) is
recorded with ``parity.status`` saying so. What the check images, the reference and the comparison
are depends on the bundle's task (anomaly map or detections): one object per task, from the table
:data:`checks.TASK_CHECKS`.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from edgeinspect.bundle import Bundle, bundle_target, sha256_path, size_path, staging_dir, swap_in
from edgeinspect.errors import ConfigError, EdgeInspectError, ExportError
from edgeinspect.export.checks import TASK_CHECKS, AnomalyMapCheck, DetectionsCheck
from edgeinspect.export.formats import FORMATS, PRECISIONS, EngineFormat, get_format
from edgeinspect.export.parity import DetectionParity, Parity
from edgeinspect.runtime.backends import backend_class
from edgeinspect.runtime.postprocess import bundle_task
from edgeinspect.train.models import AnomalyModel
from edgeinspect.train.trainer import load_model

log = logging.getLogger(__name__)


class CannotBuildHere(ExportError):
    """The engine cannot be built on this machine (no GPU, wrong platform); not a failure of the model."""


@dataclass
class ExportResult:
    """What happened to one (format, precision): written, skipped (cannot build here) or refused."""

    format: str
    precision: str
    status: str                 # "written", "skipped" or "refused"
    detail: str                 # path and parity, or the reason
    path: Path | None = None
    parity: Parity | DetectionParity | None = None

    def describe(self) -> str:
        """One line for people."""
        return f"{self.format}:{self.precision} {self.status}: {self.detail}"


@dataclass
class ExportJob:
    """Everything an exporter may need, built lazily and shared by the engines of one export run.

    ``dataset`` holds the check images of the bundle's task (see :meth:`open_data`): an MVTec category
    for anomaly models, a COCO folder for detectors. An engine refused or skipped once is not built again
    in the same job: the formats built on it get that outcome (``not_written``).
    """

    bundle: Bundle
    dataset: Any
    settings: dict[str, Any]
    progress: bool = True
    _checked: dict[tuple[str, str, str], tuple[Any, dict[str, Any] | None, float]] = field(default_factory=dict)
    not_written: dict[tuple[str, str], ExportResult] = field(default_factory=dict)

    @staticmethod
    def open_data(bundle: Bundle, data_root: str | Path | None = None, category: str | None = None) -> Any:
        """The check images of ``bundle``'s task: recorded in the bundle unless ``data_root``/``category``."""
        return TASK_CHECKS[bundle_task(bundle)].open_data(bundle, data_root, category)

    # ------------------------------------------------------------------------- what exporters use
    @cached_property
    def model(self) -> nn.Module:
        """The bundle's PyTorch model, on the CPU, in eval mode."""
        return load_model(self.bundle, "cpu")

    @cached_property
    def task(self) -> AnomalyMapCheck | DetectionsCheck:
        """Check images, PyTorch reference and comparison of the bundle's task."""
        return TASK_CHECKS[bundle_task(self.bundle)](self)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The fixed NCHW input shape of every engine."""
        return tuple(self.bundle.manifest["input"]["shape"])

    @property
    def output_names(self) -> list[str]:
        """Engine output names, in order."""
        return list(self.bundle.manifest["outputs"])

    def metadata(self, fmt: str, precision: str) -> dict[str, Any]:
        """What every engine carries inside its file, so a bare engine still says what it is (the bundle's
        decision, replaced by the engine's own where its gate gives it one: ``EngineFormat.write_decision``)."""
        m = self.bundle.manifest
        return {"bundle_id": self.bundle.bundle_id, "family": self.bundle.family, "format": fmt,
                "precision": precision, "task": bundle_task(self.bundle), "input": m["input"], "outputs": m["outputs"],
                "preprocess": m["preprocess"], "decision": self.bundle.decision,
                **({"detection": m["detection"]} if "detection" in m else {}),
                "edgeinspect_version": m["edgeinspect_version"]}

    def low_precision_prefixes(self) -> tuple[str, ...]:
        """ONNX node-name prefixes of the submodules that may run in FP16/INT8 (the rest stays float)."""
        return tuple(f"/{name}/" for name in self.model.low_precision_modules)

    def dynamic_int8_prefixes(self) -> tuple[str, ...]:
        """ONNX node-name prefixes of the float submodules whose constant-matrix MatMuls run in 8-bit integers
        in the INT8 engine (the model's ``dynamic_int8_modules``)."""
        return tuple(f"/{name}/" for name in self.model.dynamic_int8_modules)

    def source_engine(self, fmt: str, precision: str) -> Path:
        """Path of another engine of this bundle (exported first, with its own gate, when absent)."""
        entry = self.bundle.find_engine(fmt, precision)
        if entry is None:
            result = export_engine(self, get_format(fmt), precision)
            if result.status != "written":  # one that cannot be built here: this one cannot either
                raise (CannotBuildHere if result.status == "skipped" else ExportError)(
                    f"needs the {fmt}:{precision} engine, which was {result.status}: {result.detail}")
            entry = self.bundle.find_engine(fmt, precision)
        return self.bundle.path / entry["file"]

    def calibration_inputs(self, count: int) -> list[np.ndarray]:
        """``count`` preprocessed training images of the task's calibration images (INT8 calibration)."""
        return self.task.calibration_inputs(count)

    def refit_on_engine(self, engine: Path) -> AnomalyModel:
        """A copy of the model with its statistics fit on the features ``engine`` computes.

        The low-precision modules are stood in for by that part of the ONNX engine (run with ONNX
        Runtime) while ``fit`` runs on training's fit images, so the memory bank / Gaussians describe
        the quantized features the engine will see on the line, not the FP32 ones.
        """
        from edgeinspect.export.onnx import OnnxSubgraph

        model = copy.deepcopy(self.model)
        example = self.calibration_inputs(1)[0]
        for name in model.low_precision_modules:
            setattr(model, name, OnnxSubgraph(engine, f"/{name}/", getattr(self.model, name), example))
        batch_size = int(self.bundle.manifest["config"]["train"]["batch_size"])
        model.fit(self.task.fit_batches(batch_size), progress=self.progress)
        for name in model.low_precision_modules:
            setattr(model, name, getattr(self.model, name))
        return model

    def check(self, fmt: str, precision: str, path: Path) -> tuple[Parity | DetectionParity, dict[str, Any] | None,
                                                                    float]:
        """Run the engine on the task's check images and apply its gate (see ``checks.AnomalyMapCheck.check``).

        Returns (parity, the engine's own decision or None (anomaly engines whose gate has no score
        tolerance, INT8 and faiss, get one), engine ms per image).
        """
        key = (fmt, precision, sha256_path(path))
        if key not in self._checked:  # an exporter that retries (INT8) already checked this very file
            self._checked[key] = self.task.check(fmt, precision, path)
        return self._checked[key]


# ------------------------------------------------------------------------------------------ the flow
def export_engine(job: ExportJob, engine_format: EngineFormat, precision: str) -> ExportResult:
    """Write, check and record one engine; a refused engine is deleted, an existing one kept until then.

    An engine refused or skipped earlier in the job is not built again: its result is returned.
    """
    key = (engine_format.name, precision)
    if key not in job.not_written:
        result = _write_engine(job, engine_format, precision)
        if result.status == "written":
            return result
        job.not_written[key] = result
    return job.not_written[key]


def _write_engine(job: ExportJob, engine_format: EngineFormat, precision: str) -> ExportResult:
    """:func:`export_engine` of an engine not tried yet in the job."""
    fmt = engine_format.name
    if precision not in engine_format.precisions:
        raise ConfigError(f"{fmt} export supports precision {list(engine_format.precisions)}, not {precision!r}")
    rel = engine_format.relpath(precision)
    final = job.bundle.path / rel
    tmp = final.with_name(f".tmp-{final.name}")  # keeps the suffix: some writers insist on it
    tmp.parent.mkdir(parents=True, exist_ok=True)
    _remove(tmp)
    t0 = time.perf_counter()
    try:
        extra = engine_format.load_exporter()(job, precision, tmp)
    except ImportError as exc:
        _remove(tmp)
        return ExportResult(fmt, precision, "skipped", f"{exc}; install {engine_format.needs}")
    except EdgeInspectError as exc:
        _remove(tmp)
        status = "skipped" if isinstance(exc, CannotBuildHere) else "refused"
        return ExportResult(fmt, precision, status, str(exc))
    except BaseException:
        _remove(tmp)
        raise
    export_seconds = time.perf_counter() - t0

    entry: dict[str, Any] = {"file": rel, "format": fmt, "precision": precision, "runs_on": engine_format.runs_on,
                             "input": job.bundle.manifest["input"], "export_seconds": round(export_seconds, 2),
                             **extra}
    parity = None
    if "parity" not in entry:  # formats that wrap a checked engine (Triton) bring that engine's parity
        reason = backend_class(fmt).unavailable_reason()
        if reason:
            entry["parity"] = {"status": "not run", "reason": reason}
        else:
            parity, decision, ms = job.check(fmt, precision, tmp)
            if not parity.passed:
                _remove(tmp)
                return ExportResult(fmt, precision, "refused", f"gate failed: {parity.describe()}", parity=parity)
            entry["parity"] = {"status": "passed", **parity.to_dict()}
            entry["ms_per_image"] = {"torch_cpu": round(job.task.reference_ms, 2), "engine": round(ms, 2)}
            if decision:  # the engine file states the threshold it is run with, not the bundle's
                entry["decision"] = decision
                engine_format.write_decision(tmp, decision)
    _remove(final)
    tmp.rename(final)
    job.bundle.set_engine(entry)
    job.bundle.save()
    size = size_path(final) / 1e6
    detail = f"{final} ({size:.1f} MB); " + (parity.describe() if parity else
                                              f"parity {entry['parity'].get('reason') or entry['parity']['status']}")
    log.info("%s:%s written: %s", fmt, precision, detail)
    return ExportResult(fmt, precision, "written", detail, final, parity)


def export_bundle(bundle_path: str | Path, fmt: str = "onnx", precision: str = "fp32", *,
                  settings: dict[str, Any] | None = None, data_root: str | Path | None = None,
                  category: str | None = None, progress: bool = True) -> list[ExportResult]:
    """Export ``fmt`` (a format or ``all``) at ``precision`` (a precision or ``all``); one result per engine.

    The check images come from the dataset recorded in the manifest unless ``data_root``/``category``
    are given. Raises ExportError when a single requested engine is refused or cannot be built.
    """
    from edgeinspect.config import load_config, validate
    from edgeinspect.train.models import get_model_class

    target = bundle_target(bundle_path)
    original = Bundle.open(target)
    get_model_class(original.family)  # a bundle of a family this edgeinspect does not know: fail first
    formats = list(FORMATS.values()) if fmt == "all" else [get_format(fmt)]
    if precision != "all" and precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)} or all")
    settings = validate("export", settings) if settings is not None else load_config("export")
    dataset = ExportJob.open_data(original, data_root, category)
    staged = staging_dir(target)
    try:
        bundle = original.staged_copy(staged)
        results = _export_all(ExportJob(bundle, dataset, settings, progress), formats, precision, fmt == "all")
        if bundle.manifest != original.manifest:
            swap_in(staged, target)
    except EdgeInspectError as exc:
        shutil.rmtree(staged, ignore_errors=True)
        raise type(exc)(str(exc).replace(str(staged), str(target))) from exc
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    shutil.rmtree(staged, ignore_errors=True)  # nothing new was written: the copy goes
    for result in results:  # reported where the engines live now
        result.detail = result.detail.replace(str(staged), str(target))
        result.path = target / result.path.relative_to(staged) if result.path else None
    if len(results) == 1 and results[0].status != "written":
        raise (CannotBuildHere if results[0].status == "skipped" else ExportError)(results[0].describe())
    return results


def _export_all(job: ExportJob, formats: list[EngineFormat], precision: str, keep: bool) -> list[ExportResult]:
    """Export every requested (format, precision) into the job's bundle; ``keep`` engines already there."""
    results = []
    for engine_format in formats:
        for p in (engine_format.precisions if precision == "all" else (precision,)):
            done = job.bundle.find_engine(engine_format.name, p) if keep else None
            path = job.bundle.path / done["file"] if done else None
            results.append(ExportResult(engine_format.name, p, "written", f"{path} (kept)", path) if done else
                           export_engine(job, engine_format, p))
    return results


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)

