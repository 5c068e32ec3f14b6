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
from edgeinspect.export.formats import AUTO_ORDER
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


def auto_candidates(bundle: Bundle) -> list[dict[str, Any]]:
    """The engines `--engine auto` may take, in its order (``AUTO_ORDER`` of the format table): present, their
    backend runs here and their parity gate passed. A faiss engine (for very large memory banks) is taken only
    when asked for, `--engine faiss[:PRECISION]`."""
    entries = [bundle.find_engine(fmt, precision) for fmt, precision in AUTO_ORDER]
    return [e for e in entries if e and e.get("parity", {}).get("passed")
            and backend_class(e["format"]).unavailable_reason() is None]


def select_engine(bundle: Bundle, selector: str = "auto") -> dict[str, Any]:
    """The manifest entry of the engine to run: ``auto`` or ``FORMAT[:PRECISION]`` (BundleError if absent)."""
    if selector != "auto":
        return bundle.engine(*parse_selector(selector))[1]
    candidates = auto_candidates(bundle)
    if not candidates:
        raise _no_engine(bundle, "runs here with a passed parity check")
    return candidates[0]


def open_engine(bundle: Bundle, selector: str = "auto", providers: tuple[str, ...] = ("cpu",),
                threads: int | None = None, remote: str | None = None) -> tuple[dict[str, Any], Backend]:
    """(manifest entry, loaded backend) of the selected engine; logs which one was taken.

    ``auto`` skips an engine that cannot be opened (a damaged file, a TensorRT plan of another version),
    logging why, and takes the next one. ``remote``: the server address of an engine that runs on a server
    (Triton), for backends with ``remote = True``; an error for the others.
    """
    auto = selector == "auto"
    entries = auto_candidates(bundle) if auto else [select_engine(bundle, selector)]
    failures = []
    for entry in entries:
        name = f"{entry['format']}:{entry['precision']}"
        cls = backend_class(entry["format"])
        if remote and not getattr(cls, "remote", False):
            raise ConfigError(f"a server address (--triton-url {remote}) is only for engines that run on a server "
                              f"(--engine triton); {name} runs here")
        try:
            path, _ = bundle.engine(entry["format"], entry["precision"])  # verifies the sha256
            backend = cls(path, output_names=list(bundle.manifest["outputs"]), providers=providers, threads=threads,
                          **({"url": remote} if getattr(cls, "remote", False) else {}))
        except BundleError as exc:
            if not auto:
                raise
            log.warning("--engine auto: skipping %s, which cannot be opened: %s", name, exc)
            failures.append(f"{name}: {exc}")
            continue
        log.info("engine %s (%s) selected by --engine %s; %s", name, entry["file"], selector, backend.description)
        return entry, backend
    raise _no_engine(bundle, "runs here with a passed parity check"
                     + (f" and opens ({'; '.join(failures)})" if failures else ""))


def _no_engine(bundle: Bundle, wanted: str) -> BundleError:
    have = [f"{e['format']}:{e['precision']}" for e in bundle.engines] or ["none"]
    return BundleError(f"bundle {bundle.path} has no engine that {wanted} (it has: {', '.join(have)}); "
                       f"run: edgeinspect export {bundle.path} --format onnx")


__all__ = ["BACKENDS", "ORT_PROVIDERS", "Backend", "CoreMLBackend", "FaissBackend", "OnnxRuntimeBackend",
           "TensorRTBackend", "TritonBackend", "backend_class", "open_engine", "parse_selector", "select_engine"]
