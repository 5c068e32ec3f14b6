"""TensorRT engines: built from the bundle's ONNX engine with the TensorRT Python API.

FP32 and FP16 build from the FP32 ONNX graph (FP16 with the statistics and map head held in FP32
by precision constraints); INT8 builds from the gated INT8 QDQ graph (explicit quantization, the
path current TensorRT recommends, no calibrator), its dynamically quantized MatMuls (PatchCore's
search, which TensorRT's parser does not take) turned back into float MatMuls. The plan is written with a JSON header
(``runtime/backends/tensorrt.py``) that records the TensorRT version, GPU and DLA core it was built
for: a plan only runs where it was built.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from edgeinspect.bundle import atomic_write_bytes
from edgeinspect.errors import ExportError
from edgeinspect.export.exporter import CannotBuildHere
from edgeinspect.export.onnx import dequantize_dynamic_matmuls
from edgeinspect.runtime.backends.tensorrt import TensorRTBackend, cuda_call, cudart, pack_plan

if TYPE_CHECKING:
    from edgeinspect.export.exporter import ExportJob


def gpu_name() -> str:
    """Name and compute capability of CUDA device 0."""
    props = cuda_call(cudart().cudaGetDeviceProperties(0))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return f"{name.strip(chr(0))} (sm_{props.major}{props.minor})"


def export_tensorrt(job: ExportJob, precision: str, path: Path) -> dict[str, Any]:
    """Build and write the plan at ``precision``; CannotBuildHere without TensorRT or a CUDA GPU."""
    reason = TensorRTBackend.unavailable_reason()
    if reason:
        raise CannotBuildHere(f"TensorRT engines are built on the GPU that runs them: {reason}")
    import tensorrt as trt

    cfg = job.settings["tensorrt"]
    source = job.source_engine("onnx", "int8" if precision == "int8" else "fp32")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    explicit_batch = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)  # implicit since TRT 10
    network = builder.create_network(0 if explicit_batch is None else 1 << int(explicit_batch))
    parser = trt.OnnxParser(network, logger)
    graph = onnx.load(str(source))
    dequantize_dynamic_matmuls(graph.graph)  # TensorRT parses no integer MatMuls; its GPU runs them in float
    if not parser.parse(graph.SerializeToString(), str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {source}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg["workspace_mb"]) << 20)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # INT8 graphs run their float remainder in FP16 where allowed
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    if precision != "fp32":
        _keep_statistics_in_fp32(trt, network, config, job.low_precision_prefixes())
    if cfg.get("dla_core") is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(cfg["dla_core"])
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    cache_path = Path(cfg["timing_cache"]).expanduser() if cfg.get("timing_cache") else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT could not build a {precision} engine from {source} (see the log above)")
    if cache_path:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    header = {**job.metadata("tensorrt", precision), "tensorrt_version": trt.__version__, "gpu": gpu_name(),
              "dla_core": cfg.get("dla_core"), "source_engine": source.name}
    atomic_write_bytes(path, pack_plan(header, bytes(plan)))
    return {"tensorrt_version": trt.__version__, "gpu": header["gpu"], "dla_core": cfg.get("dla_core"),
            "source_engine": source.name}


def _keep_statistics_in_fp32(trt: Any, network: Any, config: Any, low_precision_prefixes: tuple[str, ...]) -> None:
    """Layers outside the feature extractor (scoring, map head) compute and output FP32."""
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        floats = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in (trt.float16, trt.float32)]
        if layer.name.startswith(low_precision_prefixes) or not floats:
            continue
        layer.precision = trt.float32
        for j in floats:
            layer.set_output_type(j, trt.float32)
