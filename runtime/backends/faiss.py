"""FAISS backend: a ``faiss`` engine directory (export/faiss.py) run as ONNX Runtime features, a FAISS
nearest-neighbour search over the memory bank, and the ONNX Runtime map head."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from edgeinspect.errors import BundleError, ConfigError
from edgeinspect.runtime.backends.onnx import OnnxRuntimeBackend

log = logging.getLogger(__name__)


class FaissBackend:
    """The three parts of a faiss engine, loaded once; :meth:`run` scores one preprocessed batch."""

    def __init__(self, path: str | Path, *, output_names: list[str] | None = None,
                 providers: tuple[str, ...] = ("cpu",), threads: int | None = None):
        reason = self.unavailable_reason()
        if reason:
            raise ConfigError(f"cannot run FAISS engine {path}: {reason}")
        import faiss

        self._faiss = faiss
        path = Path(path)
        try:
            spec = json.loads((path / "engine.json").read_text())
            parts = {key: path / spec[key] for key in ("features", "index", "head")}
            patches, bank_shape = str(spec["patches"]), [int(n) for n in spec["bank_shape"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"FAISS engine {path} has no readable engine.json: {exc!r}") from exc
        self.features = OnnxRuntimeBackend(parts["features"], output_names=[patches], providers=providers,
                                           threads=threads, spinning=False)
        self.head = OnnxRuntimeBackend(parts["head"], output_names=output_names, providers=providers,
                                       threads=threads, spinning=False)
        try:
            self.index = faiss.read_index(str(parts["index"]))
        except RuntimeError as exc:
            raise BundleError(f"FAISS cannot read the index {parts['index']}: {exc}") from exc
        if [self.index.ntotal, self.index.d] != bank_shape:
            raise BundleError(f"FAISS index {parts['index']} holds {self.index.ntotal} x {self.index.d}, its "
                              f"engine.json says {bank_shape[0]} x {bank_shape[1]}")
        try:
            if spec.get("search_parameters"):
                faiss.ParameterSpace().set_index_parameters(self.index, spec["search_parameters"])
        except RuntimeError as exc:
            raise BundleError(f"FAISS engine {path}: search parameters {spec['search_parameters']!r}: {exc}") from exc
        self.threads = threads
        self.output_names = self.head.output_names
        self.description = (f"FAISS {faiss.__version__} {spec.get('index_factory')} "
                            f"({spec.get('search_parameters') or 'default search'}) over {self.index.ntotal} "
                            f"entries, {self.features.description}")
        log.info("FAISS engine %s: %s", path, self.description)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here, or None."""
        try:
            import faiss  # noqa: F401
        except ImportError:
            return "faiss is not installed (pip install 'edgeinspect[faiss]')"
        return OnnxRuntimeBackend.unavailable_reason()

    def run(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """Features, nearest bank entry of every patch, map head."""
        if self.threads:  # OpenMP's thread count is per calling thread: set it in the thread that searches
            self._faiss.omp_set_num_threads(self.threads)
        (patches,) = self.features.run(x)
        squared, _ = self.index.search(np.ascontiguousarray(patches, np.float32), 1)
        distances = np.sqrt(np.maximum(squared[:, 0], 0.0)).reshape(self.head.input_shape)
        return self.head.run(distances)
