"""Engine backends: one per engine format, and the choice of which engine of a bundle to run.

Every backend takes ``(path, output_names=, providers=, threads=)``, says why it cannot run here with
``unavailable_reason()`` (None when it can), and returns the engine outputs from ``run(x)`` as
float32 numpy arrays in ``output_names`` order. None of them imports torch.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np

from edgeinspect.bundle import Bundle
from edgeinspect.errors import BundleError, ConfigError
from edgeinspect.runtime.backends.coreml import CoreMLBackend
from edgeinspect.runtime.backends.faiss import FaissBackend
from edgeinspect.runtime.backends.onnx import ORT_PROVIDERS, OnnxRuntimeBackend
from edgeinspect.runtime.backends.tensorrt import TensorRTBackend
from edgeinspect.runtime.backends.triton import TritonBackend

log = logging.getLogger(__name__)


class Backend(Protocol):
    """What the predictor needs of a backend."""

    description: str

    def run(self, x: np.ndarray) -> tuple[np.ndarray, ...]: ...


BACKENDS: dict[str, type] = {"onnx": OnnxRuntimeBackend, "tensorrt": TensorRTBackend, "coreml": CoreMLBackend,
                             "triton": TritonBackend, "faiss": FaissBackend}

# `--engine auto`: the first engine present whose backend runs here and whose parity gate passed. A faiss
# engine (for very large memory banks) is taken only when asked for, `--engine faiss[:PRECISION]`.
AUTO_ORDER: tuple[tuple[str, str], ...] = (
    ("tensorrt", "int8"), ("tensorrt", "fp16"), ("tensorrt", "fp32"),
    ("coreml", "fp16"), ("coreml", "int8"), ("coreml", "fp32"),
    ("onnx", "int8"), ("onnx", "fp32"),
)


def backend_class(fmt: str) -> type:
    """The runtime backend of an engine format; ConfigError when the format has none."""
    try:
        return BACKENDS[fmt]
    except KeyError:
        raise ConfigError(f"engine format {fmt!r} has no runtime backend here (backends: {sorted(BACKENDS)})") from None


def parse_selector(selector: str) -> tuple[str, str]:
    """``FORMAT[:PRECISION]`` -> (format, precision); precision defaults to fp32."""
    fmt, _, precision = selector.partition(":")
    backend_class(fmt)
    return fmt, precision or "fp32"


def select_engine(bundle: Bundle, selector: str = "auto") -> dict[str, Any]:
    """The manifest entry of the engine to run: ``auto`` or ``FORMAT[:PRECISION]`` (BundleError if absent)."""
    if selector != "auto":
        return bundle.engine(*parse_selector(selector))[1]
    for fmt, precision in AUTO_ORDER:
        entry = bundle.find_engine(fmt, precision)
        if entry and entry.get("parity", {}).get("passed") and BACKENDS[fmt].unavailable_reason() is None:
            return entry
    have = [f"{e['format']}:{e['precision']}" for e in bundle.engines] or ["none"]
    raise BundleError(f"bundle {bundle.path} has no engine that runs here with a passed parity check (it has: "
                      f"{', '.join(have)}); run: edgeinspect export {bundle.path} --format onnx")


def open_engine(bundle: Bundle, selector: str = "auto", providers: tuple[str, ...] = ("cpu",),
                threads: int | None = None, remote: str | None = None) -> tuple[dict[str, Any], Backend]:
    """(manifest entry, loaded backend) of the selected engine; logs which one was taken.

    ``remote``: the server address of an engine that runs on a server (Triton), for backends with
    ``remote = True``; an error for the others.
    """
    entry = select_engine(bundle, selector)
    cls = backend_class(entry["format"])
    if remote and not getattr(cls, "remote", False):
        raise ConfigError(f"a server address (--triton-url {remote}) is only for engines that run on a server "
                          f"(--engine triton); {entry['format']}:{entry['precision']} runs here")
    path, _ = bundle.engine(entry["format"], entry["precision"])  # verifies the sha256
    backend = cls(path, output_names=list(bundle.manifest["outputs"]), providers=providers, threads=threads,
                  **({"url": remote} if getattr(cls, "remote", False) else {}))
    log.info("engine %s:%s (%s) selected by --engine %s; %s", entry["format"], entry["precision"], entry["file"],
             selector, backend.description)
    return entry, backend


__all__ = ["BACKENDS", "ORT_PROVIDERS", "Backend", "CoreMLBackend", "FaissBackend", "OnnxRuntimeBackend",
           "TensorRTBackend", "TritonBackend", "backend_class", "open_engine", "parse_selector", "select_engine"]
