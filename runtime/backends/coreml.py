"""Core ML backend: an ML program package run with coremltools' ``MLModel.predict`` (macOS only)."""

from __future__ import annotations

import logging
import platform
import sys
from pathlib import Path

import numpy as np

from edgeinspect.errors import ConfigError

log = logging.getLogger(__name__)


class CoreMLBackend:
    """Loads an ``.mlpackage`` once; :meth:`run` predicts one preprocessed batch."""

    def __init__(self, path: str | Path, *, output_names: list[str] | None = None,
                 providers: tuple[str, ...] = (), threads: int | None = None):
        reason = self.unavailable_reason()
        if reason:
            raise ConfigError(f"cannot run Core ML engine {path}: {reason}")
        import coremltools as ct

        # the compute units chosen at export (configs/export.yaml coreml.compute_units) travel in the package
        meta = ct.models.MLModel(str(path), skip_model_load=True).user_defined_metadata
        compute_units = meta.get("compute_units", "ALL")
        self.model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit[compute_units])
        description = self.model.get_spec().description
        self.input_name = description.input[0].name
        self.output_names = output_names or [o.name for o in description.output]
        self.description = f"Core ML (coremltools {ct.__version__}, {compute_units}) on macOS {platform.mac_ver()[0]}"
        log.info("Core ML engine %s (%s)", path, self.description)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here, or None."""
        if sys.platform != "darwin":
            return f"Core ML prediction runs only on macOS (this is {sys.platform})"
        try:
            import coremltools  # noqa: F401
        except ImportError:
            return "coremltools is not installed (pip install 'edgeinspect[coreml]')"
        return None

    def run(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """Predict one preprocessed batch."""
        out = self.model.predict({self.input_name: x})
        return tuple(np.asarray(out[name], np.float32) for name in self.output_names)
