"""TensorRT backend: a serialized plan run with the TensorRT Python runtime and cuda-python (no torch).

A plan file is ``4-byte little-endian header length + JSON header + TensorRT plan``: the header
holds the bundle metadata and the TensorRT version, GPU and DLA core the plan was built for, so a
bare ``.engine`` file still says what it is. A plan only runs with the TensorRT version that built it
(and on the same GPU model); another version is refused with a clear error before deserializing.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np

from edgeinspect.errors import BundleError, ConfigError

log = logging.getLogger(__name__)

INSTALL_HINT = ("pip install 'edgeinspect[tensorrt]' on a machine with an NVIDIA GPU and driver "
                "(on Jetson, TensorRT comes with JetPack)")


def pack_plan(header: dict[str, Any], plan: bytes) -> bytes:
    """The bytes of a plan file: header length, JSON header, plan."""
    meta = json.dumps(header).encode()
    return struct.pack("<I", len(meta)) + meta + plan


def unpack_plan(data: bytes, path: str | Path = "<plan>") -> tuple[dict[str, Any], bytes]:
    """(header, plan) of a plan file's bytes; BundleError when it is not one."""
    try:
        (length,) = struct.unpack("<I", data[:4])
        header = json.loads(data[4:4 + length])
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not an edgeinspect TensorRT plan (no readable header): {exc}") from exc
    if not isinstance(header, dict) or "tensorrt_version" not in header:
        raise BundleError(f"{path} is not an edgeinspect TensorRT plan (header without tensorrt_version)")
    return header, data[4 + length:]


def check_plan_version(header: dict[str, Any], installed: str, path: str | Path) -> None:
    """Refuse a plan built by another TensorRT version than ``installed``."""
    built = header.get("tensorrt_version")
    if built != installed:
        raise BundleError(f"TensorRT plan {path} was built with TensorRT {built} on {header.get('gpu', '?')}; "
                          f"this machine has TensorRT {installed}. A plan runs only with the TensorRT version "
                          f"(and GPU model) that built it: re-export it here with "
                          f"`edgeinspect export BUNDLE --format tensorrt --precision "
                          f"{header.get('precision', 'fp16')}`")


def cudart() -> Any:
    """cuda-python's runtime API module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime
    return runtime


def cuda_call(result: Any) -> Any:
    """Unwrap a cuda-python ``(error, value...)`` result; RuntimeError naming the CUDA error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    runtime = cudart()
    if err != runtime.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA error {err}: {runtime.cudaGetErrorString(err)[1]}")
    return values[0] if len(values) == 1 else values


def output_allocator(trt: Any) -> Any:
    """A ``trt.IOutputAllocator`` for outputs whose shape depends on the data (Mask R-CNN's detections): TensorRT
    asks it for device memory during execution, and it keeps one buffer per output that grows when a run needs
    more, and the shape TensorRT reports."""

    class GrowingOutputs(trt.IOutputAllocator):
        def __init__(self) -> None:
            trt.IOutputAllocator.__init__(self)
            self.address: dict[str, int] = {}
            self.capacity: dict[str, int] = {}
            self.shape: dict[str, tuple[int, ...]] = {}

        def reallocate_output(self, tensor_name: str, memory: int, size: int, alignment: int) -> int | None:
            size = max(int(size), 1)
            if self.capacity.get(tensor_name, 0) < size:  # cudaMalloc's 256-byte alignment covers TensorRT's
                try:
                    if tensor_name in self.address:
                        cuda_call(cudart().cudaFree(self.address.pop(tensor_name)))
                    self.address[tensor_name] = cuda_call(cudart().cudaMalloc(size))
                except RuntimeError as exc:
                    log.error("no device memory for TensorRT output %s (%d bytes): %s", tensor_name, size, exc)
                    return None  # TensorRT then fails the run
                self.capacity[tensor_name] = size
            return self.address[tensor_name]

        def reallocate_output_async(self, tensor_name: str, memory: int, size: int, alignment: int,
                                    stream: Any) -> int | None:
            return self.reallocate_output(tensor_name, memory, size, alignment)

        def notify_shape(self, tensor_name: str, shape: Any) -> None:
            self.shape[tensor_name] = tuple(shape)

    return GrowingOutputs()


