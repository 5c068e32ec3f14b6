"""TensorRT engines: built from ONNX graphs of the bundle with the TensorRT Python API.

Every network is strongly typed: its precision is the one its ONNX graph states, the only way TensorRT 11
builds (it removed the precision builder flags) and the one 10.x takes with ``STRONGLY_TYPED``. So FP32 builds
from the FP32 ONNX engine, FP16 from the FP16 ONNX engine (the extractor in FP16, the statistics, map head and
I/O in FP32, as gated for ONNX Runtime), and INT8 from an explicitly quantized graph (Q/DQ, no calibrator, the
path TensorRT recommends): the extractor in TensorRT's symmetric int8, the statistics refit on its features and
kept in float, gated first with ONNX Runtime as the INT8 ONNX engine is (``write_int8(explicit=True)``). The plan
is written with a JSON header (``runtime/backends/tensorrt.py``) that records the TensorRT version, GPU and DLA
core it was built for: a plan only runs where it was built.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeinspect.bundle import atomic_write_bytes
from edgeinspect.errors import ConfigError, ExportError
from edgeinspect.export.exporter import CannotBuildHere
from edgeinspect.export.onnx import write_int8
from edgeinspect.runtime.backends.tensorrt import TensorRTBackend, cuda_call, cudart, pack_plan, unpack_plan

if TYPE_CHECKING:
    from edgeinspect.export.exporter import ExportJob

log = logging.getLogger(__name__)


def gpu_name() -> str:
    """Name and compute capability of CUDA device 0."""
    props = cuda_call(cudart().cudaGetDeviceProperties(0))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return f"{name.strip(chr(0))} (sm_{props.major}{props.minor})"


def network_source(job: ExportJob, precision: str, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """The ONNX graph TensorRT builds the ``precision`` engine from, and what the manifest records of it."""
    if precision == "int8":
        path = workdir / "explicit_int8.onnx"
        return path, write_int8(job, path, job.metadata("tensorrt", precision), explicit=True)
    path = job.source_engine("onnx", precision)  # exported, with its own gate, when the bundle has none yet
    return path, {"source_engine": path.name}


def export_tensorrt(job: ExportJob, precision: str, path: Path) -> dict[str, Any]:
    """Build and write the plan at ``precision``; CannotBuildHere without TensorRT or a CUDA GPU."""
    cfg = job.settings["tensorrt"]
    dla_core = cfg.get("dla_core")
    if dla_core is not None and precision == "fp32":
        raise ConfigError("tensorrt.dla_core: DLA runs FP16 and INT8 only; export --precision fp16 or int8 for it, "
                          "or set tensorrt.dla_core=null to build FP32 for the GPU")
    reason = TensorRTBackend.unavailable_reason()
    if reason:
        raise CannotBuildHere(f"TensorRT engines are built on the GPU that runs them: {reason}")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # the flag is required on TensorRT 10.x and accepted (every network is strongly typed) on 11.x
    typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if typed is None else 1 << int(typed))
    parser = trt.OnnxParser(network, logger)
    with tempfile.TemporaryDirectory() as tmp:
        source, recorded = network_source(job, precision, Path(tmp))
        if not parser.parse(source.read_bytes(), str(source)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"TensorRT cannot parse the {precision} graph {source.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg["workspace_mb"]) << 20)
    if dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(dla_core)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    cache_path = Path(cfg["timing_cache"]).expanduser() if cfg.get("timing_cache") else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # a cache from another GPU or TensorRT
        log.warning("timing cache %s does not fit this GPU / TensorRT; starting an empty one", cache_path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT could not build a {precision} engine from {source.name} (see the log above)")
    timing_cache = config.get_timing_cache()
    if cache_path and timing_cache is not None:
        atomic_write_bytes(cache_path, bytes(timing_cache.serialize()))
    built = {"tensorrt_version": trt.__version__, "gpu": gpu_name(), "dla_core": dla_core, **recorded}
    atomic_write_bytes(path, pack_plan({**job.metadata("tensorrt", precision), **built}, bytes(plan)))
    return built


def write_decision(path: Path, decision: dict[str, Any]) -> None:
    """Replace the decision in a plan file's header by the one its gate gave the engine; the plan is kept."""
    header, plan = unpack_plan(path.read_bytes(), path)
    atomic_write_bytes(path, pack_plan({**header, "decision": decision}, plan))
