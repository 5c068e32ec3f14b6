"""Engine backends: run an exported engine on a preprocessed NCHW float32 tensor.

Every backend returns ``(anomaly_map N x 1 x H x W, score N)`` as float32 numpy arrays.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgeinspect.errors import BundleError, ConfigError

log = logging.getLogger(__name__)

# Short names accepted on the command line -> ONNX Runtime execution providers.
ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                 "tensorrt": "TensorrtExecutionProvider", "coreml": "CoreMLExecutionProvider"}


class OnnxRuntimeBackend:
    """An ONNX Runtime session on the requested execution providers (CPU always last)."""

    def __init__(self, path: str | Path, providers: tuple[str, ...] = ("cpu",), threads: int | None = None):
        import onnxruntime as ort

        unknown = [p for p in providers if p not in ORT_PROVIDERS]
        if unknown:
            raise ConfigError(f"unknown execution provider(s) {unknown}; choose from {list(ORT_PROVIDERS)}")
        available = set(ort.get_available_providers())
        wanted = [ORT_PROVIDERS[p] for p in providers]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise ConfigError(f"execution provider(s) {missing} are not available in this onnxruntime build "
                              f"(available: {sorted(available)}); install onnxruntime-gpu for cuda/tensorrt")
        if "CPUExecutionProvider" not in wanted:
            wanted.append("CPUExecutionProvider")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise BundleError(f"ONNX Runtime cannot load engine {path}: {exc}") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.input_shape = tuple(self.session.get_inputs()[0].shape)
        self.providers = self.session.get_providers()
        log.info("ONNX Runtime engine %s on %s", path, self.providers)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run one preprocessed batch whose shape matches the engine's fixed input shape."""
        amap, score = self.session.run(["anomaly_map", "score"], {self.input_name: x})
        return amap, score
