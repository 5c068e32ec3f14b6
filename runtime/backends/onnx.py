"""ONNX Runtime backend: any ONNX engine (FP32, FP16, INT8 QDQ) on the CPU, CUDA, TensorRT or CoreML providers."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgeinspect.device import saturates_eight_bit_weights
from edgeinspect.errors import BundleError, ConfigError

log = logging.getLogger(__name__)

# Short names accepted on the command line -> ONNX Runtime execution providers.
ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                 "tensorrt": "TensorrtExecutionProvider", "coreml": "CoreMLExecutionProvider"}
WEIGHT_BITS_KEY = "int8_weight_bits"  # metadata_props of an INT8 engine: 7 or 8 (export int8.reduce_range)
EXACT_PRODUCTS = "session.x64quantprecision"  # ONNX Runtime: uint8 x uint8 products on x86 CPUs without VNNI


def needs_exact_products(metadata: Mapping[str, str]) -> bool:
    """Whether an engine with these ONNX ``metadata_props`` must run ONNX Runtime's exact uint8 x uint8 products
    (``session.x64quantprecision``) here: its INT8 weights take 8 bits and this CPU's uint8 x int8 kernels could
    saturate them (:func:`edgeinspect.device.saturates_eight_bit_weights`). Only then: on a VNNI CPU the option
    gives the same numbers at half the speed (a Zen 5 EPYC: PaDiM INT8 engine 3.4 against 1.8 ms)."""
    return metadata.get(WEIGHT_BITS_KEY) == "8" and saturates_eight_bit_weights()


class OnnxRuntimeBackend:
    """An ONNX Runtime session on the requested execution providers (CPU always last)."""

    def __init__(self, path: str | Path, *, output_names: list[str] | None = None,
                 providers: tuple[str, ...] = ("cpu",), threads: int | None = None, spinning: bool = True):
        """``spinning`` False: the session's idle worker threads sleep at once instead of spinning for the next
        run (for sessions that take turns with other thread pools on the same cores, as in a faiss engine)."""
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
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = self._open(path, options, wanted)
        if needs_exact_products(self.session.get_modelmeta().custom_metadata_map):
            options.add_session_config_entry(EXACT_PRODUCTS, "1")
            self.session = self._open(path, options, wanted)
            log.info("%s: 8-bit INT8 weights on an x86 CPU without VNNI: ONNX Runtime's exact uint8 x uint8 products "
                     "(%s), slower than its uint8 x int8 ones, which could saturate here", path, EXACT_PRODUCTS)
        self.input_name = self.session.get_inputs()[0].name
        self.input_shape = tuple(self.session.get_inputs()[0].shape)
        self.output_names = output_names or [o.name for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()
        self.description = f"ONNX Runtime {ort.__version__} on {', '.join(self.providers)}"
        log.info("ONNX Runtime engine %s on %s", path, self.providers)

    @staticmethod
    def _open(path: str | Path, options: Any, providers: list[str]) -> Any:
        import onnxruntime as ort

        try:
            return ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise BundleError(f"ONNX Runtime cannot load engine {path}: {exc}") from exc

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here, or None."""
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnxruntime is not installed (pip install edgeinspect[runtime])"
        return None

    def run(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """Run one preprocessed batch whose shape matches the engine's fixed input shape."""
        return tuple(self.session.run(self.output_names, {self.input_name: x}))
