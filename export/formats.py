"""The table of engine formats: one row per format, what writes it and where it runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgeinspect.errors import ConfigError


@dataclass(frozen=True)
class EngineFormat:
    """One exportable engine format; the exporter is imported only when it is used."""

    name: str                    # --format value
    suffix: str                  # file suffix under engines/
    precisions: tuple[str, ...]  # precisions this exporter can write
    runs_here: str               # where its engine can be executed
    load_exporter: Callable[[], Callable[..., Path]]

    @property
    def exporter(self) -> Callable[..., Path]:
        """The function that writes this format."""
        return self.load_exporter()


def _onnx_exporter() -> Callable[..., Path]:
    from edgeinspect.export.onnx import export_onnx

    return export_onnx


FORMATS: dict[str, EngineFormat] = {f.name: f for f in (
    EngineFormat("onnx", ".onnx", ("fp32",), "ONNX Runtime: CPU, CUDA, TensorRT and CoreML execution providers",
                 _onnx_exporter),
)}


def get_format(name: str) -> EngineFormat:
    """Row of the format table; ConfigError listing the choices when unknown."""
    if name not in FORMATS:
        raise ConfigError(f"unknown engine format {name!r}; choose one of {sorted(FORMATS)}")
    return FORMATS[name]
