"""The table of engine formats: one row per format, what writes it and where it runs.

A format is one row here (its exporter and decision writer, imported only when used, and its place in
``--engine auto``) plus, where the engine runs in the line daemon, one backend in ``runtime/backends/``
registered under the same name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeinspect.errors import ConfigError, ExportError

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class EngineFormat:
    """One exportable engine format."""

    name: str                    # --format value
    path: str                    # where its engine goes inside a bundle, with {precision}
    precisions: tuple[str, ...]  # precisions this exporter can write
    runs_on: str                 # where its engine can be executed
    exporter: str                # "module:function" taking an ExportJob, returning extra manifest fields
    needs: str                   # the extra that installs what it needs
    decision_writer: str | None = None  # "module:function" (engine path, decision) putting the decision its gate
    #                                     gave the engine into the metadata inside it; None: not gated itself
    auto: tuple[str, ...] = ()   # precisions `--engine auto` takes, best first; (): only when named
    auto_rank: int = 0           # `--engine auto` tries the formats by this rank, lowest first

    def load_exporter(self) -> Callable[[Any], dict[str, Any]]:
        """Import and return the function that writes this format."""
        return _load(self.exporter)

    def write_decision(self, path: Path, decision: dict[str, Any]) -> None:
        """Put the engine's own decision (from its gate) into the metadata the engine at ``path`` carries."""
        if self.decision_writer is None:
            raise ExportError(f"the {self.name} format has no decision writer for its engine's own decision")
        _load(self.decision_writer)(path, decision)

    def relpath(self, precision: str) -> str:
        """Path of this format's engine at ``precision``, relative to the bundle."""
        return self.path.format(precision=precision)


def _load(spec: str) -> Callable[..., Any]:
    """The function a ``"module:function"`` column names, imported."""
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)


FORMATS: dict[str, EngineFormat] = {f.name: f for f in (
    EngineFormat("onnx", "engines/model_{precision}.onnx", PRECISIONS,
                 "ONNX Runtime: CPU, CUDA, TensorRT and CoreML execution providers",
                 "edgeinspect.export.onnx:export_onnx", "edgeinspect[export]",
                 "edgeinspect.export.onnx:write_decision", auto=("int8", "fp32"), auto_rank=2),
    EngineFormat("tensorrt", "engines/model_{precision}.engine", PRECISIONS,
                 "TensorRT runtime on the NVIDIA GPU (or Jetson) and TensorRT version it was built with",
                 "edgeinspect.export.tensorrt:export_tensorrt", "edgeinspect[tensorrt]",
                 "edgeinspect.export.tensorrt:write_decision", auto=("int8", "fp16", "fp32"), auto_rank=0),
    EngineFormat("coreml", "engines/model_{precision}.mlpackage", PRECISIONS,
                 "Core ML on macOS 13+ / iOS 16+ (CPU, GPU, Neural Engine)",
                 "edgeinspect.export.coreml:export_coreml", "edgeinspect[coreml]",
                 "edgeinspect.export.coreml:write_decision", auto=("fp16", "int8", "fp32"), auto_rank=1),
    # serves a gated engine of the bundle, whose parity and decision it carries: not gated itself
    EngineFormat("triton", "engines/triton_{precision}", PRECISIONS,
                 "Triton Inference Server (model repository around an ONNX or TensorRT engine)",
                 "edgeinspect.export.triton:export_triton", "edgeinspect[triton]"),
    EngineFormat("faiss", "engines/faiss_{precision}", PRECISIONS,
                 "ONNX Runtime for features and map head, a FAISS index for the memory-bank search "
                 "(PatchCore; banks too large for the in-graph search)",
                 "edgeinspect.export.faiss:export_faiss", "edgeinspect[faiss]",
                 "edgeinspect.export.faiss:write_decision"),
)}


def get_format(name: str) -> EngineFormat:
    """Row of the format table; ConfigError listing the choices when unknown."""
    if name not in FORMATS:
        raise ConfigError(f"unknown engine format {name!r}; choose one of {sorted(FORMATS)} or all")
    return FORMATS[name]


# `--engine auto`: the first engine present whose backend runs here and whose parity gate passed, in this order
# (the rows' ``auto`` precisions, formats by ``auto_rank``)
AUTO_ORDER: tuple[tuple[str, str], ...] = tuple(
    (f.name, precision) for f in sorted(FORMATS.values(), key=lambda f: f.auto_rank) for precision in f.auto)