class TensorRTBackend:
    """Deserializes a plan once; :meth:`run` copies the input in, executes, copies outputs back. Outputs of a
    fixed shape have their buffers from the start; those whose shape depends on the data get theirs from
    :func:`output_allocator` during the run. One execution context, stream and set of buffers serve every
    call, so a lock makes :meth:`run` one call at a time (the daemon's cameras share a backend)."""

    def __init__(self, path: str | Path, *, output_names: list[str] | None = None,
                 providers: tuple[str, ...] = (), threads: int | None = None):
        reason = self.unavailable_reason()
        if reason:
            raise ConfigError(f"cannot run TensorRT engine {path}: {reason}")
        import tensorrt as trt

        header, plan = unpack_plan(Path(path).read_bytes(), path)
        check_plan_version(header, trt.__version__, path)
        rt = cudart()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if header.get("dla_core") is not None:
            self.runtime.DLA_core = int(header["dla_core"])
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BundleError(f"TensorRT could not deserialize {path} (built for {header.get('gpu')})")
        self.context = self.engine.create_execution_context()
        self._lock = threading.Lock()
        self.stream = cuda_call(rt.cudaStreamCreate())
        self.host: dict[str, np.ndarray] = {}
        self.device: dict[str, int] = {}
        self.data_dependent: dict[str, np.dtype] = {}  # output name -> dtype
        self.inputs: list[str] = []
        outputs = []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else outputs).append(name)
            if not is_input and min(shape, default=0) < 0:
                self.data_dependent[name] = dtype
                continue
            host = np.empty(shape, dtype)
            self.host[name], self.device[name] = host, cuda_call(rt.cudaMalloc(host.nbytes))
            self.context.set_tensor_address(name, self.device[name])
        self.allocator = output_allocator(trt) if self.data_dependent else None
        for name in self.data_dependent:
            self.context.set_output_allocator(name, self.allocator)
        self.output_names = output_names or outputs
        self.description = f"TensorRT {trt.__version__} on {header.get('gpu', 'GPU')}"
        log.info("TensorRT engine %s (%s)", path, self.description)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here, or None."""
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return f"TensorRT is not installed ({INSTALL_HINT})"
        try:
            rt = cudart()
        except ImportError:
            return f"cuda-python is not installed ({INSTALL_HINT})"
        err, count = rt.cudaGetDeviceCount()
        if err != rt.cudaError_t.cudaSuccess or count == 0:
            return f"no CUDA GPU is visible ({err})"
        return None

    def run(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """Run one preprocessed batch of the engine's fixed input shape; thread-safe (calls take turns on
        the one context, stream and buffers)."""
        with self._lock:
            rt = cudart()
            name = self.inputs[0]
            host = self.host[name]
            np.copyto(host, x.reshape(host.shape), casting="same_kind")
            h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
            cuda_call(rt.cudaMemcpyAsync(self.device[name], host.ctypes.data, host.nbytes, h2d, self.stream))
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            results = []
            for out in self.output_names:
                if out in self.data_dependent:  # its shape and memory are known only now (none for an empty output)
                    host = np.empty(self.allocator.shape[out], self.data_dependent[out])
                    device = self.allocator.address.get(out, 0)
                else:
                    host, device = self.host[out], self.device[out]
                if host.nbytes:
                    cuda_call(rt.cudaMemcpyAsync(host.ctypes.data, device, host.nbytes, d2h, self.stream))
                results.append(host)
            cuda_call(rt.cudaStreamSynchronize(self.stream))
            return tuple(host.astype(np.float32, copy=True) for host in results)

    def __del__(self) -> None:
        device = getattr(self, "device", {})
        allocator = getattr(self, "allocator", None)
        if device:
            rt = cudart()
            for ptr in [*device.values(), *(allocator.address.values() if allocator else ())]:
                rt.cudaFree(ptr)
            rt.cudaStreamDestroy(self.stream)
