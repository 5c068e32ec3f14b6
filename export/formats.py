"""The table of engine formats: one row per format, what writes it and where it runs.

A format is one row here (its exporter, imported only when used) plus, where the engine runs in
the line daemon, one backend in ``runtime/backends/`` registered under the same name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgeinspect.errors import ConfigError

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

    def load_exporter(self) -> Callable[[Any], dict[str, Any]]:
        """Import and return the function that writes this format."""
        module, _, function = self.exporter.partition(":")
        return getattr(importlib.import_module(module), function)

    def relpath(self, precision: str) -> str:
        """Path of this format's engine at ``precision``, relative to the bundle."""
        return self.path.format(precision=precision)


FORMATS: dict[str, EngineFormat] = {f.name: f for f in (
    EngineFormat("onnx", "engines/model_{precision}.onnx", PRECISIONS,
                 "ONNX Runtime: CPU, CUDA, TensorRT and CoreML execution providers",
                 "edgeinspect.export.onnx:export_onnx", "edgeinspect[export]"),
    EngineFormat("tensorrt", "engines/model_{precision}.engine", PRECISIONS,
                 "TensorRT runtime on the NVIDIA GPU (or Jetson) and TensorRT version it was built with",
                 "edgeinspect.export.tensorrt:export_tensorrt", "edgeinspect[tensorrt]"),
    EngineFormat("coreml", "engines/model_{precision}.mlpackage", PRECISIONS,
                 "Core ML on macOS 13+ / iOS 16+ (CPU, GPU, Neural Engine)",
                 "edgeinspect.export.coreml:export_coreml", "edgeinspect[coreml]"),
    EngineFormat("triton", "engines/triton_{precision}", PRECISIONS,
                 "Triton Inference Server (model repository around an ONNX or TensorRT engine)",
                 "edgeinspect.export.triton:export_triton", "edgeinspect[triton]"),
    EngineFormat("faiss", "engines/faiss_{precision}", PRECISIONS,
                 "ONNX Runtime for features and map head, a FAISS index for the memory-bank search "
                 "(PatchCore; banks too large for the in-graph search)",
                 "edgeinspect.export.faiss:export_faiss", "edgeinspect[faiss]"),
)}


def get_format(name: str) -> EngineFormat:
    """Row of the format table; ConfigError listing the choices when unknown."""
    if name not in FORMATS:
        raise ConfigError(f"unknown engine format {name!r}; choose one of {sorted(FORMATS)} or all")
    return FORMATS[name]
