"""Triton backend: the bundle's Triton model repository (``export --format triton``) served by a Triton
Inference Server, reached over gRPC with ``tritonclient``, for lines that share one GPU box.

The server loads ``engines/triton_<precision>`` (``tritonserver --model-repository ...``); this backend
reads the model's name and tensors from the repository's ``config.pbtxt`` and sends each preprocessed
frame to the server; pre- and post-processing stay on the line box. No torch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgeinspect.errors import BundleError, ConfigError, EngineError, SourceError

log = logging.getLogger(__name__)

HINT = "select it with --engine triton[:PRECISION] --triton-url HOST:8001 (the server's gRPC port)"


def read_model_config(repository: str | Path):  # -> model_config_pb2.ModelConfig
    """The ModelConfig of the one model in a repository, parsed with Triton's own protobuf."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    configs = sorted(Path(repository).glob("*/config.pbtxt"))
    if len(configs) != 1:
        raise BundleError(f"{repository} is not a Triton model repository of one model (found {len(configs)} "
                          f"config.pbtxt); export it again: edgeinspect export BUNDLE --format triton")
    try:
        return text_format.Parse(configs[0].read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise BundleError(f"{configs[0]} is not a valid Triton model config: {exc}") from None


class TritonBackend:
    """One model on a Triton server; :meth:`run` sends a preprocessed batch and returns its outputs."""

    remote = True  # runs on a server: open_engine hands it the server address

    def __init__(self, path: str | Path, *, output_names: list[str] | None = None, providers: tuple[str, ...] = (),
                 threads: int | None = None, url: str | None = None, timeout_s: float = 30.0):
        if not url:
            raise ConfigError(f"a Triton engine runs on a Triton Inference Server: {HINT}")
        try:
            import tritonclient.grpc as grpcclient
        except ImportError:
            raise ConfigError("tritonclient is not installed (pip install 'edgeinspect[triton]')") from None
        self._grpc = grpcclient
        config = read_model_config(path)
        self.model_name = config.name
        self.input_name = config.input[0].name
        self.output_names = output_names or [o.name for o in config.output]
        self.timeout_s = timeout_s
        self.url = url.split("://", 1)[-1]
        self.client = grpcclient.InferenceServerClient(self.url)
        try:
            ready = self.client.is_model_ready(self.model_name, client_timeout=timeout_s)
        except Exception as exc:  # tritonclient raises its own error types for an unreachable server
            raise SourceError(f"cannot reach the Triton server at {url}: {exc}") from None
        if not ready:
            raise SourceError(f"the Triton server at {url} has no ready model {self.model_name!r}; start it with "
                              f"tritonserver --model-repository {path}")
        self.description = f"Triton Inference Server at {self.url}, model {self.model_name} (gRPC)"
        log.info("Triton engine %s on %s", self.model_name, self.url)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend does not run on its own: it needs a server (and tritonclient)."""
        try:
            import tritonclient.grpc  # noqa: F401
        except ImportError:
            return "tritonclient is not installed (pip install 'edgeinspect[triton]')"
        return f"runs on a Triton Inference Server: {HINT}"

    def run(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """Infer one preprocessed batch on the server."""
        grpc = self._grpc
        inp = grpc.InferInput(self.input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(x, np.float32))
        try:
            result = self.client.infer(self.model_name, [inp], outputs=[grpc.InferRequestedOutput(n)
                                                                        for n in self.output_names],
                                       client_timeout=self.timeout_s)
        except Exception as exc:  # an unreachable or failing server: this frame gets an ERROR verdict
            raise EngineError(f"Triton inference on {self.url} failed: {exc}") from None
        return tuple(np.asarray(result.as_numpy(n), np.float32) for n in self.output_names)
