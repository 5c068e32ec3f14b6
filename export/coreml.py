"""Core ML engines: an ML program converted with coremltools from the ``torch.export`` graph.

FP32 and FP16 compute precision (FP16 is Core ML's native precision on the GPU and Neural Engine);
INT8 is FP16 compute with the convolution weights linearly quantized to int8 by
``coremltools.optimize`` (the memory bank / statistics are not convolution weights and stay as
they are). Conversion and the model spec work on Linux; prediction, and so the parity check, only
on macOS.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from edgeinspect.errors import ConfigError, ExportError

if TYPE_CHECKING:
    from edgeinspect.export.exporter import ExportJob


# Engines Core ML cannot take, by the runtime decoder that reads their outputs: why, in one line.
UNCONVERTIBLE = {
    "final_detections": "the engine is the whole detector (RPN, RoIAlign and NonMaxSuppression with a dynamic "
                        "detection count), which Core ML cannot convert; export onnx or tensorrt instead",
}


def export_coreml(job: ExportJob, precision: str, path: Path) -> dict[str, Any]:
    """Convert the PyTorch model to an ``.mlpackage`` at ``precision`` with the bundle metadata inside."""
    reason = UNCONVERTIBLE.get((job.bundle.manifest.get("detection") or {}).get("decoder"))
    if reason:
        raise ExportError(f"Core ML cannot take this {job.bundle.family} model: {reason}")
    import coremltools as ct

    cfg = job.settings["coreml"]
    target_name = cfg["minimum_deployment_target"]
    if not hasattr(ct.target, target_name):
        raise ConfigError(f"coreml.minimum_deployment_target: {target_name!r} is not a coremltools target")
    if cfg["compute_units"] not in ct.ComputeUnit.__members__:
        raise ConfigError(f"coreml.compute_units: {cfg['compute_units']!r} is not one of "
                          f"{list(ct.ComputeUnit.__members__)}")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.export.export(job.model, (torch.zeros(job.input_shape),)).run_decompositions({})
            mlmodel = ct.convert(program, inputs=[ct.TensorType(name="image", shape=job.input_shape)],
                                 outputs=[ct.TensorType(name=n) for n in job.output_names],
                                 convert_to="mlprogram", minimum_deployment_target=getattr(ct.target, target_name),
                                 compute_precision=ct.precision.FLOAT32 if precision == "fp32" else
                                 ct.precision.FLOAT16)
            if precision == "int8":
                from coremltools.optimize.coreml import (
                    OpLinearQuantizerConfig,
                    OptimizationConfig,
                    linear_quantize_weights,
                )

                int8_conv = OpLinearQuantizerConfig(mode="linear_symmetric")
                conv_only = OptimizationConfig(op_type_configs={"conv": int8_conv})
                mlmodel = linear_quantize_weights(mlmodel, conv_only)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as exc:
        raise ExportError(f"Core ML conversion failed: {exc}") from exc
    metadata = job.metadata("coreml", precision)
    mlmodel.short_description = f"edgeinspect {metadata['family']} model {metadata['bundle_id']} ({precision})"
    mlmodel.version = metadata["edgeinspect_version"]
    for key, value in metadata.items():
        mlmodel.user_defined_metadata[key] = value if isinstance(value, str) else json.dumps(value)
    mlmodel.user_defined_metadata["compute_units"] = cfg["compute_units"]
    mlmodel.save(str(path))
    return {"minimum_deployment_target": target_name, "compute_units": cfg["compute_units"],
            "coremltools_version": ct.__version__}


def write_decision(path: Path, decision: dict[str, Any]) -> None:
    """Replace the decision in an ``.mlpackage``'s user-defined metadata by the one its gate gave it."""
    from coremltools.proto import Model_pb2

    spec_file = next(path.rglob("*.mlmodel"))  # the package's model description (weights are apart)
    spec = Model_pb2.Model.FromString(spec_file.read_bytes())
    spec.description.metadata.userDefined["decision"] = json.dumps(decision)
    spec_file.write_bytes(spec.SerializeToString())
