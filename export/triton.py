"""Triton Inference Server model repository around one of the bundle's engines.

``engines/triton_<precision>/<model name>/config.pbtxt`` and ``.../1/model.onnx`` (or
``model.plan``, the bare TensorRT plan without edgeinspect's header). Point ``tritonserver
--model-repository`` at ``engines/triton_<precision>``. The engine file is the bundle's gated engine
(hard-linked where the file system allows), so the repository carries that engine's parity and decision
(threshold); ``config.pbtxt`` declares each tensor with the data type of the engine graph.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from edgeinspect.errors import ConfigError, ExportError
from edgeinspect.runtime.backends.tensorrt import unpack_plan

if TYPE_CHECKING:
    from edgeinspect.export.exporter import ExportJob

PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}
INSTANCE_KINDS = ("KIND_AUTO", "KIND_GPU", "KIND_CPU")
# ONNX tensor element types -> Triton's (model_config.proto DataType)
DATA_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
              onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.INT64: "TYPE_INT64",
              onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.INT8: "TYPE_INT8",
              onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.BOOL: "TYPE_BOOL"}


def model_name(bundle_id: str) -> str:
    """A Triton model name from a bundle id (letters, digits, '_' and '-')."""
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in bundle_id)


def config_pbtxt(name: str, platform: str, inputs: dict[str, tuple[list[int], str]],
                 outputs: dict[str, tuple[list[int], str]], instance_kind: str, instance_count: int,
                 parameters: dict[str, str]) -> str:
    """The text-format ModelConfig: fixed shapes (batch included, so max_batch_size 0); tensors as
    ``{name: (dims, Triton data type)}``."""
    def tensors(items: dict[str, tuple[list[int], str]]) -> str:
        return ",\n".join(f'  {{\n    name: "{n}"\n    data_type: {t}\n'
                          f'    dims: [ {", ".join(map(str, d))} ]\n  }}' for n, (d, t) in items.items())

    params = "\n".join(f'parameters {{\n  key: "{k}"\n  value {{ string_value: {json.dumps(v)} }}\n}}'
                       for k, v in parameters.items())
    return (f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: 0\n'
            f"input [\n{tensors(inputs)}\n]\noutput [\n{tensors(outputs)}\n]\n"
            f"instance_group [\n  {{\n    count: {instance_count}\n    kind: {instance_kind}\n  }}\n]\n{params}\n")


def tensor_types(graph: Path) -> dict[str, str]:
    """The Triton data type of every input and output of an ONNX graph (ExportError for one Triton lacks)."""
    model = onnx.load(str(graph), load_external_data=False).graph
    types = {}
    for tensor in [*model.input, *model.output]:
        elem_type = tensor.type.tensor_type.elem_type
        if elem_type not in DATA_TYPES:
            raise ExportError(f"{graph.name}: tensor {tensor.name!r} is {onnx.TensorProto.DataType.Name(elem_type)}, "
                              f"which a Triton model config cannot declare")
        types[tensor.name] = DATA_TYPES[elem_type]
    return types


def export_triton(job: ExportJob, precision: str, path: Path) -> dict[str, Any]:
    """Write the model repository for the ``triton.source`` engine at ``precision``."""
    cfg = job.settings["triton"]
    fmt = cfg["source"]
    if fmt not in PLATFORMS:
        raise ConfigError(f"triton.source: {fmt!r} is not one of {sorted(PLATFORMS)}")
    if cfg["instance_kind"] not in INSTANCE_KINDS:
        raise ConfigError(f"triton.instance_kind: {cfg['instance_kind']!r} is not one of {list(INSTANCE_KINDS)}")
    source = job.source_engine(fmt, precision)
    entry = job.bundle.find_engine(fmt, precision)
    platform, filename = PLATFORMS[fmt]
    name = model_name(job.bundle.bundle_id)
    version_dir = path / name / "1"
    version_dir.mkdir(parents=True)
    target = version_dir / filename
    if fmt == "tensorrt":  # Triton loads bare plans: drop edgeinspect's header
        target.write_bytes(unpack_plan(source.read_bytes(), source)[1])
        # a plan's tensors have the types of the ONNX graph it was built from; every precision's keeps FP32's
        graph = job.source_engine("onnx", "fp32")
    else:
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
        graph = source
    manifest = job.bundle.manifest
    types = tensor_types(graph)
    inputs = {manifest["input"]["name"]: (manifest["input"]["shape"], types[manifest["input"]["name"]])}
    outputs = {n: (dims, types[n]) for n, dims in manifest["outputs"].items()}
    decision = job.bundle.engine_decision(entry)  # the one the served engine was gated with
    metadata = {k: v if isinstance(v, str) else json.dumps(v)
                for k, v in {**job.metadata("triton", precision), "decision": decision}.items()}
    (path / name / "config.pbtxt").write_text(config_pbtxt(name, platform, inputs, outputs, cfg["instance_kind"],
                                                           int(cfg["instance_count"]), metadata))
    return {"model_name": name, "platform": platform, "source_engine": entry["file"],
            **({"decision": entry["decision"]} if "decision" in entry else {}),
            "parity": {**entry["parity"], "status": f"{entry['parity'].get('status')} (the {fmt}:{precision} engine "
                                                     f"it serves)"}}
